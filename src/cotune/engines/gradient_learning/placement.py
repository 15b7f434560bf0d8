"""Where a fitter runs: inline, a background thread, a worker process, a Ray actor, or the adapter owner's
machine (``remote``; ``loopback`` answers its frames in this process — see ``remote``).

Each placement is a ``FitterHandle``: ``submit(msg)`` ships one ``Pair``/``Statistic`` without waiting
(the thread starts fitting while the server's backward pass goes on), ``step()`` waits for the one
optimizer step of the window and returns its stats, after which the **server's** adapters hold the new
weights. How weights get back differs:

* ``inline`` / ``thread`` on the adapters' own device: the fitter's parameters share storage with the
  server's (the fitter's optimizer writes them in place); on another device they are copied back.
* ``process``: the adapter weights live in shared memory; the worker (``torch.multiprocessing``, spawn)
  updates them in place, pairs travel through shared-memory tensors.
* ``ray``: an actor (``pip install cotune[ray]``) returns the new weights, which are copied in.

A fitter that dies is reported at once (``CotuneError`` naming it and its exit code), one that hangs after
``timeout_s``; the server never waits longer than that.
"""

from __future__ import annotations

import copy
import os
import queue
import threading
import time
import traceback
import weakref
from typing import Any, Protocol

import torch
from torch import nn

from cotune.adapters.base import Adapter
from cotune.engines.base import OptimConfig
from cotune.engines.gradient_learning.fitter import Fitter
from cotune.engines.gradient_learning.wire import Message
from cotune.errors import CotuneError

PLACEMENTS = ("inline", "thread", "process", "ray", "remote", "loopback")


class FitterHandle(Protocol):
    """A fitter for one adapter set, wherever it runs."""

    name: str

    def submit(self, msg: Message) -> None: ...
    def step(self) -> dict[str, Any]: ...
    def discard(self) -> None: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...
    def close(self) -> None: ...


def make_fitter(
    placement: str,
    adapters: dict[str, Adapter],
    optim: OptimConfig,
    device: torch.device | str | None = None,
    timeout_s: float = 120.0,
    name: str = "default",
    threads: int = 1,
    ray_options: dict[str, Any] | None = None,
) -> FitterHandle:
    """A fitter for the server's ``adapters`` (``{site path: Adapter}``) at ``placement``.

    ``device``: where the fitter computes (default: the adapters' device for inline/thread, CPU for
    process/ray). ``threads``: torch intra-op threads of a worker process. ``ray_options``: passed to
    ``ray.remote(...).options`` (e.g. ``{"num_gpus": 1}``).
    """
    if placement == "inline":
        return InlineFitter(adapters, optim, device, name)
    if placement == "thread":
        return ThreadFitter(adapters, optim, device, name, timeout_s)
    if placement == "process":
        return ProcessFitter(adapters, optim, device, name, timeout_s, threads)
    if placement == "ray":
        return RayFitter(adapters, optim, device, name, timeout_s, ray_options or {})
    if placement in ("remote", "loopback"):  # the owner's own machine (see ``remote``)
        from cotune.engines.gradient_learning import remote

        return remote.RemoteFitter(adapters, optim, name) if placement == "remote" else remote.loopback(adapters, optim, name)
    raise CotuneError(f"unknown fitter placement {placement!r}; valid: {', '.join(PLACEMENTS)}")


# -- weights shared or copied back --------------------------------------------------------------------
def _same_device(a: torch.device, b: torch.device) -> bool:
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


def private_copies(adapters: dict[str, Adapter], device: torch.device | str | None) -> dict[str, Adapter]:
    """The fitter's own adapter modules; on the server's device their parameters share its storage."""
    out: dict[str, Adapter] = {}
    for path, ad in adapters.items():
        cp = copy.deepcopy(ad)
        srv = list(ad.parameters())
        if device is None or (srv and _same_device(torch.device(device), srv[0].device)):
            for p_cp, p_srv in zip(cp.parameters(), srv):
                p_cp.data = p_srv.data  # one storage: the fitter's in-place step is the server's new weight
        else:
            cp.to(device)
        out[path] = cp
    return out


