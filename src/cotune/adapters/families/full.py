"""full: the module itself trained (a new task head, LoRETTA's LayerNorms). ``h = f(u; w)``, ``s = 1``.

The adapter holds its own copy of the module's parameters, under the module's own names, so saved keys
match PEFT's ``modules_to_save`` layout (``classifier.weight``).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn
from torch.func import functional_call

from cotune.adapters.base import Adapter, AdapterConfig, register

HEAD_DEFAULT_TARGETS: dict[str, list[str] | str] = {
    "bert": ["classifier"],
    "roberta": ["classifier"],
    "deberta-v2": ["classifier"],
    "llama": ["score"],
    "gpt2": ["score"],
}


@dataclass
class FullConfig(AdapterConfig):
    default_lr: ClassVar[float] = 5e-05  # benchmarks/lr_sweep's choice (docs/RESULTS.md)
    site: str | None = "replace"


@register("full", FullConfig, default_targets=HEAD_DEFAULT_TARGETS)
class Full(Adapter):
    site = "replace"

    def __init__(self, config: FullConfig, d_in: int, d_out: int, base: nn.Module | None = None) -> None:
        super().__init__(config, d_in, d_out, base)
        assert base is not None, "the full family copies the module it replaces"
        # A parameter-free template of the module: forward runs it with this adapter's parameters.
        template = copy.deepcopy(base).to("meta")
        object.__setattr__(self, "_template", template)
        for name, t in [*base.named_parameters(), *base.named_buffers()]:
            mod_path, _, leaf = name.rpartition(".")
            owner: nn.Module = self
            for part in mod_path.split(".") if mod_path else []:
                if not hasattr(owner, part):
                    owner.add_module(part, nn.Module())
                owner = getattr(owner, part)
            if isinstance(t, nn.Parameter):
                owner.register_parameter(leaf, nn.Parameter(t.detach().clone().float()))
            else:
                owner.register_buffer(leaf, t.detach().clone(), persistent=False)

    def forward(self, u: torch.Tensor, seed: int | None = None) -> torch.Tensor:
        state = {**dict(self.named_parameters()), **dict(self.named_buffers())}
        return functional_call(self._template, state, (u,))  # type: ignore[attr-defined]

    def merged_state(self, base: nn.Module) -> dict[str, torch.Tensor]:
        own = dict(self.named_parameters())
        return {k: own[k].detach().to(v.dtype) for k, v in base.named_parameters()}
