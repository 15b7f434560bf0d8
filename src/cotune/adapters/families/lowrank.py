"""lowrank (LoRA; ColA "low rank"): ``g(x) = B A x``, ``s = lora_alpha / r``. Saved in PEFT's layout."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from cotune.adapters.base import Adapter, AdapterConfig, register
from cotune.adapters.draws import dropout
from cotune.errors import CotuneError

#: PEFT's own defaults for these architectures (query/value attention projections).
LORA_DEFAULT_TARGETS: dict[str, list[str] | str] = {
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "deberta-v2": ["query_proj", "value_proj"],
    "llama": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"],
}


@dataclass
class LowRankConfig(AdapterConfig):
    default_lr: ClassVar[float] = 0.001  # benchmarks/lr_sweep.across over five GLUE tasks (docs/RESULTS.md)
    r: int = 8
    lora_alpha: float = 8.0
    lora_dropout: float = 0.0
    use_rslora: bool = False  # s = alpha / sqrt(r), as in PEFT


@register("lowrank", LowRankConfig, peft_type="LORA", default_targets=LORA_DEFAULT_TARGETS)
class LowRank(Adapter):
    site = "parallel"

    def __init__(self, config: LowRankConfig, d_in: int, d_out: int, base: nn.Module | None = None) -> None:
        super().__init__(config, d_in, d_out, base)
        if config.r <= 0:
            raise CotuneError(f"lowrank needs r >= 1, got r={config.r}")
        self.lora_A = nn.Linear(d_in, config.r, bias=False)
        self.lora_B = nn.Linear(config.r, d_out, bias=False)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # PEFT's default init
        nn.init.zeros_(self.lora_B.weight)
        self.scaling = config.lora_alpha / (math.sqrt(config.r) if config.use_rslora else config.r)
        self.p = config.lora_dropout

    @property
    def stochastic(self) -> bool:
        return self.training and self.p > 0

    def forward(self, u: torch.Tensor, seed: int | None = None) -> torch.Tensor:
        if self.stochastic:
            u = dropout(u, self.p, seed)
        return self.lora_B(self.lora_A(u))

    def lowrank_factors(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        return None if self.stochastic or self.site != "parallel" else (self.lora_A.weight, self.lora_B.weight)

    def delta_weight(self) -> torch.Tensor:
        return self.scaling * (self.lora_B.weight.to(self.compute_dtype) @ self.lora_A.weight.to(self.compute_dtype))
