"""cola (CoLA, collaborative low rank): ``M`` down matrices ``A_i ∈ R^{r×d_in}``, ``N`` up matrices
``B_j ∈ R^{d_out×r}``, no router, ``s = lora_alpha / r`` (reference: r 8, α 16, M|N = 2|3 on all seven
Llama linear layers; 0.66 % of Llama-3.1-8B).

Strategies (how A's and B's pair up; each pair ``(i, j)`` contributes ``B_j A_i x``):

* ``full`` (default, the reference's active one): every pair, ``g(x) = Σ_j B_j Σ_i A_i x``; mergeable as
  ``ΔW = s·(Σ_j B_j)(Σ_i A_i)``.
* ``random``: in training each ``A_i`` is paired with one ``B`` drawn uniformly (with replacement) per
  forward call, the draw coming only from ``self.generator(seed)`` (a CPU generator) so that gradient learning can
  replay it on any device (``stochastic`` is true). In eval mode the adapter applies the expectation over draws,
  ``(1/N)(Σ_j B_j)(Σ_i A_i)`` (deterministic; also what ``merge`` folds in).
* ``heuristic``: ``k = N // M``; ``A_i`` is paired with ``B_{ik} … B_{ik+k−1}``; the ``N − Mk`` leftover
  B's are paired round-robin with ``A_0, A_1, …`` (see ``heuristic_groups``). Linear, so mergeable.

``lora_dropout`` > 0 draws an independent mask for every pair in training (as the reference, which calls
its dropout once per pair; :func:`cotune.adapters.draws.dropout`, one stream per pair), so dropout breaks the
symmetry between copies.

Initialisation (``init``):

* ``pissa`` (reference, default): fp32 SVD ``W = U S Vh`` of the frozen weight (``nn.Linear`` layout
  ``d_out×d_in``; GPT-2 ``Conv1D`` is transposed), ``A0 = diag(√(S_r/s))·Vh_r``,
  ``B0 = U_r·diag(√(S_r/s))``, ``A_i = A0/M``, ``B_j = B0/N`` — each an independent ``Parameter`` — and the
  frozen weight is replaced (``prepare_base``) by ``W − s·c·B0·A0`` so that the model computes the same
  function at step 0. ``c`` is the strategy's initial pairing factor ``#pairs / (M·N)``: 1 for ``full``
  (exactly the reference residual ``W − s·B0·A0``), ``1/N`` for ``random`` (M pairs) and ``1/M`` for
  ``heuristic`` (N pairs). (The reference code kept ``c = 1`` whatever the strategy, which silently changes
  the model at step 0 for the non-default strategies; cotune keeps the invariant instead.)
  The residual depends only on the pristine weight and the config (``s·c·B0·A0 = c·U_r S_r Vh_r`` is free
  of the SVD's sign ambiguity), so ``load_adapter`` recomputes it at attach, deterministically, before
  loading the trained factors. ``restore_base`` (``detach``) puts back the pristine weight bit for bit
  from a copy kept on the CPU. On the meta device (parameter counting) no SVD runs.
  A PiSSA set rewrites the shared frozen weight: other adapter sets on the same modules then see the
  residual, so use ``init="lora"`` when several sets/tenants share the base; two PiSSA sets on one module
  are refused.
* ``lora``: every ``A_i`` Kaiming-uniform (independently), every ``B_j`` zero; the base is untouched.
* ``pissa_perturbed`` (a cotune *extension*, not in the paper): PiSSA copies plus zero-sum Gaussian
  noise, ``A_i = A0/M + ε_i`` with ``Σ_i ε_i = 0`` (likewise for B), relative std ``perturbation`` of the
  copy's RMS. ``Σ A_i = A0`` and ``Σ B_j = B0`` still hold, so the step-0 invariance stays exact for
  ``full``, while the copies differ and can learn different things (needs M ≥ 2 / N ≥ 2 to act).

Known property (tested): with the ``full`` strategy, identical copies (``pissa``), no dropout and no
weight decay, the copies stay identical through AdamW training: every ``A_i`` receives the same
gradient ``∂L/∂(Σ A)`` and the same Adam update, so the run equals one (PiSSA-)LoRA ``B'A'`` with
``A' = Σ A_i`` learning ``M``× and ``B' = Σ B_j`` learning ``N``× faster. (Decoupled weight decay keeps
the copies identical too, but then the single-LoRA equivalent has its decay divided by M and N.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from cotune.adapters.base import Adapter, AdapterConfig, register
from cotune.adapters.draws import dropout
from cotune.errors import CotuneError

STRATEGIES = ("full", "random", "heuristic")
INITS = ("pissa", "lora", "pissa_perturbed")

_LLAMA_ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
_BERT_ALL = (
    r".*\.layer\.\d+\.(attention\.self\.(query|key|value)(_proj)?|attention\.output\.dense"
    r"|intermediate\.dense|output\.dense)"
)
#: Every linear layer of every transformer block (CoLA's placement), per architecture.
COLA_DEFAULT_TARGETS: dict[str, list[str] | str] = {
    "llama": _LLAMA_ALL,
    "mistral": _LLAMA_ALL,
    "qwen2": _LLAMA_ALL,
    "bert": _BERT_ALL,
    "roberta": _BERT_ALL,
    "deberta-v2": _BERT_ALL,
    "gpt2": ["c_attn", "c_proj", "c_fc"],
}


@dataclass
class ColaConfig(AdapterConfig):
    default_lr: ClassVar[float] = 0.00015  # benchmarks/lr_sweep's choice (docs/RESULTS.md)
    r: int = 8
    lora_alpha: float = 16.0
    #: M, the number of down matrices A_i.
    num_A: int = 2
    #: N, the number of up matrices B_j.
    num_B: int = 3
    strategy: str = "full"
    init: str = "pissa"
    lora_dropout: float = 0.0
    #: Relative noise std of ``init="pissa_perturbed"`` (an extension; ignored by the other inits).
    perturbation: float = 0.01

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise a ``CotuneError`` naming the valid values for any bad field."""

        def _pos_int(name: str) -> None:
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise CotuneError(f"cola needs {name} >= 1 (a positive integer), got {name}={v!r}")

        for name in ("r", "num_A", "num_B"):
            _pos_int(name)
        if self.strategy not in STRATEGIES:
            raise CotuneError(f"unknown cola strategy {self.strategy!r}; valid: {', '.join(STRATEGIES)}")
        if self.init not in INITS:
            raise CotuneError(f"unknown cola init {self.init!r}; valid: {', '.join(INITS)}")
        if not 0.0 <= float(self.lora_dropout) < 1.0:
            raise CotuneError(f"cola lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if float(self.perturbation) < 0:
            raise CotuneError(f"cola perturbation must be >= 0, got {self.perturbation!r}")


def heuristic_groups(num_a: int, num_b: int) -> list[list[int]]:
    """For each ``A_i`` the indices of the B's it is paired with under the heuristic strategy.

    ``k = N // M`` consecutive B's per A, then the leftovers ``B_{Mk} … B_{N−1}`` round-robin with
    ``A_0, A_1, …`` (M=2, N=5: ``[[0, 1, 4], [2, 3]]``). Every B is used exactly once.
    """
    k = num_b // num_a
    groups = [list(range(i * k, (i + 1) * k)) for i in range(num_a)]
    for t, j in enumerate(range(num_a * k, num_b)):
        groups[t % num_a].append(j)
    return groups


def _is_conv1d(base: nn.Module) -> bool:
    return type(base).__name__ == "Conv1D"  # transformers' GPT-2 layer stores (d_in, d_out)


def _weight(base: nn.Module | None) -> torch.Tensor:
    w = getattr(base, "weight", None)
    if not isinstance(w, torch.Tensor) or w.dim() != 2:
        raise CotuneError(
            f"cola init 'pissa' needs a base module with a 2-D weight (Linear / Conv1D), got "
            f"{type(base).__name__}; use init='lora' there"
        )
    return w


def linear_weight(base: nn.Module) -> torch.Tensor:
    """The base weight as an fp32 copy in ``nn.Linear`` layout ``(d_out, d_in)``."""
    w = _weight(base).detach()
    return (w.T if _is_conv1d(base) else w).float().clone()


@register("cola", ColaConfig, peft_type="COLA", default_targets=COLA_DEFAULT_TARGETS)
class Cola(Adapter):
    """``cola_A`` (M × ``(r, d_in)``) and ``cola_B`` (N × ``(d_out, r)``), paired by ``strategy``."""

    site = "parallel"

    def __init__(self, config: ColaConfig, d_in: int, d_out: int, base: nn.Module | None = None) -> None:
        super().__init__(config, d_in, d_out, base)
        config.validate()
        if self.site != "parallel":
            raise CotuneError(f"cola is a parallel adapter (g(x) added to f(x)); site {self.site!r} is not supported")
        r, m, n = config.r, config.num_A, config.num_B
        self.scaling = config.lora_alpha / r
        self.strategy = config.strategy
        self.p = float(config.lora_dropout)
        self.groups = heuristic_groups(m, n)
        pissa = config.init in ("pissa", "pissa_perturbed")
        if pissa:
            _weight(base)  # a clear error before anything is built when the module has no matrix weight
        ref = next(iter(base.parameters()), None) if base is not None else None
        on_meta = ref is not None and ref.device.type == "meta"
        if pissa and getattr(base, "_cotune_pissa", False):
            raise CotuneError(
                "this module already holds the PiSSA residual of another cola adapter set; detach that set "
                "first, or attach this one with init='lora'"
            )
        dev = torch.device("meta") if on_meta else None
        self.cola_A = nn.ParameterList([nn.Parameter(torch.empty(r, d_in, device=dev)) for _ in range(m)])
        self.cola_B = nn.ParameterList([nn.Parameter(torch.empty(d_out, r, device=dev)) for _ in range(n)])
        # Set by the PiSSA init and consumed once by prepare_base: (B0, A0); only the small factors are kept
        # so that attaching to every layer of a large model never holds a second full-size weight per site.
        self._principal: tuple[torch.Tensor, torch.Tensor] | None = None
        self._pristine: torch.Tensor | None = None
        if on_meta:
            return  # parameter counting on the meta device: no values, no SVD
        with torch.no_grad():
            if pissa:
                assert base is not None
                self._init_pissa(base, perturb=config.init == "pissa_perturbed")
            else:
                for a in self.cola_A:
                    nn.init.kaiming_uniform_(a, a=math.sqrt(5))
                for b in self.cola_B:
                    nn.init.zeros_(b)

    # -- init ----------------------------------------------------------------------------------------
    def pairing_factor(self) -> float:
        """``c = #pairs at init / (M·N)``: the share of ``B0·A0`` the strategy applies with PiSSA copies."""
        m, n = self.config.num_A, self.config.num_B
        pairs = {"full": m * n, "random": m, "heuristic": n}[self.strategy]
        return pairs / (m * n)

    def _init_pissa(self, base: nn.Module, perturb: bool) -> None:
        cfg: ColaConfig = self.config  # type: ignore[assignment]
        w = linear_weight(base)
        if cfg.r > min(w.shape):
            raise CotuneError(f"cola r={cfg.r} exceeds the rank bound min{tuple(w.shape)} of {type(base).__name__}")
        u, s_vals, vh = torch.linalg.svd(w, full_matrices=False)
        root = torch.sqrt(s_vals[: cfg.r] / self.scaling)
        a0 = root[:, None] * vh[: cfg.r]  # diag(√(S_r/s)) · Vh_r
        b0 = u[:, : cfg.r] * root[None, :]  # U_r · diag(√(S_r/s))
        self._copies(self.cola_A, a0 / cfg.num_A, cfg.perturbation if perturb else 0.0)
        self._copies(self.cola_B, b0 / cfg.num_B, cfg.perturbation if perturb else 0.0)
        self._principal = (b0, a0)

    @staticmethod
    def _copies(params: nn.ParameterList, value: torch.Tensor, rel_std: float) -> None:
        # Independent copies (own storage). Optional zero-sum noise keeps Σ copies == K·value.
        k = len(params)
        noise = torch.zeros((k, *value.shape))
        if rel_std > 0 and k > 1:
            noise = torch.randn((k, *value.shape)) * (rel_std * value.pow(2).mean().sqrt().item())
            noise -= noise.mean(0, keepdim=True)
        for p, e in zip(params, noise):
            p.copy_(value.to(p.device) + e.to(p.device))

    def prepare_base(self, base: nn.Module) -> None:
        """PiSSA: keep the pristine weight (CPU copy) and replace it by the residual ``W − s·c·B0·A0``."""
        if self._principal is None:
            return
        w = base.weight
        self._pristine = w.detach().to("cpu", copy=True)
        b0, a0 = (t.to(w.device) for t in self._principal)
        residual = linear_weight(base) - (self.scaling * self.pairing_factor()) * (b0 @ a0)
        with torch.no_grad():
            w.copy_((residual.T if _is_conv1d(base) else residual).to(w.dtype))
        self._principal = None
        base._cotune_pissa = True  # type: ignore[assignment]

    def changes_base(self) -> bool:
        return self._pristine is not None

    def restore_base(self, base: nn.Module) -> None:
        """Put the pristine weight back bit for bit (undo ``prepare_base``)."""
        if self._pristine is None:
            return
        with torch.no_grad():
            base.weight.copy_(self._pristine.to(base.weight.device))
        self._pristine = None
        if hasattr(base, "_cotune_pissa"):
            del base._cotune_pissa

    # -- forward -------------------------------------------------------------------------------------
    @property
    def stochastic(self) -> bool:
        return self.training and (self.strategy == "random" or self.p > 0)

    def pairs(self, generator: torch.Generator | None = None) -> list[list[int]]:
        """For each ``A_i`` the B indices it is paired with in this call (random: drawn from ``generator``, a
        CPU one, so that a fitter on any device replays the server's pairs)."""
        m, n = self.config.num_A, self.config.num_B
        if self.strategy == "full":
            return [list(range(n)) for _ in range(m)]
        if self.strategy == "heuristic":
            return [list(g) for g in self.groups]
        draw = torch.randint(0, n, (m,), generator=generator)
        return [[j] for j in draw.tolist()]

    def forward(self, u: torch.Tensor, seed: int | None = None) -> torch.Tensor:
        if self.strategy == "random" and not self.training:
            # Expected map over the uniform draws: every A_i meets the mean B.
            return self._full(u) / self.config.num_B
        if self.strategy == "full" and not (self.training and self.p > 0):
            return self._full(u)
        groups = self.pairs(self.generator(seed))
        out: torch.Tensor | None = None
        for i, js in enumerate(groups):
            if not js:
                continue
            if self.training and self.p > 0:
                # One independent dropout mask per pair, as the reference.
                for j in js:
                    y = dropout(u, self.p, seed, stream=i * self.config.num_B + j) @ self.cola_A[i].T @ self.cola_B[j].T
                    out = y if out is None else out + y
            else:
                b = self._sum([self.cola_B[j] for j in js])
                y = (u @ self.cola_A[i].T) @ b.T
                out = y if out is None else out + y
        assert out is not None  # every strategy pairs at least one (A, B)
        return out

    def _full(self, u: torch.Tensor) -> torch.Tensor:
        return (u @ self._sum(list(self.cola_A)).T) @ self._sum(list(self.cola_B)).T

    @staticmethod
    def _sum(ts: list[torch.Tensor]) -> torch.Tensor:
        out = ts[0]
        for t in ts[1:]:
            out = out + t
        return out

    def delta_weight(self) -> torch.Tensor:
        """``s·ΔW`` of the eval-mode map: full ``s(ΣB)(ΣA)``, heuristic ``sΣ_i(Σ_{j∈S_i}B_j)A_i``,
        random the expectation ``(s/N)(ΣB)(ΣA)``."""
        a = [t.to(self.compute_dtype) for t in self.cola_A]
        b = [t.to(self.compute_dtype) for t in self.cola_B]
        if self.strategy == "heuristic":
            dw = sum((self._sum([b[j] for j in js]) @ a[i] for i, js in enumerate(self.groups) if js))
            return self.scaling * dw  # type: ignore[return-value]
        dw = self._sum(b) @ self._sum(a)
        if self.strategy == "random":
            dw = dw / self.config.num_B
        return self.scaling * dw
