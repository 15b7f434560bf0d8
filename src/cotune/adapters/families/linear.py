"""linear (ColA "linear"): a full ``d_out × d_in`` map ``g(x) = W_g x (+ b)``, zero-initialised, ``s = 1``.

Mergeable: ``ΔW = W_g``. The bias is off by default so the adapter merges into any base (Llama's linear
layers have no bias). With ``bias=True`` merging adds ``b`` to the base module's bias; a base without a
bias cannot absorb it, so merging is refused with a ``CotuneError`` (the adapter still trains and runs).

Also home of two helpers the other small families share: ``site_widths`` (the adapter's own input and
output widths at each site) and ``activation``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from cotune.adapters.base import Adapter, AdapterConfig, register
from cotune.adapters.families.lowrank import LORA_DEFAULT_TARGETS
from cotune.errors import CotuneError

#: Activations the families accept by name (``swish`` is an alias of ``silu``, as in adapter-transformers).
ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "swish": nn.SiLU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "identity": nn.Identity,
}


def activation(name: str) -> nn.Module:
    """A fresh activation module by name; unknown names list the valid ones."""
    if name not in ACTIVATIONS:
        raise CotuneError(f"unknown activation {name!r}; valid: {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]()


def site_widths(site: str, d_in: int, d_out: int) -> tuple[int, int]:
    """The adapter's (input, output) widths at ``site`` of a module mapping ``d_in -> d_out``.

    parallel/replace read the module input and add to its output; sequential reads and adds to the
    output; pre reads and adds to the input.
    """
    if site == "sequential":
        return d_out, d_out
    if site == "pre":
        return d_in, d_in
    return d_in, d_out


def build_on(base: nn.Module | None) -> contextlib.AbstractContextManager:
    """Build the adapter's tensors on the meta device when the base lives there (parameter counting of
    large models: nothing is allocated), otherwise where torch builds them by default."""
    ref = next(iter(base.parameters()), None) if base is not None else None
    if ref is not None and ref.device.type == "meta":
        return torch.device("meta")
    return contextlib.nullcontext()


@dataclass
class LinearConfig(AdapterConfig):
    default_lr: ClassVar[float] = 0.0003  # benchmarks/lr_sweep.across: SST-2 and STS-B (docs/RESULTS.md)
    #: Add a trainable bias ``b`` (merging then needs a base module with a bias).
    bias: bool = False


@register("linear", LinearConfig, peft_type="LINEAR", default_targets=LORA_DEFAULT_TARGETS)
class LinearAdapter(Adapter):
    """``g(x) = W_g x (+ b)`` with ``W_g`` (and ``b``) zero at init, so attaching changes nothing."""

    site = "parallel"
    scaling = 1.0

    def __init__(self, config: LinearConfig, d_in: int, d_out: int, base: nn.Module | None = None) -> None:
        super().__init__(config, d_in, d_out, base)
        n_in, n_out = site_widths(self.site, d_in, d_out)
        with build_on(base):
            self.linear = nn.Linear(n_in, n_out, bias=bool(config.bias))
            nn.init.zeros_(self.linear.weight)
            if self.linear.bias is not None:
                nn.init.zeros_(self.linear.bias)

    def forward(self, u: torch.Tensor, seed: int | None = None) -> torch.Tensor:
        return self.linear(u)

    def delta_weight(self) -> torch.Tensor:
        return self.scaling * self.linear.weight.to(self.compute_dtype)

    def merged_state(self, base: nn.Module) -> dict[str, torch.Tensor]:
        """Weight plus ``W_g``; with a bias, also the base bias plus ``b`` (refused if the base has none)."""
        b = self.linear.bias
        base_bias = getattr(base, "bias", None)
        if b is not None and not isinstance(base_bias, torch.Tensor):
            raise CotuneError(
                f"cannot merge a linear adapter with bias=True into {type(base).__name__} without a bias; "
                "keep it unmerged, or train it with bias=False"
            )
        state = super().merged_state(base)
        if b is not None:
            assert isinstance(base_bias, torch.Tensor)
            new = base_bias.detach().to(b.dtype) + self.scaling * b.detach().to(device=base_bias.device, dtype=self.compute_dtype)
            state["bias"] = new.to(base_bias.dtype)
        return state