def _pairs_of_params(server: dict[str, Adapter], other: dict[str, Adapter]) -> list[tuple[nn.Parameter, nn.Parameter]]:
    return [(ps, po) for path in server for ps, po in zip(server[path].parameters(), other[path].parameters())]


@torch.no_grad()
def publish(pairs: list[tuple[nn.Parameter, torch.Tensor]]) -> None:
    """Copy fitter weights into the server's parameters where they do not already share storage."""
    for srv, new in pairs:
        if srv.device == new.device and srv.data_ptr() == new.data_ptr():
            continue
        srv.data.copy_(new.detach().to(srv.device, srv.dtype))


# -- the message loop shared by the thread and the process -------------------------------------------
def serve(fitter: Fitter, inbox: Any, outbox: Any, after_step: Any = None) -> None:
    """Run ``fitter`` on messages ``(kind, payload)`` until ``close``; errors are sent back, never raised.

    ``add`` gets no reply (the server does not wait for it); an error in it is reported at the next
    request that has a reply, and the window's gradients are dropped.
    """
    pending: tuple[str, bool] | None = None
    while True:
        kind, payload = inbox.get()
        if kind == "close":
            return
        try:
            if kind == "add":
                if pending is None:
                    fitter.add(payload)
                continue
            if kind == "discard":
                fitter.discard()
                pending = None
                continue
            if pending is not None:
                fitter.discard()
                outbox.put(("error", pending))
                pending = None
                continue
            if kind == "step":
                stats = fitter.step()
                if after_step is not None:
                    after_step()
                outbox.put(("ok", stats))
            elif kind == "state":
                outbox.put(("ok", fitter.state_dict()))
            elif kind == "load":
                fitter.load_state_dict(payload)
                outbox.put(("ok", None))
            else:
                outbox.put(("error", (f"unknown request {kind!r}", False)))
        except Exception as e:  # noqa: BLE001 - reported to the server, which raises it
            report = (str(e) if isinstance(e, CotuneError) else traceback.format_exc(), isinstance(e, CotuneError))
            if kind == "add":
                pending = report
            else:
                outbox.put(("error", report))


class _QueueHandle:
    """Requests over a pair of queues to a fitter that may die or hang; used by thread and process."""

    name: str
    kind: str

    def __init__(self, name: str, timeout_s: float) -> None:
        self.name = name
        self.timeout_s = float(timeout_s)
        self.broken: str | None = None
        self.inbox: Any = None
        self.outbox: Any = None

    def alive(self) -> bool:
        raise NotImplementedError

    def describe_death(self) -> str:
        return "it stopped"

    def submit(self, msg: Message) -> None:
        self._check()
        self.inbox.put(("add", msg))

    def step(self) -> dict[str, Any]:
        out = self._request("step")
        self.after_step()
        return out

    def after_step(self) -> None:
        """Make the server's adapters hold the new weights (shared storage: nothing to do)."""

    def discard(self) -> None:
        self._check()
        self.inbox.put(("discard", None))

    def state_dict(self) -> dict[str, Any]:
        return self._request("state")

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._request("load", state)

    def _check(self) -> None:
        if self.broken:
            raise CotuneError(self.broken)
        if not self.alive():
            self.broken = f"fitter {self.name!r} ({self.kind}) is not running: {self.describe_death()}"
            raise CotuneError(self.broken)

    def _request(self, kind: str, payload: Any = None) -> Any:
        self._check()
        self.inbox.put((kind, payload))
        deadline = time.monotonic() + self.timeout_s
        while True:
            try:
                status, value = self.outbox.get(timeout=0.1)
                break
            except queue.Empty:
                if not self.alive():
                    self.broken = f"fitter {self.name!r} ({self.kind}) died during {kind!r}: {self.describe_death()}"
                    raise CotuneError(self.broken) from None
                if time.monotonic() > deadline:
                    self.broken = (
                        f"fitter {self.name!r} ({self.kind}) did not answer {kind!r} within timeout_s="
                        f"{self.timeout_s:g} s; it is hung or far too slow (raise timeout_s for very large adapters)"
                    )
                    raise CotuneError(self.broken) from None
        if status == "error":
            message, user_error = value
            raise CotuneError(f"fitter {self.name!r} ({self.kind}) failed: {message}" if not user_error else message)
        return value


