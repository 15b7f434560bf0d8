"""bottleneck (Houlsby / Pfeiffer adapters, a baseline): ``g(u) = W_up act(W_down u + b_down) + b_up``.

A *sequential* adapter by default: it reads a module's output ``f(x)`` and the site adds ``s·g(f(x))``
(``s = 1``), i.e. the adapter's own skip connection, before the block's dropout / residual / LayerNorm.
``W_down`` keeps ``nn.Linear``'s Kaiming-uniform init with a zero bias; ``W_up`` and ``b_up`` start at
zero, so attaching changes nothing. Not mergeable (the activation makes it non-linear).

Placement (``target_modules``; exported as dicts by model type):

* ``HOULSBY_TARGETS`` (the default): after the attention output projection and after the feed-forward
  output projection of every layer (BERT family: ``attention.output.dense`` and ``output.dense``;
  Llama: ``o_proj`` and ``down_proj``; GPT-2: ``attn.c_proj`` and ``mlp.c_proj``).
* ``PFEIFFER_TARGETS``: after the feed-forward output projection only.

The presets ``method_configs("houlsby", model)`` / ``method_configs("pfeiffer", model)`` pick them for a
model. (Houlsby also trained the LayerNorms; add a ``full`` config on them if wanted.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from cotune.adapters.base import Adapter, AdapterConfig, method, register
from cotune.adapters.families.linear import ACTIVATIONS, activation, build_on, site_widths
from cotune.adapters.naming import model_type
from cotune.errors import CotuneError

_BERT_HOULSBY = r".*\.layer\.\d+\.(attention\.output|output)\.dense"
_BERT_PFEIFFER = r".*\.layer\.\d+\.output\.dense"

#: After attention output and feed-forward output projections (Houlsby et al., 2019).
HOULSBY_TARGETS: dict[str, list[str] | str] = {
    "bert": _BERT_HOULSBY,
    "roberta": _BERT_HOULSBY,
    "deberta-v2": _BERT_HOULSBY,
    "llama": r".*\.layers\.\d+\.(self_attn\.o_proj|mlp\.down_proj)",
    "gpt2": r".*\.h\.\d+\.(attn|mlp)\.c_proj",
}

#: After the feed-forward output projection only (Pfeiffer et al., 2021).
PFEIFFER_TARGETS: dict[str, list[str] | str] = {
    "bert": _BERT_PFEIFFER,
    "roberta": _BERT_PFEIFFER,
    "deberta-v2": _BERT_PFEIFFER,
    "llama": r".*\.layers\.\d+\.mlp\.down_proj",
    "gpt2": r".*\.h\.\d+\.mlp\.c_proj",
}


@dataclass
class BottleneckConfig(AdapterConfig):
    default_lr: ClassVar[float] = 0.001  # benchmarks/lr_sweep's choice (docs/RESULTS.md)
    site: str | None = "sequential"
    bottleneck_size: int = 64
    activation: str = "relu"

    def __post_init__(self) -> None:
        if not isinstance(self.bottleneck_size, int) or self.bottleneck_size < 1:
            raise CotuneError(f"bottleneck_size must be a positive integer, got {self.bottleneck_size!r}")
        if self.activation not in ACTIVATIONS:
            raise CotuneError(f"unknown bottleneck activation {self.activation!r}; valid: {', '.join(ACTIVATIONS)}")


@register("bottleneck", BottleneckConfig, peft_type="BOTTLENECK", default_targets=HOULSBY_TARGETS)
class Bottleneck(Adapter):
    """Down-projection, activation, zero-initialised up-projection (``adapter_down`` / ``adapter_up``)."""

    site = "sequential"
    scaling = 1.0

    def __init__(self, config: BottleneckConfig, d_in: int, d_out: int, base: nn.Module | None = None) -> None:
        super().__init__(config, d_in, d_out, base)
        n_in, n_out = site_widths(self.site, d_in, d_out)
        with build_on(base):
            self.adapter_down = nn.Linear(n_in, config.bottleneck_size)
            self.act = activation(config.activation)
            self.adapter_up = nn.Linear(config.bottleneck_size, n_out)
            nn.init.kaiming_uniform_(self.adapter_down.weight, a=math.sqrt(5))
            nn.init.zeros_(self.adapter_down.bias)
            nn.init.zeros_(self.adapter_up.weight)
            nn.init.zeros_(self.adapter_up.bias)

    def forward(self, u: torch.Tensor, seed: int | None = None) -> torch.Tensor:
        return self.adapter_up(self.act(self.adapter_down(u)))


def _placed(placement: dict[str, list[str] | str], label: str, model: nn.Module | None, **overrides: Any):
    if "target_modules" not in overrides and model is not None:  # without a model: only the options are checked
        mt = model_type(model)
        if mt not in placement:
            raise CotuneError(
                f"{label} adapters have no default placement for model type {mt or 'unknown'!r}; "
                f"pass target_modules (known: {', '.join(placement)})"
            )
        overrides["target_modules"] = placement[mt]
    return [BottleneckConfig.from_dict(overrides, strict=True)]


@method("houlsby", family="bottleneck")
def houlsby(model: nn.Module | None = None, **overrides: Any) -> list[AdapterConfig]:
    """Bottleneck adapters after attention and feed-forward outputs (Houlsby placement)."""
    return _placed(HOULSBY_TARGETS, "houlsby", model, **overrides)


@method("pfeiffer", family="bottleneck")
def pfeiffer(model: nn.Module | None = None, **overrides: Any) -> list[AdapterConfig]:
    """Bottleneck adapters after the feed-forward output only (Pfeiffer placement)."""
    return _placed(PFEIFFER_TARGETS, "pfeiffer", model, **overrides)
