"""hydra (HydraLoRA, CoLA's baseline): one shared ``A``, ``N`` heads ``B_j``, a per-token softmax router.

``g(x) = Σ_j softmax(R x)_j · B_j A x`` with ``A ∈ R^{r×d_in}`` Kaiming-uniform, ``B_j ∈ R^{d_out×r}`` zero,
router ``R ∈ R^{N×d_in}`` without bias (Kaiming-uniform), ``s = lora_alpha / r``. The router reads the
un-dropped input; with ``lora_dropout`` each head gets its own dropout mask of ``x`` before ``A`` (as the
reference, which calls its dropout once per head), stream ``j`` of :func:`cotune.adapters.draws.dropout`.
Saved keys follow the reference: ``lora_A.weight``, ``lora_B.<j>.weight``, ``lora_route.weight``.
Not mergeable: the router weights depend on the token.
Default placement: CoLA's (every linear layer of every block), so the two compare like for like.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from cotune.adapters.base import Adapter, AdapterConfig, register
from cotune.adapters.draws import dropout
from cotune.adapters.families.cola import COLA_DEFAULT_TARGETS
from cotune.adapters.families.linear import build_on
from cotune.errors import CotuneError


@dataclass
class HydraConfig(AdapterConfig):
    default_lr: ClassVar[float] = 0.001  # benchmarks/lr_sweep's choice (docs/RESULTS.md)
    r: int = 8
    lora_alpha: float = 16.0
    #: N, the number of heads B_j (the reference's ``lora_num``).
    num_B: int = 3
    lora_dropout: float = 0.0

    def __post_init__(self) -> None:
        for name in ("r", "num_B"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise CotuneError(f"hydra needs {name} >= 1 (a positive integer), got {name}={v!r}")
        if not 0.0 <= float(self.lora_dropout) < 1.0:
            raise CotuneError(f"hydra lora_dropout must be in [0, 1), got {self.lora_dropout!r}")


@register("hydra", HydraConfig, peft_type="HYDRALORA", default_targets=COLA_DEFAULT_TARGETS)
class Hydra(Adapter):
    site = "parallel"

    def __init__(self, config: HydraConfig, d_in: int, d_out: int, base: nn.Module | None = None) -> None:
        super().__init__(config, d_in, d_out, base)
        if self.site != "parallel":
            raise CotuneError(f"hydra is a parallel adapter; site {self.site!r} is not supported")
        self.scaling = config.lora_alpha / config.r
        self.p = float(config.lora_dropout)
        with build_on(base):
            self.lora_A = nn.Linear(d_in, config.r, bias=False)
            self.lora_B = nn.ModuleList([nn.Linear(config.r, d_out, bias=False) for _ in range(config.num_B)])
            self.lora_route = nn.Linear(d_in, config.num_B, bias=False)
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
            nn.init.kaiming_uniform_(self.lora_route.weight, a=math.sqrt(5))
            for b in self.lora_B:
                nn.init.zeros_(b.weight)

    @property
    def stochastic(self) -> bool:
        return self.training and self.p > 0

    def router_weights(self, u: torch.Tensor) -> torch.Tensor:
        """Per-token mixing weights ``softmax(R u)`` over the N heads (last dim sums to one)."""
        return torch.softmax(self.lora_route(u), dim=-1)

    def forward(self, u: torch.Tensor, seed: int | None = None) -> torch.Tensor:
        w = self.router_weights(u)
        z = None if self.stochastic else self.lora_A(u)
        out: torch.Tensor | None = None
        for j, head in enumerate(self.lora_B):
            if self.stochastic:
                z = self.lora_A(dropout(u, self.p, seed, stream=j))
            assert z is not None
            y = w[..., j : j + 1] * head(z)
            out = y if out is None else out + y
        assert out is not None
        return out
