"""LoRETTA's tensor-train families: ``loretta_adp``, ``loretta_rep`` and ``tt_linear``.

* ``loretta_adp``: bottleneck ``g(u) = U(ReLU(D(u)))`` with TT layers ``D: H→64`` and ``U: 64→H`` (both with
  bias). The adapter works at the hidden width H on the narrow side of its module: ``sequential`` (on the
  output) when the module does not expand, ``pre`` (on the input) when it does — so one family reproduces
  LoRETTA's placement: after BERT's ``attention.output.dense`` and ``output.dense``, and on Llama on the
  input of ``gate_proj``/``up_proj`` and the output of ``down_proj``. ``site=`` overrides this.
  Tensors: ``down.cores.k``, ``down.bias``, ``up.cores.k``, ``up.bias``.
* ``loretta_rep``: parallel ``g(x) = (x·A_full)·B_full`` with ``A_full`` a TT ``(d_in, r)`` and ``B_full`` a TT
  ``(r, d_out)``, no bias, ``s = lora_alpha / r``; mergeable (``ΔW = s·(A_full B_full)ᵀ``).
  Tensors: ``tt_A.cores.k``, ``tt_B.cores.k``.
* ``tt_linear``: replaces a dense layer by ``h = u W_TT + b`` (the tensorized classifier dense). Fresh TT
  init (not a decomposition of the old weight: LoRETTA trains the head from scratch). Mergeable: its
  materialised ``W_TT``/bias become the module's weight/bias. Tensors: ``cores.k``, ``bias``.

Shapes: ``tt_shape`` (a list whose product is ``d_in·d_out``) overrides the default, which is the
published one where there is one (``cotune.adapters.tt.PUBLISHED_SHAPES``) and otherwise the factorisation
of ``cotune.adapters.tt.factorize`` (factors near 8): e.g. MiniLM's H = 384 gives ``[8, 8, 6, 8, 8]`` for the
adapters and ``[8, 8, 6, 8]`` for ``loretta_rep``. ``loretta_adp`` uses one list for both ``D`` and ``U``
(the product ``H·64`` is the same).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from cotune.adapters.base import Adapter, AdapterConfig, register
from cotune.adapters.families.lowrank import LORA_DEFAULT_TARGETS
from cotune.adapters.tt import COMPUTE_MODES, TTLinear, default_tt_shape, tt_linear, tt_matrix
from cotune.errors import CotuneError

ADP_DEFAULT_TARGETS: dict[str, list[str] | str] = {
    "bert": r".*layer\.\d+\.(attention\.)?output\.dense",
    "roberta": r".*layer\.\d+\.(attention\.)?output\.dense",
    "deberta": r".*layer\.\d+\.(attention\.)?output\.dense",
    "deberta-v2": r".*layer\.\d+\.(attention\.)?output\.dense",
    "llama": ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"],
    "gpt2": ["attn.c_proj", "mlp.c_proj"],
}

#: The head's hidden×hidden dense (RoBERTa ``classifier.dense``, DeBERTa-v2 ``pooler.dense``).
TT_HEAD_DEFAULT_TARGETS: dict[str, list[str] | str] = {
    "roberta": ["classifier.dense"],
    "deberta": ["pooler.dense"],
    "deberta-v2": ["pooler.dense"],
}


def _check_mode(mode: str) -> None:
    if mode not in COMPUTE_MODES:
        raise CotuneError(f"unknown tt_mode {mode!r}; valid: {list(COMPUTE_MODES)}")


@dataclass
class LorettaAdpConfig(AdapterConfig):
    """``bottleneck``: width of the TT bottleneck; ``tt_rank``: TT rank; ``tt_shape``: override of the flat
    TT shape (product ``H·bottleneck``) for both layers; ``tt_mode``: auto | materialize | cores."""

    default_lr: ClassVar[float] = 0.0015  # benchmarks/lr_sweep's choice (docs/RESULTS.md)
    bottleneck: int = 64
    tt_rank: int = 5
    tt_shape: list[int] | None = None
    tt_mode: str = "auto"

    def __post_init__(self) -> None:
        _check_mode(self.tt_mode)
        if self.bottleneck < 1:
            raise CotuneError(f"loretta_adp needs bottleneck >= 1, got {self.bottleneck}")


@register("loretta_adp", LorettaAdpConfig, peft_type="LORETTA_ADP", default_targets=ADP_DEFAULT_TARGETS)
class LorettaAdp(Adapter):
    site = "sequential"

    def __init__(self, config: LorettaAdpConfig, d_in: int, d_out: int, base: nn.Module | None = None) -> None:
        super().__init__(config, d_in, d_out, base)
        if config.site is None:
            # The hidden stream is the module's narrow side: before an expanding projection, after the others.
            self.site = "pre" if d_out > d_in else "sequential"
        if self.site not in ("sequential", "pre"):
            raise CotuneError(
                f"loretta_adp is a bottleneck on the hidden stream: site must be sequential or pre, not {self.site!r}"
            )
        h = d_in if self.site == "pre" else d_out
        shape = config.tt_shape if config.tt_shape is not None else default_tt_shape(h, config.bottleneck)
        self.down = TTLinear(h, config.bottleneck, shape, config.tt_rank, bias=True, mode=config.tt_mode)
        self.up = TTLinear(config.bottleneck, h, shape, config.tt_rank, bias=True, mode=config.tt_mode)

    def forward(self, u: torch.Tensor, seed: int | None = None) -> torch.Tensor:
        return self.up(F.relu(self.down(u)))


@dataclass
class LorettaRepConfig(AdapterConfig):
    """``r``/``lora_alpha`` as in LoRA (``s = lora_alpha / r``); ``tt_shape`` overrides the flat shape of
    ``A_full`` (product ``d_in·r``) and also serves ``B_full`` when ``d_in = d_out``; ``tt_shape_b`` sets
    ``B_full``'s (product ``r·d_out``) explicitly."""

    default_lr: ClassVar[float] = 0.003  # benchmarks/lr_sweep.across: SST-2 and STS-B (docs/RESULTS.md)
    r: int = 8
    lora_alpha: float = 16.0
    tt_rank: int = 5
    tt_shape: list[int] | None = None
    tt_shape_b: list[int] | None = None
    tt_mode: str = "auto"

    def __post_init__(self) -> None:
        _check_mode(self.tt_mode)
        if self.r < 1:
            raise CotuneError(f"loretta_rep needs r >= 1, got r={self.r}")


