"""The trainer in a process of its own: the HTTP API keeps answering while training runs, crashes or is killed.

``ProcessRunner`` is what the API holds (the same interface as ``runner.JobRunner``); it starts
``trainer_main`` in a child process (``spawn``: no fork of a threaded server) and talks to it over one pipe.
The child runs the ordinary ``JobRunner`` on its own ``Store`` of the same root: jobs, metrics and checkpoints
go through SQLite (WAL, several processes) and the disk as before; only what needs the loaded model crosses the
pipe — predictions, generation requests and their streamed events, "look at the store now", "unload this
adapter" — and, the other way, the runner's state (``/healthz``) and the admission budget.

When the child dies (a crash, the OOM killer, ``kill -9``) the API fails the requests that were in flight with a
"retry" message, starts a new trainer, and every job resumes from its last checkpoint exactly as after a
restart of the whole server. A job that was training in ``CRASH_LIMIT`` deaths of the trainer in a row, with no
checkpoint in between, is failed, so one job that kills the trainer cannot keep every tenant down. An exclusive
lock on ``root/trainer.lock`` keeps a second trainer off the same root (a trainer that outlives a killed API
finishes its checkpoint first); the child stops, checkpointing, when the API process goes away (the pipe closes).
"""

from __future__ import annotations

import fcntl
import itertools
import logging
import multiprocessing
import os
import signal
import threading
import time
from concurrent.futures import Future
from multiprocessing.connection import Connection
from typing import Any

from cotune.errors import CotuneError, Unavailable
from cotune.service.config import ServiceConfig
from cotune.service.generations import GenerateRequest
from cotune.service.pending import RemoteViews, settle
from cotune.service.store import ACTIVE_STATES, FAILED, JobRecord, Store

log = logging.getLogger("cotune.service")

#: a job training in this many deaths of the trainer process is failed (instead of killing it again)
CRASH_LIMIT = 3
#: the trainer's scheduling priority below the API's: on a busy machine the control plane gets the CPU first
#: (a status request costs a millisecond; a training step waits that much longer)
TRAINER_NICE = 10
#: how often the trainer reports its state (``/healthz``) and which jobs it is training
STATE_EVERY_S = 0.25

_GENERATE_FIELDS = ("job", "prompt", "messages", "max_tokens", "temperature", "top_p", "stop", "seed")


