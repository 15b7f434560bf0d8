"""``cotune serve --model minilm --root DIR``: the fine-tuning-as-a-service HTTP server (FastAPI + uvicorn).

Binds to 127.0.0.1 unless ``--host`` says otherwise. State (SQLite, uploads, checkpoints, adapters) lives
under ``--root``; starting again on the same root resumes every unfinished job from its last checkpoint.
"""

from __future__ import annotations

import argparse
import logging

from cotune.errors import CotuneError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="minilm", help="base model every tenant shares: a folder, minilm, smollm2, a hub name")
    p.add_argument("--root", required=True, help="folder for the database, uploads, checkpoints and adapters")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-upload-mb", type=float, default=50.0, help="largest accepted upload (413 above it)")
    p.add_argument("--data-root", action="append", default=[], metavar="DIR",
                   help="server folder jobs may name data under (repeatable; none by default)")
    p.add_argument("--allow-hub", action="store_true", help="let jobs load Hugging Face hub data sets by name")
    p.add_argument("--open-registration", action="store_true",
                   help="let anyone who reaches the port register a tenant (default: only with --admin-token)")
    p.add_argument("--admin-token", default=None,
                   help="require this token (header X-Admin-Token) to register tenants; also $COTUNE_ADMIN_TOKEN")
    p.add_argument("--fitters", choices=("inprocess", "ray"), default="inprocess",
                   help="where gradient-learning fitters run (ray needs the ray extra)")
    p.add_argument("--trainer", choices=("process", "thread"), default="process",
                   help="train in a child process that is restarted if it dies, so the API keeps answering "
                        "(default), or in a thread of the API's process")
    p.add_argument("--checkpoint-every", type=int, default=20, help="default checkpoint interval in steps")
    p.add_argument("--max-steps", type=int, default=100_000, help="largest step count a job may ask for")
    p.add_argument("--max-new-tokens", type=int, default=1024,
                   help="most tokens one generation request (/v1/completions, /v1/chat/completions) may ask for")
    p.add_argument("--rate-limit", type=float, default=100.0,
                   help="requests per second per tenant, bursts of twice that (429 above; 0: no limit)")
    p.add_argument("--tenant-storage-mb", type=float, default=2048.0,
                   help="storage per tenant for uploads and adapters (413 above)")
    p.add_argument("--max-step-tokens", type=int, default=16_384,
                   help="most batch_size x max_length of one job's step, so no tenant's step holds up the others "
                        "for long (a larger batch: grad_accum or interval micro-batches)")
    p.add_argument("--max-job-evals", type=int, default=20,
                   help="midway evaluations (eval_every) one job may ask for: each holds every job's training up")
    p.add_argument("--tenant-compute-tokens", type=float, default=None,
                   help="compute quota per tenant in training token slots, steps x batch_size x max_length over all "
                        "its jobs, deleted ones included (default: none)")
    p.add_argument("--worker-timeout", type=float, default=300.0,
                   help="seconds a remote-fitter job waits for its cotune worker's weights before it pauses "
                        "(it resumes when the worker connects again); the other jobs never wait")
    p.add_argument("--memory-limit-mb", type=float, default=None,
                   help="memory for the base model and the training step of all jobs (default: half the machine's); "
                        "a job that cannot fit is refused, one that fits alone waits until others finish")
    p.add_argument("--max-adapter-params", type=int, default=None,
                   help="most parameters one job's adapters may have (default: as many as the base model has)")
    p.add_argument("--threads", type=int, default=None, help="torch threads of the training loop (default: torch's)")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from cotune.service.api import create_app
    from cotune.service.config import ServiceConfig

    if args.port < 0 or args.port > 65535:
        raise CotuneError(f"--port {args.port} is not a TCP port")
    config = ServiceConfig(
        root=args.root, model=args.model, host=args.host, port=args.port,
        max_upload_bytes=int(args.max_upload_mb * 2**20), data_roots=args.data_root, allow_hub=args.allow_hub,
        admin_token=args.admin_token, open_registration=args.open_registration, fitters=args.fitters, trainer=args.trainer,
        checkpoint_every=args.checkpoint_every,
        max_steps=args.max_steps, max_new_tokens=args.max_new_tokens,
        max_adapter_params=args.max_adapter_params, rate_limit=args.rate_limit,
        tenant_storage_bytes=int(args.tenant_storage_mb * 2**20), torch_threads=args.threads,
        max_step_tokens=args.max_step_tokens, worker_timeout_s=args.worker_timeout, max_job_evals=args.max_job_evals,
        tenant_compute_tokens=int(args.tenant_compute_tokens) if args.tenant_compute_tokens else None,
        memory_limit_bytes=int(args.memory_limit_mb * 2**20) if args.memory_limit_mb else None,
    )
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    app = create_app(config)
    print(f"cotune serve: model {config.model}, root {config.root}, http://{config.host}:{config.port}", flush=True)
    uvicorn.run(app, host=config.host, port=config.port, log_level=args.log_level, access_log=False)
    return 0
