"""Start ``cotune serve`` as a child process on a free loopback port (tests, benchmarks, scripts).

>>> with ServerProcess("/tmp/svc", ["--threads", "1"]) as srv:
...     Client(srv.url).health()
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from cotune.errors import CotuneError


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerProcess:
    """``python -m cotune.cli serve --root ROOT --port PORT [args]`` bound to 127.0.0.1; log in ``ROOT/../``."""

    def __init__(self, root: str | os.PathLike, args: list[str] | None = None, model: str = "minilm",
                 port: int | None = None, open_registration: bool = True) -> None:
        self.root = Path(root)
        self.args = list(args or [])
        if open_registration and "--admin-token" not in self.args:  # a private loopback server: anyone registers
            self.args.append("--open-registration")
        self.model = model
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.log_path = self.root.parent / f"{self.root.name}-server.log"

    def start(self, timeout: float = 120.0, wait_model: bool = True) -> ServerProcess:
        """Start the server and wait until it answers (and, with ``wait_model``, its base model is loaded)."""
        env = {**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"), "TOKENIZERS_PARALLELISM": "false"}
        cmd = [sys.executable, "-m", "cotune.cli", "serve", "--model", self.model, "--root", str(self.root),
               "--host", "127.0.0.1", "--port", str(self.port), *self.args]
        self.root.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child keeps writing to it
        # a session of its own: ``kill`` takes the API and its trainer process down together
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        log.close()
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise CotuneError(f"cotune serve exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                h = httpx.get(self.url + "/healthz", timeout=2).json()
                if h["runner"].get("error"):
                    raise CotuneError(f"the server's runner failed: {h['runner']['error']}")
                if not wait_model or h["runner"]["ready"]:
                    return self
            except (httpx.TransportError, ValueError):
                pass
            time.sleep(0.2)
        self.stop()
        raise CotuneError(f"cotune serve did not get ready in {timeout:.0f} s:\n{self.log_tail()}")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def kill(self) -> None:
        """SIGKILL to the API and its trainer process: no shutdown code runs (a crash of the machine)."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # the group outlives the API while its trainer lives
        except ProcessLookupError:
            pass
        self.proc.wait(30)

    def kill_api(self) -> None:
        """SIGKILL to the API process alone; its trainer sees the pipe close, checkpoints and exits."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)

    def trainer_pid(self) -> int | None:
        """The pid of the trainer process now (from ``/healthz``), ``None`` while none is up."""
        return httpx.get(self.url + "/healthz", timeout=10).json()["runner"].get("trainer_pid")

    def kill_trainer(self) -> int:
        """SIGKILL to the trainer process alone (a crash, the OOM killer); the API restarts it. Its pid."""
        pid = self.trainer_pid()
        if pid is None:
            raise CotuneError("this server has no trainer process (cotune serve --trainer thread?)")
        os.kill(pid, signal.SIGKILL)
        return pid

    def stop(self, timeout: float = 60.0) -> None:
        """SIGTERM (graceful: uvicorn stops, the runner checkpoints), SIGKILL if it does not exit in time."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
        self.kill()  # whatever is left of the group (a trainer that outlived its API)

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return "(no log)"

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