class InlineFitter:
    """The fitter runs in the caller's thread when each pair is submitted (no overlap; simplest to debug)."""

    kind = "inline"

    def __init__(self, adapters: dict[str, Adapter], optim: OptimConfig, device: Any, name: str) -> None:
        self.name = name
        self.copies = private_copies(adapters, device)
        self.fitter = Fitter(self.copies, optim, device)
        self._pairs = _pairs_of_params(adapters, self.copies)

    def submit(self, msg: Message) -> None:
        self.fitter.add(msg)

    def step(self) -> dict[str, Any]:
        stats = self.fitter.step()
        publish(self._pairs)
        return stats

    def discard(self) -> None:
        self.fitter.discard()

    def state_dict(self) -> dict[str, Any]:
        return self.fitter.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.fitter.load_state_dict(state)

    def close(self) -> None:
        pass


class ThreadFitter(_QueueHandle):
    """The fitter in a background thread of this process: fits overlap the server's backward pass."""

    kind = "thread"

    def __init__(
        self, adapters: dict[str, Adapter], optim: OptimConfig, device: Any, name: str, timeout_s: float
    ) -> None:
        super().__init__(name, timeout_s)
        self.copies = private_copies(adapters, device)
        self.fitter = Fitter(self.copies, optim, device)
        self._pairs = _pairs_of_params(adapters, self.copies)
        self.inbox, self.outbox = queue.Queue(), queue.Queue()
        self.thread = threading.Thread(
            target=serve, args=(self.fitter, self.inbox, self.outbox), name=f"cotune-fitter-{name}", daemon=True
        )
        self.thread.start()

    def alive(self) -> bool:
        return self.thread.is_alive()

    def after_step(self) -> None:
        publish(self._pairs)

    def close(self) -> None:
        if self.thread.is_alive():
            self.inbox.put(("close", None))
            # A hung fitter thread cannot be stopped; do not hang with it (it is a daemon thread).
            self.thread.join(timeout=0.1 if self.broken else 5)


def _process_main(
    adapters: dict[str, Adapter], optim: OptimConfig, device: Any, threads: int, inbox: Any, outbox: Any
) -> None:
    """Entry point of a worker process: train the shared-memory adapters in place."""
    try:
        torch.set_num_threads(max(1, threads))
        work = adapters if device is None or torch.device(device).type == "cpu" else private_copies(adapters, device)
        fitter = Fitter(work, optim, device or "cpu")
        pairs = _pairs_of_params(adapters, work) if work is not adapters else []
        serve(fitter, inbox, outbox, after_step=(lambda: publish(pairs)) if pairs else None)
    except Exception:  # noqa: BLE001 - the parent reports it
        outbox.put(("error", (traceback.format_exc(), False)))


class ProcessFitter(_QueueHandle):
    """The fitter in a worker process (``torch.multiprocessing``, spawn); weights in shared memory."""

    kind = "process"

    def __init__(
        self, adapters: dict[str, Adapter], optim: OptimConfig, device: Any, name: str, timeout_s: float, threads: int
    ) -> None:
        super().__init__(name, timeout_s)
        import torch.multiprocessing as mp

        on_cpu = all(p.device.type == "cpu" for ad in adapters.values() for p in ad.parameters())
        # CPU adapters move into shared memory in place, so the worker's optimizer writes the server's weights;
        # adapters on an accelerator get a shared CPU master copy that is copied back after each step.
        self.master = adapters if on_cpu else {k: copy.deepcopy(ad).cpu() for k, ad in adapters.items()}
        for ad in self.master.values():
            ad.share_memory()
        self._pairs = [] if on_cpu else _pairs_of_params(adapters, self.master)
        ctx = mp.get_context("spawn")
        self.inbox, self.outbox = ctx.Queue(), ctx.Queue()
        self.process = ctx.Process(
            target=_process_main,
            args=(self.master, optim, device, threads, self.inbox, self.outbox),
            name=f"cotune-fitter-{name}",
            daemon=True,
        )
        self.process.start()
        self._finalizer = weakref.finalize(self, _stop_process, self.process, self.inbox)

    def alive(self) -> bool:
        return self.process.is_alive()

    def describe_death(self) -> str:
        code = self.process.exitcode
        why = f"process {self.process.pid} exited with code {code}"
        if code is not None and code < 0:
            return why + " (killed by a signal)"
        # The usual cause: spawn re-imports the main script, which must guard its top level.
        return (
            why
            + " (see its traceback above; a script using placement='process' needs an `if __name__ == \"__main__\":` guard)"
        )

    def after_step(self) -> None:
        publish(self._pairs)

    def close(self) -> None:
        self._finalizer()


