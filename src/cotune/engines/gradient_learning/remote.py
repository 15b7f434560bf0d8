"""The fitter on the adapter owner's own machine (ColA's split): frames out, new weights back.

The server keeps no optimizer and computes no parameter gradient for a ``remote`` tenant. At each update
the ``RemoteFitter`` packs the window's messages (``Statistic`` where the family is affine in ``u`` and the
statistic is smaller, else ``Pair``; fp32 or bf16, see ``wire``) into one **capture frame**; the owner's
``RemoteWorker`` runs the ordinary ``Fitter`` on it (gradients and optimizer state exist only there) and
answers with a **weights frame**, which the server checks and copies into the tenant's adapters before the
tenant's next forward. Both frames are safetensors (binary, no pickle): tensors plus a JSON header.

``placement="remote"``: frames go to ``RemoteFitter.outbox`` and weights come back, later, through
``deliver`` (the service: ``cotune worker`` over HTTP; the tenant skips rounds meanwhile).
``placement="loopback"``: a ``RemoteWorker`` in this process answers each frame at once, through the same
bytes (what ``cotune verify`` and the tests use to prove the wire and the worker exact).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from cotune.adapters.base import Adapter
from cotune.adapters.registry import get_family
from cotune.engines.base import OptimConfig
from cotune.engines.gradient_learning.fitter import Fitter
from cotune.engines.gradient_learning.wire import Message, Pair, Statistic
from cotune.errors import CotuneError

FRAME_FORMAT = "cotune-remote-1"


class StaleUpdate(CotuneError):
    """Weights for an update the server does not await (already applied, or not computed yet after a restart):
    not the worker's fault; it fetches the awaited capture again."""


# -- frames ------------------------------------------------------------------------------------------------
def encode_capture(update: int, messages: list[Message]) -> bytes:
    """One update's messages as a safetensors frame; tensors ``<i>.u``/``<i>.delta`` or ``<i>.s``/``<i>.delta_sum``."""
    tensors: dict[str, torch.Tensor] = {}
    meta = []
    for i, m in enumerate(messages):
        if isinstance(m, Pair):
            tensors[f"{i}.u"], tensors[f"{i}.delta"] = m.u.contiguous(), m.delta.contiguous()
            meta.append({"kind": "pair", "path": m.path, "call": m.call, "seed": m.seed, "training": m.training})
        else:
            tensors[f"{i}.s"], tensors[f"{i}.delta_sum"] = m.s.contiguous(), m.delta_sum.contiguous()
            meta.append({"kind": "statistic", "path": m.path, "call": m.call})
    header = {"format": FRAME_FORMAT, "update": str(update), "messages": json.dumps(meta)}
    return st_save({k: t.detach().cpu() for k, t in tensors.items()}, metadata=header)


def decode_capture(data: bytes) -> tuple[int, list[Message]]:
    """``(update, messages)`` of a capture frame; ``CotuneError`` when it is not one."""
    tensors, header = _read(data)
    msgs: list[Message] = []
    for i, m in enumerate(json.loads(header["messages"])):
        if m["kind"] == "pair":
            msgs.append(Pair(m["path"], m["call"], tensors[f"{i}.u"], tensors[f"{i}.delta"], m["seed"], m["training"]))
        else:
            msgs.append(Statistic(m["path"], m["call"], tensors[f"{i}.s"], tensors[f"{i}.delta_sum"]))
    return int(header["update"]), msgs


def encode_weights(update: int, weights: dict[str, torch.Tensor], stats: dict[str, Any] | None = None) -> bytes:
    """The adapter weights after ``update`` (names as ``Fitter.named``), with the fitter's step stats."""
    header = {"format": FRAME_FORMAT, "update": str(update), "stats": json.dumps(_plain(stats or {}))}
    return st_save({k: t.detach().cpu().contiguous() for k, t in weights.items()}, metadata=header)


def decode_weights(data: bytes) -> tuple[int, dict[str, torch.Tensor], dict[str, Any]]:
    tensors, header = _read(data)
    return int(header["update"]), tensors, json.loads(header.get("stats") or "{}")