@register("loretta_rep", LorettaRepConfig, peft_type="LORETTA_REP", default_targets=LORA_DEFAULT_TARGETS)
class LorettaRep(Adapter):
    site = "parallel"

    def __init__(self, config: LorettaRepConfig, d_in: int, d_out: int, base: nn.Module | None = None) -> None:
        super().__init__(config, d_in, d_out, base)
        if self.site != "parallel":
            raise CotuneError(f"loretta_rep is a parallel weight update; site must be parallel, not {self.site!r}")
        r = config.r
        shape_a = config.tt_shape if config.tt_shape is not None else default_tt_shape(d_in, r)
        if config.tt_shape_b is not None:
            shape_b = config.tt_shape_b
        elif math.prod(shape_a) == r * d_out:  # square module: one list serves both factors (as published)
            shape_b = shape_a
        else:
            shape_b = default_tt_shape(r, d_out)
        self.tt_A = TTLinear(d_in, r, shape_a, config.tt_rank, bias=False, mode=config.tt_mode)
        self.tt_B = TTLinear(r, d_out, shape_b, config.tt_rank, bias=False, mode=config.tt_mode)
        self.scaling = config.lora_alpha / r

    def forward(self, u: torch.Tensor, seed: int | None = None) -> torch.Tensor:
        return self.tt_B(self.tt_A(u))

    def delta_weight(self) -> torch.Tensor:
        return self.scaling * (self.tt_A.weight().to(self.compute_dtype) @ self.tt_B.weight().to(self.compute_dtype)).T


@dataclass
class TTLinearConfig(AdapterConfig):
    """A dense layer replaced by a TT layer with bias (``site`` is ``replace``)."""

    site: str | None = "replace"
    tt_rank: int = 5
    tt_shape: list[int] | None = None
    tt_mode: str = "auto"
    bias: bool = True

    def __post_init__(self) -> None:
        _check_mode(self.tt_mode)


@register("tt_linear", TTLinearConfig, peft_type="TT_LINEAR", default_targets=TT_HEAD_DEFAULT_TARGETS)
class TTLinearAdapter(Adapter):
    """``h = u W_TT + b`` in place of the module (a ``replace`` site, ``s = 1``); tensors ``cores.k``, ``bias``."""

    site = "replace"

    def __init__(self, config: TTLinearConfig, d_in: int, d_out: int, base: nn.Module | None = None) -> None:
        super().__init__(config, d_in, d_out, base)
        if self.site != "replace":
            raise CotuneError(f"tt_linear replaces its module; site must be replace, not {self.site!r}")
        tt = TTLinear(d_in, d_out, config.tt_shape, config.tt_rank, config.bias, config.tt_mode)
        # Adopt the layer's parameters directly so the saved names are ``cores.k`` / ``bias``.
        self.cores, self.bias = tt.cores, tt.bias
        self.shape, self.ranks, self.mode = tt.shape, tt.ranks, tt.mode

    def weight(self) -> torch.Tensor:
        """The materialised ``W_TT`` of shape ``(d_in, d_out)``."""
        return tt_matrix(list(self.cores), self.d_in, self.d_out)

    def forward(self, u: torch.Tensor, seed: int | None = None) -> torch.Tensor:
        return tt_linear(u, list(self.cores), self.bias, self.d_in, self.d_out, self.mode)

    def merged_state(self, base: nn.Module) -> dict[str, torch.Tensor]:
        """The module's own weight/bias replaced by the materialised TT layer."""
        w = self.weight().detach()
        params = dict(base.named_parameters())
        conv1d = type(base).__name__ == "Conv1D"  # GPT-2 stores (d_in, d_out)
        new = {"weight": (w if conv1d else w.T).contiguous().to(params["weight"].dtype)}
        if self.bias is not None:
            if "bias" not in params:
                raise CotuneError("tt_linear with bias=true cannot merge into a module that has no bias")
            new["bias"] = self.bias.detach().to(params["bias"].dtype)
        elif "bias" in params:
            new["bias"] = torch.zeros_like(params["bias"])
        return new

    def extra_repr(self) -> str:
        return f"d_in={self.d_in}, d_out={self.d_out}, shape={self.shape}, ranks={self.ranks}, mode={self.mode!r}"
