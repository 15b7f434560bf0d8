"""mlp (ColA "MLP"): ``Linear(d_in,128) – ReLU – Linear(128,256) – ReLU – Linear(256,d_out)``.

Widths (``hidden_sizes``) and the activation are configurable; every layer has a bias; the last layer
(weight and bias) starts at zero so attaching changes nothing, the others keep ``nn.Linear``'s default
init. ``s = 1``. Not mergeable: the map is not linear in its input (``merge`` raises a ``CotuneError``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from cotune.adapters.base import Adapter, AdapterConfig, register
from cotune.adapters.families.linear import ACTIVATIONS, activation, build_on, site_widths
from cotune.adapters.families.lowrank import LORA_DEFAULT_TARGETS
from cotune.errors import CotuneError


@dataclass
class MLPConfig(AdapterConfig):
    default_lr: ClassVar[float] = 0.0003  # benchmarks/lr_sweep.across: SST-2 and STS-B (docs/RESULTS.md)
    #: Hidden widths between the input and output layers (ColA: 128 then 256).
    hidden_sizes: list[int] = field(default_factory=lambda: [128, 256])
    activation: str = "relu"

    def __post_init__(self) -> None:
        sizes = list(self.hidden_sizes) if isinstance(self.hidden_sizes, list | tuple) else None
        if not sizes or any(not isinstance(h, int) or isinstance(h, bool) or h < 1 for h in sizes):
            raise CotuneError(
                f"mlp hidden_sizes must be a non-empty list of positive integers, got {self.hidden_sizes!r} "
                "(for a single linear map use the 'linear' family)"
            )
        self.hidden_sizes = sizes
        if self.activation not in ACTIVATIONS:
            raise CotuneError(f"unknown mlp activation {self.activation!r}; valid: {', '.join(ACTIVATIONS)}")


@register("mlp", MLPConfig, peft_type="MLP", default_targets=LORA_DEFAULT_TARGETS)
class MLPAdapter(Adapter):
    """A small MLP ``g(u)``; ``self.mlp`` is an ``nn.Sequential`` (saved keys ``mlp.0.weight`` …)."""

    site = "parallel"
    scaling = 1.0

    def __init__(self, config: MLPConfig, d_in: int, d_out: int, base: nn.Module | None = None) -> None:
        super().__init__(config, d_in, d_out, base)
        n_in, n_out = site_widths(self.site, d_in, d_out)
        widths = [n_in, *config.hidden_sizes]
        layers: list[nn.Module] = []
        with build_on(base):
            for a, b in zip(widths[:-1], widths[1:]):
                layers += [nn.Linear(a, b), activation(config.activation)]
            last = nn.Linear(widths[-1], n_out)
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)
        self.mlp = nn.Sequential(*layers, last)

    def forward(self, u: torch.Tensor, seed: int | None = None) -> torch.Tensor:
        return self.mlp(u)