class ProcessRunner:
    """The API side of a trainer process; restarts it when it dies (see the module docstring)."""

    def __init__(self, config: ServiceConfig, store: Store) -> None:
        self.config, self.store = config, store
        self._ids = itertools.count()
        self._lock = threading.Lock()  # guards the pipe, the in-flight requests and the outbox
        self._conn: Connection | None = None
        self._outbox: list[tuple] = []  # messages sent while no trainer is up, delivered to the next one
        self._predicts: dict[int, Future] = {}  # predictions and remote weights deliveries
        self.remote_views = RemoteViews()  # the trainer's remote jobs, as its ``remote`` messages tell
        self._generates: dict[int, GenerateRequest] = {}
        self._state: dict[str, Any] = {"ready": False, "error": None}
        self._active: list[str] = []  # job ids the trainer trains now (blamed if it dies)
        self._admission: Any = None
        self._ready = threading.Event()
        self._stopping = threading.Event()
        self._crashes: dict[str, tuple[int, int]] = {}  # job id -> (deaths in a row, its checkpoint step then)
        self.restarts = 0
        self.pid: int | None = None
        self._thread: threading.Thread | None = None

    # -- the runner interface (called from HTTP threads) -------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._supervise, name="cotune-trainer-supervisor", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 60.0) -> None:
        """Ask the trainer to checkpoint and exit; kill it if it has not within ``timeout``."""
        self._stopping.set()
        self._send(("stop",))
        if self._thread is not None:
            self._thread.join(timeout + 5)

    def notify(self) -> None:
        self._send(("notify",))

    def forget(self, job: JobRecord) -> None:
        self._send(("forget", job))

    def wait_ready(self, timeout: float | None = None) -> bool:
        return self._ready.wait(timeout)

    def describe(self) -> dict[str, Any]:
        return {**self._state, "ready": self._ready.is_set() and bool(self._state.get("ready")),
                "trainer": "process", "trainer_pid": self.pid, "trainer_restarts": self.restarts}

    def check_admission(self, spec: dict[str, Any]) -> None:
        if self._admission is not None:  # known once the trainer has loaded the model
            self._admission.refuse_alone(spec)

    def submit_predict(self, job: JobRecord, inputs: list[str], max_new_tokens: int = 16) -> Future:
        fut: Future = Future()
        rid = next(self._ids)
        with self._lock:
            self._predicts[rid] = fut
        self._send(("predict", rid, job, list(inputs), max_new_tokens))
        return fut

    def remote_view(self, job_id: str) -> dict[str, Any] | None:
        return self.remote_views.get(job_id)

    def deliver_weights(self, job_id: str, path: str) -> Future:
        fut: Future = Future()
        rid = next(self._ids)
        with self._lock:
            self._predicts[rid] = fut
        self._send(("deliver", rid, job_id, path))
        return fut

    def submit_generate(self, req: GenerateRequest) -> None:
        rid = next(self._ids)
        with self._lock:
            self._generates[rid] = req
        self._send(("generate", rid, {f: getattr(req, f) for f in _GENERATE_FIELDS}))

    # -- the supervisor thread ---------------------------------------------------------------------------------
    def _send(self, msg: tuple) -> None:
        with self._lock:
            if self._conn is None:
                self._outbox.append(msg)
                return
            try:
                self._conn.send(msg)
            except OSError:  # the trainer just died: the supervisor fails what was in flight
                pass

    def _supervise(self) -> None:
        ctx = multiprocessing.get_context("spawn")
        backoff = 1.0
        while not self._stopping.is_set():
            ours, theirs = ctx.Pipe()
            proc = ctx.Process(target=trainer_main, args=(self.config, theirs, logging.getLogger().level),
                               name="cotune-trainer", daemon=False)
            proc.start()
            theirs.close()
            self.pid = proc.pid
            started = time.monotonic()
            with self._lock:
                self._conn = ours
                for msg in self._outbox:
                    ours.send(msg)
                self._outbox.clear()
            self._read(ours)
            with self._lock:  # from here on, new requests wait in the outbox for the next trainer
                self._conn = None
                in_flight = (list(self._predicts.values()), list(self._generates.values()))
                self._predicts, self._generates = {}, {}
            self._ready.clear()
            self._state = {"ready": False, "error": None}
            self.remote_views.clear()
            reason = Unavailable("the trainer process restarted; retry the request")
            for fut in in_flight[0]:
                settle(fut, error=reason)
            for req in in_flight[1]:
                req.emit(("error", reason))
            proc.join(30 if self._stopping.is_set() else 5)
            if proc.is_alive():
                proc.kill()
                proc.join()
            if self._stopping.is_set():
                break
            self.restarts += 1
            log.error("the trainer process (pid %s) exited with %s; restarting it", proc.pid, proc.exitcode)
            self._blame(list(self._active))
            backoff = 1.0 if time.monotonic() - started > 60 else min(2 * backoff, 30.0)
            self._stopping.wait(backoff)

    def _read(self, conn: Connection) -> None:
        """Dispatch the trainer's messages until its end of the pipe closes; forward cancelled generations."""
        while True:
            try:
                if not conn.poll(0.05):
                    self._forward_cancels(conn)
                    continue
                msg = conn.recv()
            except (EOFError, OSError):
                return
            try:
                self._dispatch(msg)
            except Exception:  # a bad message must not silence the trainer for good
                log.exception("the API could not handle the trainer's %r message", msg[0])

    def _dispatch(self, msg: tuple) -> None:
        kind = msg[0]
        if kind == "state":
            self._state, self._active = msg[1], msg[2]
            if msg[1].get("ready"):
                self._ready.set()
        elif kind == "admission":
            self._admission = msg[1]
        elif kind == "remote":
            self.remote_views.update(msg[1], msg[2])
        elif kind == "predicted":
            with self._lock:
                fut = self._predicts.pop(msg[1], None)
            if fut is not None:
                settle(fut, msg[3]) if msg[2] else settle(fut, error=msg[3])
        elif kind == "event":
            with self._lock:
                req = self._generates.get(msg[1])
                if req is not None and msg[2][0] in ("done", "error"):
                    del self._generates[msg[1]]
            if req is not None:
                req.emit(msg[2])

    def _forward_cancels(self, conn: Connection) -> None:
        with self._lock:
            gone = [rid for rid, r in self._generates.items() if r.cancelled.is_set()]
            for rid in gone:
                del self._generates[rid]
                try:
                    conn.send(("cancel", rid))
                except OSError:
                    return

    def _blame(self, job_ids: list[str]) -> None:
        """Count a trainer death against the jobs it was training; fail one at ``CRASH_LIMIT`` deaths in a row
        with no checkpoint in between (a job that makes progress between deaths is not what kills it)."""
        for jid in job_ids:
            rec = self.store.get_job(jid)
            if rec is None:
                continue
            count, at = self._crashes.get(jid, (0, -1))
            count = count + 1 if rec.checkpoint_step <= at else 1
            self._crashes[jid] = (count, rec.checkpoint_step)
            if count >= CRASH_LIMIT:
                reason = (f"the trainer process died {CRASH_LIMIT} times while this job was training, with no "
                          "checkpoint in between (out of memory?): lower batch_size or max_length, or ask the "
                          "operator for a larger --memory-limit-mb")
                if self.store.update_job(jid, only_if=ACTIVE_STATES, status=FAILED, error=reason, finished=time.time()):
                    log.error("job %s failed: %s", jid, reason)


