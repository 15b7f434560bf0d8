"""``cotune worker --server URL --job ID``: your job's adapter update on your own machine (ColA's split).

For a job submitted with ``engine: gl`` and ``engine_options: {"fitter": "remote"}``, the server computes only
the hidden-representation gradients; this command holds the adapter's optimizer (its gradients and state exist
only here), answers every update's capture frame with the new weights, and saves its state under ``--state``
after each update, before sending it, so a killed worker started again neither repeats nor loses an update.
When the job ends, its adapter is saved in PEFT format under ``--out``. Token: ``--token`` or ``$COTUNE_TOKEN``.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

from cotune.errors import CotuneError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--server", default=os.environ.get("COTUNE_SERVER", "http://127.0.0.1:8000"),
                   help="the cotune server (default $COTUNE_SERVER or http://127.0.0.1:8000)")
    p.add_argument("--job", required=True, help="the job id (submitted with engine_options.fitter = remote)")
    p.add_argument("--token", default=None, help="your tenant token (default $COTUNE_TOKEN)")
    p.add_argument("--state", default=None, help="folder for this worker's optimizer state (default ./worker-<job>)")
    p.add_argument("--out", default=None, help="where the finished adapter goes (default <state>/adapter)")
    p.add_argument("--patience", type=float, default=600.0,
                   help="seconds to keep retrying while the server cannot be reached (a restart), then give up")


def run(args: argparse.Namespace) -> int:
    import torch
    from tqdm.auto import tqdm

    from cotune.engines.gradient_learning.remote import RemoteWorker, decode_weights
    from cotune.service.client import Client, ServiceError
    from cotune.service.store import atomic_write_bytes

    token = args.token or os.environ.get("COTUNE_TOKEN")
    if not token:
        raise CotuneError("no token: pass --token or set COTUNE_TOKEN (cotune client register prints one)")
    state_dir = Path(args.state or f"worker-{args.job}")
    state_dir.mkdir(parents=True, exist_ok=True)
    state_file = state_dir / "state.pt"
    client = _Patient(Client(args.server, token=token, timeout=60), args.patience)
    path = f"/v1/jobs/{args.job}/worker"
    worker: RemoteWorker | None = None
    answer: bytes | None = None  # the weights frame of ``worker.update`` (sent again if the server lost it)
    bar = None
    sent = received = 0
    try:
        while True:
            info = client.request("GET", path).json()
            if info["status"] in ("succeeded", "failed", "cancelled"):
                break
            if info["setup"] is None:  # queued, paused or restarting: the server publishes it once it trains
                time.sleep(0.5)
                continue
            if worker is None:
                try:
                    worker, answer = _start(info, state_file, client, path, RemoteWorker, decode_weights, torch)
                except ServiceError as e:
                    if e.status != 409:  # 409: it stopped training meanwhile (paused, restarting): look again
                        raise
                    time.sleep(0.5)
                    continue
                total = info["total_steps"] // max(1, info["interval"])
                bar = tqdm(total=total, initial=worker.update, desc=f"worker {args.job[:8]}", unit="update")
            try:
                r = client.request("GET", f"{path}/capture", timeout=60)
            except ServiceError as e:
                if e.status == 410:  # it has just ended: the next look at its status says how
                    continue
                raise
            if r.status_code == 204:
                continue
            update = int(r.headers["X-Cotune-Update"])
            received = len(r.content)
            if update == worker.update + 1:
                answer = worker.answer(r.content)
                # saved BEFORE it is sent: a worker killed after this point sends the same weights again
                buf = _save(worker, answer, torch)
                atomic_write_bytes(state_file, buf)
                if bar is not None:
                    bar.update(1)
            elif update != worker.update or answer is None:
                raise CotuneError(f"the server awaits update {update} and this worker's state is at update "
                                  f"{worker.update}: it belongs to another run of this job")
            sent = len(answer)
            try:
                client.request("POST", f"{path}/weights", content=answer)
            except ServiceError as e:
                if e.status == 409:  # the server restarted or already has them: ask what it awaits now
                    continue
                raise CotuneError(f"the server refused update {update}'s weights: {e}") from e
            if bar is not None:
                bar.set_postfix_str(f"in {received / 1e6:.2f} MB, out {sent / 1e6:.2f} MB per update")
    finally:
        if bar is not None:
            bar.close()
    if info["status"] != "succeeded":
        raise CotuneError(f"job {args.job} ended {info['status']}: {info.get('error')}")
    out = client.download(args.job, args.out or state_dir / "adapter")
    print(f"job {args.job} succeeded; adapter (PEFT format) in {out}")
    return 0


class _Patient:
    """The client, retrying while the server is unreachable or answers 502/503 (it is restarting)."""

    def __init__(self, client: Any, patience: float) -> None:
        self.client, self.patience = client, patience

    def request(self, method: str, path: str, **kw: Any) -> Any:
        from cotune.service.client import ServiceError

        end = time.monotonic() + self.patience
        while True:
            try:
                return self.client.request(method, path, **kw)
            except ServiceError as e:
                if e.status not in (502, 503) or time.monotonic() > end:
                    raise
            except CotuneError:  # cannot reach the server
                if time.monotonic() > end:
                    raise
            time.sleep(1.0)

    def download(self, job_id: str, folder: Any) -> Path:
        return self.client.download(job_id, folder)


def _start(info: dict[str, Any], state_file: Path, client: Any, path: str, remote_worker: Any, decode: Any,
           torch: Any) -> tuple[Any, bytes | None]:
    """The worker from its saved state, or (a new worker, at the job's first update) from the server's weights."""
    worker = remote_worker(info["setup"])
    if state_file.exists():
        saved = torch.load(state_file, weights_only=True)
        worker.load_state_dict(saved["state"])
        return worker, bytes(saved["answer"].numpy().tobytes())
    if info["applied"]:
        raise CotuneError(f"the job is at update {info['applied']} and this worker has no saved state "
                          f"({state_file}): start it with the --state folder of the worker that trained it")
    _, weights, _ = decode(client.request("GET", f"{path}/weights").content)
    worker.load_weights(weights)
    return worker, None


def _save(worker: Any, answer: bytes, torch: Any) -> bytes:
    import io

    buf = io.BytesIO()
    torch.save({"state": worker.state_dict(), "answer": torch.frombuffer(bytearray(answer), dtype=torch.uint8)}, buf)
    return buf.getvalue()