def _read(data: bytes) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        tensors = st_load(bytes(data))
        # safetensors' layout: an 8-byte little-endian length, then the JSON header with "__metadata__"
        n = int.from_bytes(data[:8], "little")
        header = json.loads(bytes(data[8 : 8 + n])).get("__metadata__") or {}
    except Exception as e:  # noqa: BLE001 - any parse failure is the sender's bad frame
        raise CotuneError(f"not a cotune frame: {type(e).__name__}: {e}") from e
    if header.get("format") != FRAME_FORMAT or "update" not in header:
        raise CotuneError(f"not a cotune frame (format {header.get('format')!r}, expected {FRAME_FORMAT!r})")
    return tensors, header


def _plain(stats: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in stats.items():
        if isinstance(v, bool | int | str):
            out[k] = v
        elif isinstance(v, float):
            out[k] = v if math.isfinite(v) else str(v)
    return out


# -- what the worker needs to build the adapters -------------------------------------------------------------
def describe(adapters: dict[str, Adapter], optim: OptimConfig) -> dict[str, Any]:
    """The adapter set (family, config and widths per site) and the optimizer, as JSON for the worker."""
    from dataclasses import asdict

    sites = [{"path": p, "family": ad.config.family, "config": ad.config.to_dict(), "d_in": ad.d_in,
              "d_out": ad.d_out, "dtype": str(next(ad.parameters()).dtype).removeprefix("torch."),
              "params": {k: list(t.shape) for k, t in ad.named_parameters()}}
             for p, ad in adapters.items()]
    return {"format": FRAME_FORMAT, "sites": sites, "optim": asdict(optim)}


def build(setup: dict[str, Any]) -> tuple[dict[str, Adapter], OptimConfig]:
    """The worker's own adapters (no base model needed) and optimizer config from ``describe``'s JSON."""
    if setup.get("format") != FRAME_FORMAT:
        raise CotuneError(f"this worker speaks {FRAME_FORMAT}; the server sent {setup.get('format')!r}")
    adapters = {}
    for s in setup["sites"]:
        family = get_family(s["family"])
        config = family.config_cls.from_dict(s["config"])
        try:
            ad = family.adapter_cls(config, s["d_in"], s["d_out"], None)
        except (AssertionError, CotuneError, AttributeError, TypeError):
            # a family whose init reads the module it adapts (full copies it, CoLA's PiSSA factorises it): a
            # zero Linear of the site's shape stands in; the server's weights replace whatever init made
            bias = any(k.endswith("bias") for k in s.get("params", {}))
            ad = family.adapter_cls(config, s["d_in"], s["d_out"], _zero_linear(s["d_in"], s["d_out"], bias))
        adapters[s["path"]] = ad.to(getattr(torch, s.get("dtype", "float32")))
    o = dict(setup["optim"])
    if isinstance(o.get("betas"), list):
        o["betas"] = tuple(o["betas"])
    return adapters, OptimConfig(**o)


def _zero_linear(d_in: int, d_out: int, bias: bool) -> torch.nn.Linear:
    lin = torch.nn.Linear(d_in, d_out, bias=bias)
    torch.nn.init.zeros_(lin.weight)
    if bias:
        torch.nn.init.zeros_(lin.bias)
    return lin


# -- the two ends ------------------------------------------------------------------------------------------
class RemoteWorker:
    """The owner's end: a ``Fitter`` on its own copy of the adapters, one weights frame per capture frame."""

    def __init__(self, setup: dict[str, Any], weights: dict[str, torch.Tensor] | None = None) -> None:
        adapters, optim = build(setup)
        self.fitter = Fitter(adapters, optim, "cpu")
        if weights is not None:
            self.load_weights(weights)
        self.update = 0  # the last update applied here

    @torch.no_grad()
    def load_weights(self, weights: dict[str, torch.Tensor]) -> None:
        missing = sorted(set(self.fitter.named) ^ set(weights))
        if missing:
            raise CotuneError(f"weights do not match the adapters: {missing[:4]} ...")
        for k, p in self.fitter.named.items():
            p.copy_(weights[k].to(p.dtype))

    def answer(self, frame: bytes) -> bytes:
        """Apply the capture frame of update ``self.update + 1``: one optimizer step; the new weights."""
        update, msgs = decode_capture(frame)
        if update != self.update + 1:
            raise CotuneError(f"capture of update {update}, but this worker is at update {self.update}")
        try:
            for m in msgs:
                self.fitter.add(m)
        except Exception:
            self.fitter.discard()
            raise
        stats = self.fitter.step()
        self.update = update
        return encode_weights(update, self.fitter.weights(), stats)

    def state_dict(self) -> dict[str, Any]:
        return {"update": self.update, "fitter": self.fitter.state_dict(),
                "weights": {k: v.clone() for k, v in self.fitter.weights().items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.load_weights(state["weights"])
        self.fitter.load_state_dict(state["fitter"])
        self.update = int(state["update"])


class RemoteFitter:
    """The server's end (a ``FitterHandle``): frames out through ``outbox``, checked weights in through ``deliver``.

    ``awaiting`` is the update whose weights have not come back yet (``None``: the adapters are current);
    the service keeps the tenant out of rounds until then.
    """

    kind = "remote"

    def __init__(self, adapters: dict[str, Adapter], optim: OptimConfig, name: str = "default",
                 link: Callable[[bytes], bytes] | None = None) -> None:
        self.name = name
        self.adapters = adapters
        self.optim = optim
        self.named = {f"{path}.{k}": p for path, ad in adapters.items() for k, p in ad.named_parameters()}
        self.window: list[Message] = []
        self.updates = 0  # frames sent
        self.awaiting: int | None = None
        self.link = link
        #: ``outbox(update, frame)``: where frames go when there is no ``link`` (set by the service)
        self.outbox: Callable[[int, bytes], None] | None = None
        self.last_frame_bytes = 0  # the size of the last capture frame (the frame itself is the outbox's)
        self.bytes_out = self.bytes_in = 0

    def setup(self) -> dict[str, Any]:
        return describe(self.adapters, self.optim)

    def weights(self) -> dict[str, torch.Tensor]:
        return {k: p.detach() for k, p in self.named.items()}

    def submit(self, msg: Message) -> None:
        self.window.append(msg)

    def step(self) -> dict[str, Any]:
        if self.awaiting is not None:
            raise CotuneError(f"remote fitter {self.name!r}: update {self.awaiting}'s weights have not come back")
        self.updates += 1
        frame = encode_capture(self.updates, self.window)
        n, self.window = len(self.window), []
        self.awaiting, self.last_frame_bytes = self.updates, len(frame)
        self.bytes_out += len(frame)
        if self.link is not None:
            self.deliver(self.link(frame))
        elif self.outbox is not None:
            self.outbox(self.updates, frame)
        return {"updated": True, "grad_norm": math.nan, "fit_s": 0.0, "messages": n, "lr": math.nan}

    @torch.no_grad()
    def deliver(self, data: bytes) -> dict[str, Any]:
        """Check the weights frame of the awaited update and make it the tenant's weights; its stats."""
        update, tensors, stats = decode_weights(data)
        if self.awaiting is None or update != self.awaiting:
            raise StaleUpdate(f"weights of update {update}, but the server awaits "
                              f"{'none' if self.awaiting is None else f'update {self.awaiting}'}")
        if set(tensors) != set(self.named):
            diff = sorted(set(tensors) ^ set(self.named))
            raise CotuneError(f"weights frame names {diff[:3]} ... do not match this job's adapter parameters")
        for k, p in self.named.items():
            t = tensors[k]
            if tuple(t.shape) != tuple(p.shape) or t.dtype != p.dtype:
                raise CotuneError(f"weights {k}: {tuple(t.shape)} {t.dtype}, expected {tuple(p.shape)} {p.dtype}")
            if not torch.isfinite(t).all():
                raise CotuneError(f"weights {k} hold NaN or infinity: refused, the adapter stays as it was")
        for k, p in self.named.items():
            p.copy_(tensors[k].to(p.device))
        self.bytes_in += len(data)
        self.awaiting = None
        return stats

    def discard(self) -> None:
        self.window = []

    def state_dict(self) -> dict[str, Any]:
        return {"remote_updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.updates = int(state.get("remote_updates", 0))
        self.awaiting = None

    def close(self) -> None:
        self.outbox = None


def loopback(adapters: dict[str, Adapter], optim: OptimConfig, name: str = "default") -> RemoteFitter:
    """A remote fitter answered in this process by a ``RemoteWorker``, through the same bytes."""
    fitter = RemoteFitter(adapters, optim, name)
    worker = RemoteWorker(fitter.setup(), fitter.weights())
    fitter.link = worker.answer
    return fitter