def trainer_main(config: ServiceConfig, conn: Connection, log_level: int = logging.INFO) -> None:
    """The child process: a ``JobRunner`` on the root, driven by the API's messages until the pipe closes."""
    from cotune.service.runner import JobRunner

    logging.basicConfig(level=log_level or logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    # Ctrl-C reaches the whole process group: the API's shutdown tells us to stop. SIGTERM (a service manager
    # stopping everything) stops us gracefully, checkpointing, like the API's "stop".
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _raise_stop)
    os.nice(TRAINER_NICE)
    lock = open(config.root / "trainer.lock", "w")  # noqa: SIM115 - held, and released by the OS, at exit
    fcntl.flock(lock, fcntl.LOCK_EX)  # a trainer left by a killed API finishes its checkpoint first
    send_lock = threading.Lock()

    def send(msg: tuple) -> None:
        with send_lock:
            try:
                conn.send(msg)
            except OSError:
                pass  # the API is gone; the read loop below sees it and stops us

    store = Store(config.root, clean=False)  # uploads in progress belong to the API: never clean them here
    runner = JobRunner(config, store)
    runner.remote_sink = lambda job_id, fields: send(("remote", job_id, fields))
    runner.start()
    done = threading.Event()
    threading.Thread(target=_report, args=(runner, send, done), daemon=True).start()
    generates: dict[int, GenerateRequest] = {}
    try:
        while True:
            msg = conn.recv()
            kind = msg[0]
            if kind == "stop":
                break
            if kind == "notify":
                runner.notify()
            elif kind == "forget":
                runner.forget(msg[1])
            elif kind in ("predict", "deliver"):
                fut = runner.submit_predict(*msg[2:]) if kind == "predict" else runner.deliver_weights(*msg[2:])
                fut.add_done_callback(
                    lambda f, rid=msg[1]: send(("predicted", rid, f.exception() is None,
                                                f.result() if f.exception() is None else _plain(f.exception()))))
            elif kind == "generate":
                rid = msg[1]

                def emit(ev: tuple, rid: int = rid) -> None:
                    if ev[0] in ("done", "error"):
                        generates.pop(rid, None)
                    send(("event", rid, (ev[0], _plain(ev[1]) if ev[0] == "error" else ev[1])))

                req = GenerateRequest(emit=emit, **msg[2])
                generates[rid] = req
                runner.submit_generate(req)
            elif kind == "cancel":
                req = generates.get(msg[1])
                if req is not None:
                    req.cancelled.set()
    except (EOFError, OSError):
        log.warning("the API process is gone: checkpointing and stopping the trainer")
    except _Stop:
        log.warning("SIGTERM: checkpointing and stopping the trainer")
    done.set()
    runner.stop()
    store.close()


def _report(runner: Any, send: Any, done: threading.Event) -> None:
    """Send the runner's state every ``STATE_EVERY_S`` (and the admission budget once the model is loaded)."""
    sent_admission = False
    while not done.wait(STATE_EVERY_S):
        jobs = runner.jobs
        if jobs is not None and not sent_admission:
            send(("admission", jobs.admission))
            sent_admission = True
        active = [j.rec.id for j in list(jobs.active.values())] if jobs is not None else []
        send(("state", runner.describe(), active))


class _Stop(Exception):
    pass


def _raise_stop(signum: int, frame: Any) -> None:
    raise _Stop


def _plain(exc: BaseException | None) -> CotuneError:
    """An exception the pipe can carry and the routes understand."""
    return exc if isinstance(exc, CotuneError) else CotuneError(f"{type(exc).__name__}: {exc}")
