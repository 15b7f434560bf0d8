"""Tensor-train (TT) linear layers: the math behind LoRETTA.

A TT layer stores cores ``G_k ∈ R^{r_{k-1} × n_k × r_k}`` (``r_0 = r_d = 1``, ``Π n_k = d_in·d_out``) of one
tensor whose row-major reshape is the weight: ``W = reshape(G_1·G_2⋯G_d, (d_in, d_out))`` and
``y = u W + b``. The flat shape ``[n_1, …, n_d]`` need not split at the ``d_in``/``d_out`` boundary (the
published ``[4,8,8,8,8,4]`` for 1024→64 does not), so both ways of computing the layer handle any shape:

* ``materialize``: build ``W`` by chaining the cores (cheap for adapter sizes), then one matmul;
* ``cores``: contract the input with the cores one by one and never form ``W``. Cores that straddle the
  ``d_in``/``d_out`` boundary are first merged into one core and split into an input part and an output
  part, so the contraction is exact for every shape.

No PyPI TT library implements this plain TT-of-a-reshaped-matrix format (they use TT-matrix/TTM cores
with separate row and column modes), hence this small module.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from cotune.errors import CotuneError

#: The shapes the LoRETTA paper/code uses, keyed by (d_in, d_out); the reverse direction uses the same list
#: (its parameter count is identical: the lists are palindromes or their cores have the same sizes).
PUBLISHED_SHAPES: dict[tuple[int, int], list[int]] = {
    (768, 64): [8, 8, 12, 8, 8],  # loretta_adp, H = 768
    (1024, 64): [4, 8, 8, 8, 8, 4],  # loretta_adp, H = 1024
    (4096, 64): [16, 16, 16, 4, 4, 4],  # loretta_adp, H = 4096 (Llama-2-7B)
    (768, 8): [8, 8, 12, 8],  # loretta_rep, r = 8, H = 768
    (4096, 8): [16, 16, 8, 4, 4],  # loretta_rep, r = 8, H = 4096
    (768, 768): [12, 8, 8, 8, 8, 12],  # tensorized classifier dense, H = 768
}

COMPUTE_MODES = ("auto", "materialize", "cores")


def auto_mode(d_in: int, d_out: int, rank: int) -> str:
    """``cores`` when the dense ``W`` is large next to the per-row contraction cost, else ``materialize``.

    Per input row, materialising costs about ``d_in·d_out`` (plus building ``W`` once), contracting about
    ``(d_in + d_out)·r²`` flops in many small kernels (a measured factor 3 on CPU). This picks
    ``materialize`` for the adapters (768×64: 8.6 ms vs 16.5 ms fwd+bwd at 4096 rows) and ``cores`` for
    the 768×768 head (1.0 ms vs 6.0 ms at 32 rows). It depends on the shape only, never on the batch, so a
    layer always computes the same way (gradient learning's fitter recomputes exactly what the server did).
    """
    return "cores" if d_in * d_out > 3 * (d_in + d_out) * rank * rank else "materialize"


def factorize(n: int, target: int = 8, largest: int = 16) -> list[int]:
    """Split ``n`` into factors near ``target``: repeatedly take the divisor in ``[2, largest]`` closest to
    ``target`` (ties: the larger), and keep the remainder whole once it is ``<= largest``.

    This reproduces the published factorisations of the BERT sizes (``768 -> [8, 8, 12]``, ``64 -> [8, 8]``)
    and gives e.g. ``384 -> [8, 8, 6]`` for MiniLM. A prime factor above ``largest`` stays as one factor.
    """
    if n < 1:
        raise CotuneError(f"cannot factorize {n}: TT dimensions must be positive")
    out: list[int] = []
    while n > largest:
        divs = [k for k in range(2, largest + 1) if n % k == 0]
        if not divs:
            break
        k = min(divs, key=lambda k: (abs(k - target), -k))
        out.append(k)
        n //= k
    if n > 1 or not out:
        out.append(n)
    return out


def default_tt_shape(d_in: int, d_out: int) -> list[int]:
    """The published shape for ``(d_in, d_out)`` (either order), else ``factorize(d_in) + factorize(d_out)``."""
    for key in ((d_in, d_out), (d_out, d_in)):
        if key in PUBLISHED_SHAPES:
            return list(PUBLISHED_SHAPES[key])
    return factorize(d_in) + factorize(d_out)


def check_tt_shape(shape: Sequence[int], d_in: int, d_out: int) -> list[int]:
    """``shape`` as a list of ints, or a ``CotuneError`` naming its product when it is not ``d_in·d_out``."""
    try:
        dims = [int(n) for n in shape]
    except (TypeError, ValueError) as e:
        raise CotuneError(f"tt_shape must be a list of positive integers, got {shape!r}") from e
    if not dims or any(n < 1 for n in dims):
        raise CotuneError(f"tt_shape must be a non-empty list of positive integers, got {dims}")
    prod = math.prod(dims)
    if prod != d_in * d_out:
        raise CotuneError(
            f"tt_shape {dims} has product {prod:,} but a {d_in}x{d_out} layer needs d_in*d_out = {d_in * d_out:,}; "
            f"e.g. {default_tt_shape(d_in, d_out)}"
        )
    return dims


def tt_ranks(num_cores: int, rank: int) -> list[int]:
    """``[1, rank, …, rank, 1]`` (``num_cores + 1`` entries)."""
    if rank < 1:
        raise CotuneError(f"tt_rank must be >= 1, got {rank}")
    return [1] + [rank] * (num_cores - 1) + [1]


def tt_full(cores: Sequence[torch.Tensor]) -> torch.Tensor:
    """The flat tensor ``G_1·G_2⋯G_d`` as a vector of length ``Π n_k`` (row-major over ``n_1 … n_d``)."""
    m = cores[0].reshape(-1, cores[0].shape[-1])  # (n_1, r_1)
    for g in cores[1:]:
        r, n, r2 = g.shape
        m = (m @ g.reshape(r, n * r2)).reshape(-1, r2)  # (n_1⋯n_k, r_k)
    return m.reshape(-1)


def tt_matrix(cores: Sequence[torch.Tensor], d_in: int, d_out: int) -> torch.Tensor:
    """``W = reshape(G_1⋯G_d, (d_in, d_out))``."""
    return tt_full(cores).reshape(d_in, d_out)


def split_cores(
    cores: Sequence[torch.Tensor], d_in: int
) -> tuple[list[torch.Tensor], torch.Tensor | None, list[torch.Tensor]]:
    """(input cores, boundary core or ``None``, output cores) for the core-by-core contraction.

    With prefix products ``P_k = n_1⋯n_k``: when some ``P_i = d_in`` the cores split cleanly there.
    Otherwise cores ``j…k`` (``j`` the last start with ``P_{j-1} | d_in``, ``k`` the first end with
    ``d_in | P_k``) are merged into one core of size ``P_k/P_{j-1} = a·b``, returned reshaped to
    ``(r_{j-1}, a, b, r_k)`` with ``a = d_in/P_{j-1}`` input and ``b = P_k/d_in`` output positions.
    """
    prefix = [1]
    for g in cores:
        prefix.append(prefix[-1] * g.shape[1])
    if d_in in prefix:
        i = prefix.index(d_in)
        return list(cores[:i]), None, list(cores[i:])
    j = max(i for i in range(1, len(cores) + 1) if prefix[i - 1] < d_in and d_in % prefix[i - 1] == 0)
    k = min(i for i in range(j, len(cores) + 1) if prefix[i] > d_in and prefix[i] % d_in == 0)
    merged = cores[j - 1]
    for g in cores[j:k]:
        r, n, r2 = g.shape
        merged = (merged.reshape(-1, merged.shape[-1]) @ g.reshape(r, n * r2)).reshape(merged.shape[0], -1, r2)
    a, b = d_in // prefix[j - 1], prefix[k] // d_in
    boundary = merged.reshape(merged.shape[0], a, b, merged.shape[-1])
    return list(cores[: j - 1]), boundary, list(cores[k:])


def tt_contract(u: torch.Tensor, cores: Sequence[torch.Tensor], d_in: int, d_out: int) -> torch.Tensor:
    """``u W`` computed core by core, without forming ``W`` (``u``: ``(..., d_in)``)."""
    lead = u.shape[:-1]
    ins, boundary, outs = split_cores(cores, d_in)
    t = u.reshape(-1, d_in, 1)  # (N, remaining input positions, r_0 = 1)
    for g in ins:  # the leading remaining input index is the current core's (row-major order)
        r, n, r2 = g.shape
        t = torch.einsum("bnmr,rns->bms", t.reshape(t.shape[0], n, -1, r), g)
    if boundary is not None:  # t: (N, a, r) -> (N, b, r')
        t = torch.einsum("bar,rajs->bjs", t, boundary)
    else:  # t: (N, 1, r) -> no output positions yet
        t = t.reshape(t.shape[0], 1, t.shape[-1])
    for g in outs:  # append this core's output index as the lowest-order one so far
        t = torch.einsum("bjr,rns->bjns", t, g).reshape(t.shape[0], -1, g.shape[-1])
    return t.reshape(*lead, d_out)


def tt_linear(
    u: torch.Tensor,
    cores: Sequence[torch.Tensor],
    bias: torch.Tensor | None,
    d_in: int,
    d_out: int,
    mode: str = "materialize",
) -> torch.Tensor:
    """``u W + b`` for ``W`` given by TT ``cores``, by materialising ``W`` or contracting core by core."""
    cores = [g.to(u.dtype) for g in cores]
    if mode == "materialize":
        y = u @ tt_matrix(cores, d_in, d_out)
    elif mode == "cores":
        y = tt_contract(u, cores, d_in, d_out)
    else:
        raise CotuneError(f"unknown TT compute mode {mode!r}; valid: materialize, cores")
    return y if bias is None else y + bias.to(u.dtype)


class TTLinear(nn.Module):
    """``y = u W + b`` with ``W`` stored as a TT (``cores.0 … cores.{d-1}``).

    Init: core ``k`` is ``randn / √r_k · (1/√(d_in+d_out))^(1/d)``, so every entry of ``W`` has variance
    ``1/(d_in+d_out)`` (the rank sums cancel the ``1/r_k``); bias uniform in ``±1/√d_out``.
    ``mode``: ``materialize`` (one chain of small matmuls then a dense matmul), ``cores`` (core by core), or
    ``auto`` (default: the faster of the two for this shape, see ``auto_mode``). Both agree to rounding.
    """

    def __init__(
        self,
        d_in: int,
        d_out: int,
        shape: Sequence[int] | None = None,
        rank: int = 5,
        bias: bool = True,
        mode: str = "auto",
    ) -> None:
        super().__init__()
        if mode not in COMPUTE_MODES:
            raise CotuneError(f"unknown TT compute mode {mode!r}; valid: {list(COMPUTE_MODES)}")
        self.d_in, self.d_out = d_in, d_out
        self.mode = auto_mode(d_in, d_out, rank) if mode == "auto" else mode
        self.shape = check_tt_shape(shape if shape is not None else default_tt_shape(d_in, d_out), d_in, d_out)
        self.ranks = tt_ranks(len(self.shape), rank)
        scale = (1.0 / math.sqrt(d_in + d_out)) ** (1.0 / len(self.shape))
        self.cores = nn.ParameterList(
            nn.Parameter(torch.randn(self.ranks[k], n, self.ranks[k + 1]) / math.sqrt(self.ranks[k + 1]) * scale)
            for k, n in enumerate(self.shape)
        )
        self.bias = (
            nn.Parameter(torch.empty(d_out).uniform_(-1 / math.sqrt(d_out), 1 / math.sqrt(d_out))) if bias else None
        )

    def weight(self) -> torch.Tensor:
        """The materialised ``W`` of shape ``(d_in, d_out)`` (note: not ``nn.Linear``'s layout)."""
        return tt_matrix(list(self.cores), self.d_in, self.d_out)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        return tt_linear(u, list(self.cores), self.bias, self.d_in, self.d_out, self.mode)

    def extra_repr(self) -> str:
        return f"d_in={self.d_in}, d_out={self.d_out}, shape={self.shape}, ranks={self.ranks}, mode={self.mode!r}"
