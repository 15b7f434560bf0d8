"""kron (AdaKron) and its mixture MAdaKron — DESIGN §2 "kron".

For ``u ∈ R^d``: ``a = W_2 u + b_2 ∈ R^4``, ``v = W_1 u + b_1 ∈ R^{r/4}``, ``z = a ⊗ v ∈ R^r``
(``z[i·r/4 + j] = a_i v_j``) and ``g(u) = W_B GELU(z) + b_B``. A sequential adapter after the feed-forward
output projection; not mergeable (``z`` is quadratic in ``u``).

Mixture (MAdaKron, ``mixture=partial|full``, ``num_experts=E``): ``partial`` keeps E copies of the 4-dim
factor ``(W_2, b_2)``; ``full`` keeps E copies of both down factors; the up projection is shared. In
training each expert group draws one expert uniformly per forward call, only from
``self.generator(seed, device)``, so gradient learning's fitter replays the server's draws from the seed.
In eval the experts are averaged: since ``z`` is bilinear in ``(a, v)`` and the two groups are drawn
independently, ``(mean a) ⊗ (mean v)`` is exactly the expected pre-GELU ``z`` — inference costs one adapter.

``consistency_loss`` is the optional MAdaKron regulariser for two forwards with different draws.

Saved tensor names: ``down_a.weight (E_a, 4, d)``, ``down_a.bias (E_a, 4)``, ``down_v.weight (E_v, r/4, d)``,
``down_v.bias (E_v, r/4)``, ``up.weight (d_out, r)``, ``up.bias (d_out)`` (``E = 1`` without a mixture).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from cotune.adapters.base import Adapter, AdapterConfig, register
from cotune.errors import CotuneError

#: After the feed-forward output projection (BERT's ``output.dense``, not ``attention.output.dense``).
KRON_DEFAULT_TARGETS: dict[str, list[str] | str] = {
    "bert": r".*layer\.\d+\.output\.dense",
    "roberta": r".*layer\.\d+\.output\.dense",
    "deberta": r".*layer\.\d+\.output\.dense",
    "deberta-v2": r".*layer\.\d+\.output\.dense",
    "gpt2": ["mlp.c_proj"],
    "llama": ["mlp.down_proj"],
}

MIXTURES = ("none", "partial", "full")
#: The Kronecker factor ``a`` has this fixed width (AdaKron's ``sharing_down = 4``).
A_DIM = 4


@dataclass
class KronConfig(AdapterConfig):
    """``r``: width of ``z`` (multiple of 4); ``mixture``: none | partial | full; ``num_experts``: E for a
    mixture (default 2, the AdaKron README's value); ``init_std``: std of every weight (biases are zero)."""

    r: int = 48
    mixture: str = "none"
    num_experts: int | None = None
    init_std: float = 0.02

    def __post_init__(self) -> None:
        if not isinstance(self.r, int) or self.r <= 0 or self.r % A_DIM:
            raise CotuneError(
                f"kron needs r to be a positive multiple of {A_DIM} (z = a ⊗ v with a ∈ R^{A_DIM}), got r={self.r}"
            )
        if self.mixture not in MIXTURES:
            raise CotuneError(f"unknown kron mixture {self.mixture!r}; valid: {list(MIXTURES)}")
        if self.mixture == "none" and self.num_experts not in (None, 1):
            raise CotuneError(
                f"num_experts={self.num_experts} needs a mixture: set mixture=partial (experts of the 4-dim factor) "
                "or mixture=full (experts of both down factors)"
            )
        if self.num_experts is not None and (not isinstance(self.num_experts, int) or self.num_experts < 1):
            raise CotuneError(f"num_experts must be a positive integer, got {self.num_experts!r}")

    @property
    def experts(self) -> int:
        """E: 1 without a mixture, else ``num_experts`` (default 2)."""
        return 1 if self.mixture == "none" else (self.num_experts or 2)


def _widths(site: str, d_in: int, d_out: int) -> tuple[int, int]:
    """(width of u, width of h) at a site: the module's output for sequential/replace, its input for pre."""
    if site == "sequential":
        return d_out, d_out
    if site == "pre":
        return d_in, d_in
    return d_in, d_out


class _Factor(nn.Module):
    """``E`` experts of one affine down factor ``u -> W u + b`` (weights ``(E, k, d)``, biases ``(E, k)``)."""

    def __init__(self, experts: int, k: int, d: int, std: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(experts, k, d) * std)
        self.bias = nn.Parameter(torch.zeros(experts, k))

    def expert(self, idx: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Expert ``idx`` (a 1-element index tensor), or the uniform average when ``idx`` is ``None``."""
        if idx is None:
            return self.weight.mean(0), self.bias.mean(0)
        return self.weight.index_select(0, idx)[0], self.bias.index_select(0, idx)[0]


@register("kron", KronConfig, peft_type="ADAKRON", default_targets=KRON_DEFAULT_TARGETS)
class Kron(Adapter):
    site = "sequential"

    def __init__(self, config: KronConfig, d_in: int, d_out: int, base: nn.Module | None = None) -> None:
        super().__init__(config, d_in, d_out, base)
        du, dh = _widths(self.site, d_in, d_out)
        e = config.experts
        self.down_a = _Factor(e if config.mixture in ("partial", "full") else 1, A_DIM, du, config.init_std)
        self.down_v = _Factor(e if config.mixture == "full" else 1, config.r // A_DIM, du, config.init_std)
        self.up = nn.Linear(config.r, dh)
        nn.init.normal_(self.up.weight, std=config.init_std)  # not zero: AdaKron's up projection is random
        nn.init.zeros_(self.up.bias)

    @property
    def stochastic(self) -> bool:
        return self.training and self.config.experts > 1

    def draw(self, seed: int | None, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """The experts one training call uses: ``{group: 1-element index}`` for every group with E > 1.

        Groups draw independently and uniformly, in the fixed order ``down_a`` then ``down_v``, from
        ``generator(seed)`` only (the global RNG when ``seed`` is ``None``).
        """
        gen = self.generator(seed, torch.device(device))
        out: dict[str, torch.Tensor] = {}
        for name in ("down_a", "down_v"):
            n = getattr(self, name).weight.shape[0]
            if n > 1:
                out[name] = torch.randint(n, (1,), generator=gen, device=device)
        return out

    def forward(self, u: torch.Tensor, seed: int | None = None) -> torch.Tensor:
        picks = self.draw(seed, u.device) if self.stochastic else {}
        w2, b2 = self.down_a.expert(picks.get("down_a"))
        w1, b1 = self.down_v.expert(picks.get("down_v"))
        a = F.linear(u, w2, b2)  # (..., 4)
        v = F.linear(u, w1, b1)  # (..., r/4)
        z = (a.unsqueeze(-1) * v.unsqueeze(-2)).flatten(-2)  # z[i·r/4 + j] = a_i v_j
        return self.up(F.gelu(z))


def consistency_loss(logits1: torch.Tensor, logits2: torch.Tensor) -> torch.Tensor:
    """MAdaKron's consistency term ``½[KL(sg p₂‖p₁) + KL(sg p₁‖p₂)]`` for two forwards with different expert
    draws (``p = softmax(logits)`` over the last axis; mean over the other axes).

    Each KL has its target detached, so the first term trains the first forward towards the second and
    vice versa. The trainer adds it (times a weight) to the task loss; no engine needs to know about it.
    """
    lp1 = F.log_softmax(logits1.float(), dim=-1).reshape(-1, logits1.shape[-1])
    lp2 = F.log_softmax(logits2.float(), dim=-1).reshape(-1, logits2.shape[-1])
    kl_21 = F.kl_div(lp1, lp2.detach(), log_target=True, reduction="batchmean")  # KL(sg p2 || p1)
    kl_12 = F.kl_div(lp2, lp1.detach(), log_target=True, reduction="batchmean")  # KL(sg p1 || p2)
    return 0.5 * (kl_21 + kl_12)