def _stop_process(process: Any, inbox: Any) -> None:
    if process.is_alive():
        try:
            inbox.put(("close", None))
        except (OSError, ValueError):
            pass
        process.join(timeout=5)
        if process.is_alive():
            process.terminate()
            process.join(timeout=5)


class _RayActor:
    """The Ray actor body: a ``Fitter`` on the actor's machine."""

    def __init__(self, adapters: dict[str, Adapter], optim: OptimConfig, device: Any) -> None:
        for ad in adapters.values():
            ad.requires_grad_(True)
        self.fitter = Fitter(adapters, optim, device or "cpu")

    def add(self, msg: Message) -> None:
        self.fitter.add(msg)

    def step(self) -> tuple[dict[str, Any], dict[str, torch.Tensor] | None]:
        stats = self.fitter.step()
        weights = {k: v.cpu().clone() for k, v in self.fitter.weights().items()} if stats["updated"] else None
        return stats, weights

    def discard(self) -> None:
        self.fitter.discard()

    def state_dict(self) -> dict[str, Any]:
        return self.fitter.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.fitter.load_state_dict(state)


class RayFitter:
    """The fitter as a Ray actor (the scale-out path): pairs go by ``actor.add.remote``, weights come back."""

    kind = "ray"

    def __init__(
        self, adapters: dict[str, Adapter], optim: OptimConfig, device: Any, name: str, timeout_s: float, options: dict
    ) -> None:
        try:
            import ray
        except ImportError as e:
            raise CotuneError("placement='ray' needs Ray: pip install 'cotune[ray]'") from e
        self.ray = ray
        if not ray.is_initialized():
            # Ray nices its workers to 15; the server waits for every fitter step, so a niced actor starves
            # behind any busy process (a trivial actor took 119 s instead of 10 s on 2 loaded cores).
            os.environ.setdefault("RAY_worker_niceness", "0")
            ray.init(include_dashboard=False, log_to_driver=False)
        self.name, self.timeout_s = name, float(timeout_s)
        self.params = {f"{p}.{k}": v for p, ad in adapters.items() for k, v in ad.named_parameters()}
        cpu = {k: copy.deepcopy(ad).cpu() for k, ad in adapters.items()}
        self.actor = ray.remote(_RayActor).options(name=None, **options).remote(cpu, optim, device)
        self.refs: list[Any] = []

    def _get(self, ref: Any, what: str) -> Any:
        ray = self.ray
        try:
            pending, self.refs = self.refs, []
            ray.get([*pending, ref], timeout=self.timeout_s)
            return ray.get(ref)
        except ray.exceptions.GetTimeoutError:
            raise CotuneError(
                f"fitter {self.name!r} (ray) did not answer {what!r} within timeout_s={self.timeout_s:g} s"
            ) from None
        except ray.exceptions.RayActorError as e:
            raise CotuneError(f"fitter {self.name!r} (ray actor) died: {e}") from None
        except ray.exceptions.RayTaskError as e:
            cause = getattr(e, "cause", None)
            if isinstance(cause, CotuneError):
                raise CotuneError(str(cause)) from None
            raise CotuneError(f"fitter {self.name!r} (ray) failed: {e}") from None

    def submit(self, msg: Message) -> None:
        self.refs.append(self.actor.add.remote(msg))

    def step(self) -> dict[str, Any]:
        stats, weights = self._get(self.actor.step.remote(), "step")
        if weights is not None:
            publish([(self.params[k], v) for k, v in weights.items()])
        return stats

    def discard(self) -> None:
        self.refs.append(self.actor.discard.remote())

    def state_dict(self) -> dict[str, Any]:
        return self._get(self.actor.state_dict.remote(), "state")

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._get(self.actor.load_state_dict.remote(state), "load")

    def close(self) -> None:
        if self.actor is not None:
            self.ray.kill(self.actor)
            self.actor = None
