"""kron (AdaKron) and its mixture MAdaKron.

For ``u ∈ R^d``: ``a = W_2 u + b_2 ∈ R^4``, ``v = W_1 u + b_1 ∈ R^{r/4}``, ``z = a ⊗ v ∈ R^r``
(``z[i·r/4 + j] = a_i v_j``) and ``g(u) = W_B GELU(z) + b_B``. A sequential adapter after the feed-forward
output projection; not mergeable (``z`` is quadratic in ``u``).

Mixture (MAdaKron, ``mixture=partial|full``, ``num_experts=E``): ``partial`` keeps E copies of the 4-dim
factor ``(W_2, b_2)``; ``full`` keeps E copies of both down factors; the up projection is shared. In
training each expert group draws one expert uniformly per forward call, only from a CPU
``self.generator(seed)``, so gradient learning's fitter, on any device, replays the server's draws from the seed;
only the drawn expert enters the graph, so the others get no gradient and no optimizer step (AdaMix's).
In eval the experts are averaged: since ``z`` is bilinear in ``(a, v)`` and the two groups are drawn
independently, ``(mean a) ⊗ (mean v)`` is exactly the expected pre-GELU ``z`` — inference costs one adapter.
The experts of a group start as copies of one draw (AdaMix, which AdaKron builds on, deep-copies its expert),
so at initialisation MAdaKron computes AdaKron's function in training and in eval; they part only through the
different batches each is drawn for. (Independent draws would start the eval average at 1/√E of one expert's
scale, and train through E unrelated random projections of the input.)

``consistency_loss`` is the optional MAdaKron regulariser for two forwards with different draws; the config's
``consistency_loss`` (its weight; AdaKron's ``--use_consistency_loss 1`` is weight 1) makes ``cotune train`` add it.

AdaKron's own flags, with the meaning its README gives them:

* ``sharing_up`` (bool): true puts experts in *both* down factors (``mixture=full``), false only in the
  ``sharing_down``-wide one (``mixture=partial``); it needs ``num_experts > 1`` (``--apply_expert_soup``).
* ``sharing_down``: the width of the expert factor ``a`` ("experts output dimension, we use 4"); ``r`` must be a
  multiple of it and ``v`` has ``r / sharing_down`` entries. ``0`` (what the README's command passes) means 4.
* ``inference_level`` (AdaMix's, which AdaKron builds on), how experts combine in eval: ``3`` (default) averages
  their weights (the "expert soup" above: one adapter); ``1`` draws one expert per group for each sequence and
  ``0`` for each token (random routing, as in training but finer-grained).

Saved tensor names (``k = sharing_down``, 4 by default; ``e`` counts experts from 0): ``down_a.weight.e (k, d)``,
``down_a.bias.e (k)``, ``down_v.weight.e (r/k, d)``, ``down_v.bias.e (r/k)``, ``up.weight (d_out, r)``,
``up.bias (d_out)`` (only ``e = 0`` without a mixture). Each expert is its own tensor so that the optimizer
skips the experts a step did not draw, as AdaMix's does (``_Factor``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

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
#: The default width of the Kronecker factor ``a`` (AdaKron's ``sharing_down = 4``).
A_DIM = 4
#: AdaMix's inference levels: 0 token-level routing, 1 sequence-level routing, 3 weight average ("expert soup").
INFERENCE_LEVELS = (0, 1, 3)


@dataclass
class KronConfig(AdapterConfig):
    """``r``: width of ``z`` (multiple of ``sharing_down``); ``mixture``: none | partial | full; ``num_experts``: E
    for a mixture (default 2, the AdaKron README's value); ``init_std``: std of every weight (biases are zero);
    ``sharing_up``, ``sharing_down``, ``inference_level``, ``consistency_loss``: AdaKron's flags (module docstring).
    """

    # benchmarks/lr_sweep.across over SST-2 and, to convergence, STS-B, CoLA and MRPC (docs/RESULTS.md)
    default_lr: ClassVar[float] = 0.001
    r: int = 48
    mixture: str = "none"
    num_experts: int | None = None
    init_std: float = 0.02
    sharing_down: int = A_DIM
    sharing_up: bool | None = None
    inference_level: int = 3
    consistency_loss: float = 0.0

    def __post_init__(self) -> None:
        if self.sharing_down == 0:  # the AdaKron README's command passes 0 while its text says 4 is used
            self.sharing_down = A_DIM
        k = self.sharing_down
        if not isinstance(k, int) or k < 1:
            raise CotuneError(f"kron sharing_down (the width of the expert factor a) must be >= 1, got {k!r}")
        if not isinstance(self.r, int) or self.r <= 0 or self.r % k:
            raise CotuneError(
                f"kron needs r to be a positive multiple of {k} (sharing_down: z = a ⊗ v with a ∈ R^{k}), got r={self.r}"
            )
        if self.mixture not in MIXTURES:
            raise CotuneError(f"unknown kron mixture {self.mixture!r}; valid: {list(MIXTURES)}")
        if self.sharing_up is not None:
            wanted = "full" if self.sharing_up else "partial"
            if (self.num_experts or 1) < 2 and self.mixture == "none":
                raise CotuneError(
                    "kron sharing_up chooses which down factors hold experts; it needs a mixture: add num_experts=2 "
                    "(AdaKron's --apply_expert_soup --num_experts 2)"
                )
            if self.mixture == "none":
                self.mixture = wanted
            elif self.mixture != wanted:
                raise CotuneError(
                    f"kron sharing_up={self.sharing_up} means mixture={wanted}, but mixture={self.mixture} was given"
                )
        if self.inference_level not in INFERENCE_LEVELS:
            raise CotuneError(
                f"kron inference_level must be one of {list(INFERENCE_LEVELS)} (0 token-level and 1 sequence-level "
                f"routing, 3 averaged experts), got {self.inference_level!r}"
            )
        if not self.consistency_loss >= 0:
            raise CotuneError(f"kron consistency_loss is a weight >= 0, got {self.consistency_loss!r}")
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
    """``E`` experts of one affine down factor ``u -> W_e u + b_e``: ``weight[e]`` ``(k, d)``, ``bias[e]`` ``(k)``.

    Each expert is its own parameter, as in AdaMix's ``ModuleList`` of experts: an expert a training call did
    not draw is outside the graph, so its gradient stays ``None`` and the optimizer leaves it and its moments
    alone. (One stacked ``(E, k, d)`` tensor would give it a zero gradient, which AdamW's momentum and weight
    decay still move: with two experts each moved about 1.4x as far per step as AdaMix's.)
    """

    def __init__(self, experts: int, k: int, d: int, std: float) -> None:
        super().__init__()
        # Every expert starts as a copy of one draw, as AdaMix's ``copy.deepcopy(expert)`` makes them.
        w = torch.randn(k, d) * std
        self.weight = nn.ParameterList([nn.Parameter(w.clone()) for _ in range(experts)])
        self.bias = nn.ParameterList([nn.Parameter(torch.zeros(k)) for _ in range(experts)])

    def __len__(self) -> int:
        return len(self.weight)

    def stacked(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every expert's weight and bias, stacked: ``(E, k, d)`` and ``(E, k)``."""
        return torch.stack(list(self.weight)), torch.stack(list(self.bias))

    def expert(self, e: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Expert ``e``, or the uniform average of the experts when ``e`` is ``None``."""
        if e is None and len(self) > 1:
            w, b = self.stacked()
            return w.mean(0), b.mean(0)
        i = 0 if e is None else e
        return self.weight[i], self.bias[i]

    def routed(self, u: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """``W_e u + b_e`` with expert ``e = idx`` per position (``idx`` broadcast to ``u.shape[:-1]``)."""
        w, b = self.stacked()
        every = torch.einsum("...d,ekd->...ek", u, w) + b  # (..., E, k)
        idx = idx.expand(u.shape[:-1])
        pick = idx[..., None, None].expand(*idx.shape, 1, every.shape[-1])
        return every.gather(-2, pick).squeeze(-2)


@register("kron", KronConfig, peft_type="ADAKRON", default_targets=KRON_DEFAULT_TARGETS)
class Kron(Adapter):
    site = "sequential"

    def __init__(self, config: KronConfig, d_in: int, d_out: int, base: nn.Module | None = None) -> None:
        super().__init__(config, d_in, d_out, base)
        du, dh = _widths(self.site, d_in, d_out)
        e = config.experts
        k = config.sharing_down
        self.down_a = _Factor(e if config.mixture in ("partial", "full") else 1, k, du, config.init_std)
        self.down_v = _Factor(e if config.mixture == "full" else 1, config.r // k, du, config.init_std)
        self.up = nn.Linear(config.r, dh)
        nn.init.normal_(self.up.weight, std=config.init_std)  # not zero: AdaKron's up projection is random
        nn.init.zeros_(self.up.bias)

    @property
    def stochastic(self) -> bool:
        return self.training and self.config.experts > 1

    def draw(self, seed: int | None) -> dict[str, int]:
        """The experts one training call uses: ``{group: expert}`` for every group with E > 1.

        Groups draw independently and uniformly, in the fixed order ``down_a`` then ``down_v``, from the CPU
        ``generator(seed)`` only (the global CPU RNG when ``seed`` is ``None``): the same draws wherever the
        adapter runs, so a fitter on a user's CPU replays a GPU server's.
        """
        gen = self.generator(seed)
        out: dict[str, int] = {}
        for name in ("down_a", "down_v"):
            n = len(getattr(self, name))
            if n > 1:
                out[name] = int(torch.randint(n, (1,), generator=gen))
        return out

    def forward(self, u: torch.Tensor, seed: int | None = None) -> torch.Tensor:
        if not self.training and self.config.experts > 1 and self.config.inference_level != 3:
            a, v = self._routed_eval(u, seed)
        else:
            picks = self.draw(seed) if self.stochastic else {}
            w2, b2 = self.down_a.expert(picks.get("down_a"))
            w1, b1 = self.down_v.expert(picks.get("down_v"))
            a = F.linear(u, w2, b2)  # (..., sharing_down)
            v = F.linear(u, w1, b1)  # (..., r/sharing_down)
        z = (a.unsqueeze(-1) * v.unsqueeze(-2)).flatten(-2)  # z[i·r/k + j] = a_i v_j
        return self.up(F.gelu(z))

    def _routed_eval(self, u: torch.Tensor, seed: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Eval with AdaMix's random routing: one expert per token (level 0) or per sequence (level 1)."""
        gen = self.generator(seed)
        # Level 1: one draw per leading (sequence) index, shared by its tokens; level 0: one per token.
        shape = u.shape[:-1] if self.config.inference_level == 0 else (*u.shape[:1], *([1] * (u.dim() - 2)))
        out = []
        for factor in (self.down_a, self.down_v):
            if len(factor) == 1:
                out.append(F.linear(u, *factor.expert(0)))
            else:
                idx = torch.randint(len(factor), shape, generator=gen).to(u.device)
                out.append(factor.routed(u, idx))
        return out[0], out[1]


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
