"""The adapter contract: every family is an additive ``g(u; w)`` at a site of a base module.

A family is a pair (config dataclass, ``Adapter`` subclass) registered under a string key with ``@register``;
a method preset (several configs trained together) is a function registered with ``@method``. Engines only
use what is defined here, so a family added later (by a user, without editing cotune) trains under every
engine. Looking families up (``get_family``, ``make_config``) is :mod:`cotune.adapters.registry`'s job: it
loads the built-in families, which import this module, so this module does not import them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from cotune.errors import CotuneError

#: Where an adapter's contribution lands. ``replace``: the module is replaced by ``g`` itself
#: (the "full" family: a task head or LayerNorm trained in place; ``s = 1``).
SITES = ("parallel", "sequential", "pre", "replace")


@dataclass
class AdapterConfig:
    """Fields shared by every family. Names follow PEFT where the meaning is the same.

    ``target_modules``: a list of module-name suffixes (PEFT style: ``["query", "value"]`` matches any
    module whose dotted name ends with ``.query`` or ``.value``), or a single string taken as a regular
    expression that must match the whole dotted name. ``None`` uses the family's default placement for
    the model's architecture.
    """

    target_modules: list[str] | str | None = None
    #: The family's default site unless overridden (parallel | sequential | pre | replace).
    site: str | None = None

    #: Filled in by ``register``: the registry key and the ``peft_type`` written to adapter_config.json.
    family: ClassVar[str] = ""
    peft_type: ClassVar[str] = ""
    #: The Adam(W) learning rate a run of this family gets when its config leaves ``optim.lr`` out; each
    #: family's is the winner of ``benchmarks/lr_sweep`` (docs/RESULTS.md), as PEFT's method docs carry theirs.
    default_lr: ClassVar[float] = 1e-3

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields plus ``peft_type`` (what adapter_config.json stores)."""
        d = dataclasses.asdict(self)
        d["peft_type"] = self.peft_type
        d["cotune_family"] = self.family
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], strict: bool = False) -> AdapterConfig:
        """Build from a dict; unknown keys are an error when ``strict`` and ignored otherwise."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in d if k not in names and k not in ("peft_type", "cotune_family"))
        if strict and unknown:
            raise CotuneError(
                f"unknown option(s) {unknown} for adapter family {cls.family!r}; valid: {sorted(names)}"
            )
        kwargs = {k: v for k, v in d.items() if k in names}
        if strict:  # what a user typed: r="8" is an error naming the key, not a TypeError deep in the family
            from cotune.config import check_value, field_types

            types_ = field_types(cls)
            kwargs = {k: check_value(f"{cls.family} option {k}", types_[k], v) for k, v in kwargs.items()}
        return cls(**kwargs)


class Adapter(nn.Module):
    """One adapter ``g(u; w)`` at one site.

    Built as ``cls(config, d_in, d_out, base)`` (``base``: the frozen module at the site, for families whose
    init reads it). Subclasses implement ``forward(u, seed=None) -> g(u)`` on fp32 input (the site casts), set ``site``
    and ``scaling`` (``s``), and, when ``g`` is linear in ``u``, ``delta_weight()`` for merging.

    Stochastic families (dropout, expert draws) set ``stochastic = True`` and draw only from the call's
    ``seed``: masks with :mod:`cotune.adapters.draws`, small integer draws from ``self.generator(seed)``.
    The site passes a fresh seed per call and the engines replay the same seed off the server, on any
    device, which is what keeps gradient learning equal to backprop.
    """

    site: str = "parallel"
    scaling: float = 1.0

    def __init__(self, config: AdapterConfig, d_in: int, d_out: int, base: nn.Module | None = None) -> None:
        super().__init__()
        self.config = config
        self.d_in, self.d_out = d_in, d_out
        if config.site is not None:
            self.site = config.site
        if self.site not in SITES:
            raise CotuneError(f"unknown site {self.site!r}; valid: {list(SITES)}")

    @property
    def stochastic(self) -> bool:
        """True when ``forward`` draws random numbers in training mode (then it must honour ``seed``)."""
        return False

    @staticmethod
    def generator(seed: int | None) -> torch.Generator | None:
        """A CPU generator seeded for one call, or ``None`` (the global CPU RNG) when no seed is given.

        Always on the CPU: device generators draw different numbers from the same seed, so a draw made on
        a GPU server could not be replayed by a fitter on the user's CPU. Move the drawn indices instead.
        """
        if seed is None:
            return None
        g = torch.Generator()
        g.manual_seed(int(seed))
        return g

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype of the adapter's math: fp32, or float64 for a float64 adapter (a model in double).

        Never below fp32 (half-precision activations are widened) and never below the adapter's own
        precision: a float64 check of gradient learning must run in float64 end to end.
        """
        for p in self.parameters():
            if p.is_floating_point():
                return torch.float64 if p.dtype == torch.float64 else torch.float32
        return torch.float32

    def lowrank_factors(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(A, B)`` with ``s·g(u) = s·B A u`` exactly, for a deterministic parallel adapter; else ``None``.

        A family that declares this lets the tenant router batch every tenant of that shape at a site into
        one gathered matmul, and a gradient-learning fitter take its gradient in closed form; the factors
        are the live parameters (autograd reaches them).
        """
        return None

    def delta_weight(self) -> torch.Tensor | None:
        """``s·ΔW`` in ``nn.Linear`` layout ``(d_out, d_in)``, in ``compute_dtype``; ``None`` when not mergeable."""
        return None

    @property
    def mergeable(self) -> bool:
        return type(self).delta_weight is not Adapter.delta_weight or (
            type(self).merged_state is not Adapter.merged_state
        )

    def merged_state(self, base: nn.Module) -> dict[str, torch.Tensor]:
        """The base module's new parameters with this adapter folded in (``merge``)."""
        dw = self.delta_weight()
        if dw is None:
            raise CotuneError(
                f"adapter family {self.config.family!r} is not mergeable: its output is not linear in "
                "the input; keep it unmerged (inference then runs the adapter)"
            )
        if self.site != "parallel":
            raise CotuneError(f"only parallel adapters merge into a weight; this one is {self.site!r}")
        w = base.weight
        # GPT-2 Conv1D stores (d_in, d_out); test the type, not the shape: attn.c_proj is square.
        if type(base).__name__ == "Conv1D" or (w.shape == dw.shape[::-1] and w.shape != dw.shape):
            dw = dw.T
        return {"weight": (w.detach().to(dw.dtype) + dw.to(w.device)).to(w.dtype)}

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def prepare_base(self, base: nn.Module) -> None:  # noqa: B027 - optional hook
        """Called once when attached; may change the frozen base (CoLA's PiSSA residual)."""

    def changes_base(self) -> bool:
        """True while ``prepare_base`` has changed the frozen base (a base shared by tenants must refuse it)."""
        return False

    def restore_base(self, base: nn.Module) -> None:  # noqa: B027 - optional hook
        """Undo ``prepare_base`` when the adapter is removed."""


@dataclass
class Family:
    name: str
    config_cls: type[AdapterConfig]
    adapter_cls: type[Adapter]
    #: model_type -> default target_modules (list of suffixes or regex); "*" for any architecture.
    default_targets: dict[str, list[str] | str] = field(default_factory=dict)


_REGISTRY: dict[str, Family] = {}


def register(
    name: str,
    config_cls: type[AdapterConfig],
    peft_type: str | None = None,
    default_targets: dict[str, list[str] | str] | None = None,
):
    """Class decorator registering an ``Adapter`` subclass as family ``name`` (open registry)."""

    def deco(adapter_cls: type[Adapter]) -> type[Adapter]:
        config_cls.family = name
        config_cls.peft_type = peft_type or name.upper()
        _REGISTRY[name] = Family(name, config_cls, adapter_cls, dict(default_targets or {}))
        return adapter_cls

    return deco


#: A method preset: ``fn(model, **overrides) -> list[AdapterConfig]`` (see ``cotune.adapters.methods``).
MethodFn = Callable[..., list[AdapterConfig]]
_METHODS: dict[str, MethodFn] = {}
#: A preset's main family (whose ``default_lr`` the preset trains with).
_METHOD_FAMILY: dict[str, str] = {}


def method(name: str, family: str) -> Callable[[MethodFn], MethodFn]:
    """Function decorator registering a preset of several configs as method ``name`` (open registry);
    ``family``: the adapter family the preset is built on (its default learning rate is the preset's)."""

    def deco(fn: MethodFn) -> MethodFn:
        _METHODS[name] = fn
        _METHOD_FAMILY[name] = family
        return fn

    return deco
