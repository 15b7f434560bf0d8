"""What travels from the server to a fitter, in which dtype, and how many bytes it costs.

A ``Pair`` carries one call's raw ``u`` and ``δ`` (batch-first, as captured). For adapters whose output
is affine in ``u`` (``s·g(u) = D u + c`` with ``D = delta_weight()``), the gradient of the summed local
objective only needs ``S = Σ_tokens δ uᵀ`` and ``Σ_tokens δ``; a ``Statistic`` ships those instead when
they are smaller than the pairs (``d_out·d_in + d_out < tokens·(d_in + d_out)``). Whether a family is
affine is not looked up by name: ``affine_in_u`` checks it numerically on a randomised copy.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from cotune.adapters.base import Adapter
from cotune.adapters.site import AdaptedModule
from cotune.engines.gradient_learning.capture import SiteRecord
from cotune.errors import CotuneError

WIRE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class Pair:
    """One call of one site: the adapter input ``u`` and ``δ = ∂L/∂h``, batch-first; the call's seed."""

    path: str
    call: int
    u: torch.Tensor
    delta: torch.Tensor
    seed: int | None = None
    training: bool = False

    @property
    def nbytes(self) -> int:
        return _nbytes(self.u) + _nbytes(self.delta)


@dataclass
class Statistic:
    """The exact sufficient statistic of one call for an affine adapter: ``S = Σ δ uᵀ`` and ``Σ δ``."""

    path: str
    call: int
    s: torch.Tensor  # (width of h, width of u)
    delta_sum: torch.Tensor  # (width of h,)

    @property
    def nbytes(self) -> int:
        return _nbytes(self.s) + _nbytes(self.delta_sum)


Message = Pair | Statistic


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _on_wire(t: torch.Tensor, dtype: torch.dtype, copy: bool = True) -> torch.Tensor:
    # Integer inputs (token ids at an embedding site) travel as they are; floats in the wire dtype. A fresh
    # tensor for a remote fitter, so its placement may move it to shared memory without touching the server's
    # activations; an in-memory fitter (``copy=False``) reads the server's own tensor where the dtype allows.
    # A float64 tensor (a model in double) is never narrowed by the fp32 wire: "fp32" means full precision.
    if not t.is_floating_point():
        return t.detach().clone() if copy else t.detach()
    if t.dtype == torch.float64 and dtype == torch.float32:
        dtype = torch.float64
    return t.detach().to(dtype, copy=copy)


def site_widths(ad: Adapter) -> tuple[int, int]:
    """The widths of ``u`` and of ``h`` at this adapter's site."""
    if ad.site == "sequential":
        return ad.d_out, ad.d_out
    if ad.site == "pre":
        return ad.d_in, ad.d_in
    return ad.d_in, ad.d_out


@torch.no_grad()
def affine_in_u(ad: Adapter, trials: int = 3) -> bool:
    """True when ``s·g(u) = delta_weight()·u + s·g(0)`` holds for this adapter (checked numerically).

    The check runs on a copy with random weights (zero-initialised factors would make any map pass) in
    eval mode; a stochastic-in-training adapter still falls back to pairs per call while training.
    """
    try:
        probe = copy.deepcopy(ad).float().eval()
        gen = torch.Generator(device="cpu").manual_seed(1234)
        for p in probe.parameters():
            p.copy_(torch.randn(p.shape, generator=gen).to(p.device) * 0.1)
        d = probe.delta_weight()
        if d is None:
            return False
        dev = d.device
        d_u, d_h = site_widths(probe)
        if tuple(d.shape) != (d_h, d_u):
            return False
        u = torch.randn(trials, d_u, generator=gen).to(dev)
        lhs = AdaptedModule.delta(probe, u)
        rhs = u @ d.float().T + AdaptedModule.delta(probe, torch.zeros(1, d_u, device=dev))
        scale = float(lhs.abs().max()) + 1e-12
        return lhs.shape == rhs.shape and float((lhs - rhs).abs().max()) <= 1e-4 * scale
    except Exception:  # noqa: BLE001 - a family that cannot be probed simply ships raw pairs
        return False


