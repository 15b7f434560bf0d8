"""Settings of one ``cotune serve`` process (all have safe defaults: loopback only, no server-side paths)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from cotune.errors import CotuneError


@dataclass
class ServiceConfig:
    """What ``cotune serve`` is started with.

    ``data_roots``: server-side folders a job may name data under (``{"path": ...}``); empty refuses paths.
    ``allow_hub``: jobs may name a Hugging Face hub data set (needs the server online).
    ``fitters``: where gradient-learning fitters run: ``inprocess`` (default) or ``ray``.
    ``trainer``: ``process`` (default: training in a child process, restarted if it dies, so the API keeps
    answering) or ``thread`` (in the API's own process: simpler to debug, but a step holds the interpreter lock).
    """

    root: Path
    model: str = "minilm"
    host: str = "127.0.0.1"
    port: int = 8000
    max_upload_bytes: int = 50 * 2**20
    data_roots: list[Path] = field(default_factory=list)
    allow_hub: bool = False
    admin_token: str | None = None
    open_registration: bool = False  # anyone who reaches the port may register (else: only with the admin token)
    fitters: str = "inprocess"
    trainer: str = "process"
    checkpoint_every: int = 20
    max_steps: int = 100_000
    max_batch_size: int = 256
    max_length: int = 512
    max_predict_inputs: int = 64
    max_predict_chars: int = 20_000
    predict_wait_s: float = 0.01  # how long the runner waits to gather predict requests of several tenants
    max_new_tokens: int = 1024  # the most tokens one generation request may ask for
    max_adapter_params: int | None = None  # the most parameters one job's adapters may have (None: the base's)
    max_active_jobs: int = 16  # queued + running jobs per tenant (429 above)
    rate_limit: float = 100.0  # requests per second per tenant, bursts of twice that (429 above; 0: no limit)
    tenant_storage_bytes: int = 2 * 2**30  # uploads + adapters per tenant (413 above)
    # One job's share of a round: batch_size x max_length tokens per step at most, so that no tenant's step holds
    # the others up for long (a larger batch is grad_accum / interval micro-batches of this size)
    max_step_tokens: int = 16_384
    # A midway evaluation (a job's eval_every) holds every job's round for a pass over its evaluation rows: at most
    # this many per job, so that no tenant's curve stalls the others' training
    max_job_evals: int = 20
    worker_timeout_s: float = 300.0  # a remote-fitter job waits this long for its worker's weights, then pauses
    tenant_compute_tokens: int | None = None  # training token slots (steps x batch_size x max_length) per tenant
    memory_limit_bytes: int | None = None  # the server's memory for the base model and the training step
    # (None: half the machine's); a job whose step cannot fit is refused, one that fits alone waits its turn
    torch_threads: int | None = None  # torch intra-op threads of the worker (None: torch's default)

    @property
    def model_id(self) -> str:
        """The base model's public name (``model`` in the OpenAI routes): never a server path."""
        p = Path(self.model).expanduser()
        return p.name if p.exists() or os.sep in self.model else self.model

    def __post_init__(self) -> None:
        self.root = Path(self.root).expanduser().resolve()
        self.data_roots = [Path(p).expanduser().resolve() for p in self.data_roots]
        if self.fitters not in ("inprocess", "ray"):
            raise CotuneError(f"fitters must be inprocess or ray, not {self.fitters!r}")
        if self.trainer not in ("process", "thread"):
            raise CotuneError(f"trainer must be process or thread, not {self.trainer!r}")
        if self.max_upload_bytes <= 0:
            raise CotuneError("max_upload_bytes must be positive")
        if self.max_step_tokens <= 0 or (self.tenant_compute_tokens is not None and self.tenant_compute_tokens <= 0):
            raise CotuneError("max_step_tokens and tenant_compute_tokens must be positive")
        if self.checkpoint_every <= 0 or self.max_job_evals < 0:
            raise CotuneError("checkpoint_every must be positive and max_job_evals not negative")
        if self.admin_token is None:
            self.admin_token = os.environ.get("COTUNE_ADMIN_TOKEN") or None
