"""Dropout masks that are the same bits on every device, so a fitter replays a server's draw from its seed.

Gradient learning ships a stochastic adapter's per-call seed, not its mask, and the fitter recomputes the
adapter's forward wherever its owner runs it (a CPU worker behind a GPU server). ``torch.Generator`` cannot
serve that: CPU (Mersenne Twister) and CUDA (Philox) generators seeded alike draw different numbers. So a
seeded mask is a counter-based hash of (seed, stream, element index) in int64 arithmetic that never
overflows, which every backend computes exactly; written by hand because torch offers no RNG whose draws
agree across devices. Small integer draws (MAdaKron's experts, CoLA's pairs) use a CPU generator instead.
"""

from __future__ import annotations

import torch

__all__ = ["dropout", "keep_mask", "mix32"]

_M32 = 0xFFFFFFFF


def mix32(x: torch.Tensor | int) -> torch.Tensor | int:
    """Chris Wellons' ``lowbias32`` integer hash of values in ``[0, 2**32)``.

    Both multipliers are below 2**31, so each product stays below 2**63: int64 on any device, or a Python
    int, gives the same bits (no overflow, and right shifts of non-negative values are logical).
    """
    x = x ^ (x >> 16)
    x = (x * 0x21F0AAAD) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x735A2D97) & _M32
    return x ^ (x >> 15)


def keep_mask(like: torch.Tensor, p: float, seed: int | None, stream: int = 0) -> torch.Tensor:
    """A {0, 1} mask shaped and typed like ``like`` that keeps each element with probability ``1 - p``.

    With a ``seed`` the mask is a function of (seed, stream, element index) only, identical on every device;
    ``stream`` tells apart several masks of one call (one per HydraLoRA head, per CoLA pair). Without a seed
    (nothing replays the draw) it is torch's global RNG. Costs a few int64 temporaries the size of ``like``.
    """
    if seed is None:
        return torch.empty_like(like).bernoulli_(1 - p)
    seed, stream = int(seed), int(stream)
    k1 = mix32(mix32((seed & _M32) ^ mix32(stream & _M32)) ^ ((seed >> 32) & _M32))
    k2 = mix32(k1 ^ 0x9E3779B9)
    idx = torch.arange(like.numel(), device=like.device, dtype=torch.int64)
    h = mix32(mix32((idx + k1) & _M32) ^ k2)
    keep = h >= round(p * 2**32)  # an integer compare: the same decision wherever it runs
    return keep.reshape(like.shape).to(like.dtype)


def dropout(x: torch.Tensor, p: float, seed: int | None, stream: int = 0) -> torch.Tensor:
    """Inverted dropout with :func:`keep_mask`: ``x · mask / (1 − p)`` (``x`` itself when ``p <= 0``)."""
    if p <= 0:
        return x
    return x * keep_mask(x, p, seed, stream) / (1 - p)