class Wire:
    """Turns captured records into messages and counts the bytes.

    ``dtype``: ``fp32`` or ``bf16`` for floating tensors on the wire. ``statistic``: per site path, whether
    its adapter is affine in ``u`` (see ``affine_in_u``); ``mode`` is ``auto`` (ship the statistic when it
    is smaller on a real wire: ``remote`` fitters only), ``always`` (whenever the site supports it) or ``off``.

    Why ``auto`` needs ``remote``: ``Σ δ uᵀ`` trades the server's ``O(tokens·d_in·d_out)`` FLOPs for bytes.
    A fitter in the server's memory (inline, thread) reads the pairs where they are, so the trade only
    costs: on MiniLM with 8 LoRA tenants it slowed a mixed step by 22 %.
    """

    def __init__(
        self, dtype: str = "fp32", statistic: dict[str, bool] | None = None, mode: str = "auto", remote: bool = False
    ) -> None:
        if dtype not in WIRE_DTYPES:
            raise CotuneError(f"unknown wire_dtype {dtype!r}; valid: {', '.join(WIRE_DTYPES)}")
        if mode not in ("auto", "always", "off"):
            raise CotuneError(f"unknown sufficient_statistic {mode!r}; valid: auto, always, off")
        self.dtype = WIRE_DTYPES[dtype]
        self.statistic = statistic or {}
        self.mode = mode
        self.remote = remote
        self.reset()

    def reset(self) -> None:
        """Zero the counters (the engine reads and resets them every step)."""
        self.bytes = 0  # what was shipped
        self.pair_bytes_fp32 = 0  # what raw fp32 pairs would have cost
        self.pairs = 0
        self.statistics = 0

    def counters(self) -> dict[str, float]:
        return {
            "wire_bytes": float(self.bytes),
            "wire_bytes_fp32_pairs": float(self.pair_bytes_fp32),
            "pairs": float(self.pairs),
            "statistics": float(self.statistics),
        }

    def pack(self, rec: SiteRecord, ad: Adapter) -> Message:
        """The message for one captured call (``rec.delta`` must be set)."""
        if rec.delta is None:
            raise CotuneError(f"site {rec.path!r}: no δ was captured for call {rec.call}")
        rec.check_unchanged()
        u, delta = rec.u, rec.delta
        self.pair_bytes_fp32 += (u.numel() * (4 if u.is_floating_point() else u.element_size())) + delta.numel() * 4
        msg: Message
        if self._use_statistic(rec, ad):
            d_u, d_h = site_widths(ad)
            u2 = u.reshape(-1, d_u).to(ad.compute_dtype)
            d2 = delta.reshape(-1, d_h).to(ad.compute_dtype)
            # The sums over every token are accumulated in float64 and rounded once to the adapter's dtype: an
            # fp32 product's error depends on the BLAS's summation order, and with AVX-512 MKL it put loretta_rep
            # at I = 4 at 2.4x backprop's own fp32 rounding (0.84x accumulated in float64; the wire is unchanged).
            wide = d2.double()
            s, dsum = wide.T @ u2.double(), wide.sum(0)
            msg = Statistic(rec.path, rec.call, _on_wire(s.to(d2.dtype), self.dtype),
                            _on_wire(dsum.to(d2.dtype), self.dtype))
            self.statistics += 1
        else:
            u_, d_ = _on_wire(u, self.dtype, self.remote), _on_wire(delta, self.dtype, self.remote)
            msg = Pair(rec.path, rec.call, u_, d_, rec.seed, rec.training)
            self.pairs += 1
        self.bytes += msg.nbytes
        return msg

    def _use_statistic(self, rec: SiteRecord, ad: Adapter) -> bool:
        if self.mode == "off" or not self.statistic.get(rec.path, False) or not rec.u.is_floating_point():
            return False
        if rec.training and ad.stochastic:  # each call draws its own mask: only raw pairs can replay it
            return False
        d_u, d_h = site_widths(ad)
        if rec.u.shape[-1] != d_u or rec.delta is None or rec.delta.shape[-1] != d_h:
            return False  # the fitter will name the shape error
        if self.mode == "always":
            return True
        if not self.remote:
            return False
        tokens = rec.u.numel() // d_u
        return d_h * d_u + d_h < tokens * (d_u + d_h)
