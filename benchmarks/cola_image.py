"""ColA on image classification: frozen random Linear / MLP / CNN bases on Fashion-MNIST, full training vs LoRA vs
ColA low rank / linear / MLP (ColA's image-classification figure, on the data set available offline).

    python -m benchmarks cola_image                 # LR check + 15 cells (about 17 min on 1 shared thread)
    python -m benchmarks cola_image --smoke         # a few steps per cell, tiny evaluations (seconds)
    python -m benchmarks cola_image --report --merge DIR ...   # rebuild table.md and the plot from results.json

Every cell is one ``cotune.training.Trainer`` run (the loop behind ``cotune train``) with ``task.kind=image_cls``,
``model=linear|mlp|cnn``: the base is built after ``seed_everything(seed)``, so every cell of a base starts from
the same randomly initialised weights, which stay frozen for the adapter methods. Methods (``METHODS``): ``full``
(every base weight trained in place: the ``full`` family on every module, backprop), LoRA (``lowrank`` r 8,
alpha 8, backprop), and ColA low rank / linear / MLP (families ``lowrank`` / ``linear`` / ``mlp`` through the
gradient-learning engine ``gl``, fitter in a thread, interval 1). Adapters sit on the bases' ``nn.Linear`` layers
(``TARGETS``); Conv2d is no adapter site, so on the CNN only its classifier ``linear`` is adapted.

All cells: Adam, a constant learning rate per family chosen by a short check on the validation split
(``--lrs``, ``--lr-steps`` on the linear and MLP bases; gl uses its family's rate: it equals backprop), batch
``--batch-size``, ``--steps`` steps (``--cnn-steps`` on the CNN, the expensive base). Curves: accuracy on the first
``--eval-rows`` rows of the validation split (carved from the training images) every ``steps/10`` steps; the
reported score is the test accuracy (``--test-rows``; default all 10,000) of the adapter the trainer selected on
validation. gl must equal backprop in exact arithmetic: the LoRA and ColA low-rank cells of each base are compared
step by step (losses, final weights).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time
from pathlib import Path
from typing import Any

from benchmarks._common import (
    DATA,
    machine,
    markdown_table,
    out_dir,
    panel_plot,
    run_isolated,
    set_offline,
    write_json,
)

BASES = ("linear", "mlp", "cnn")
#: base -> the nn.Linear layers the adapters sit on (ColA adapts every Linear; Conv2d is no adapter site)
TARGETS: dict[str, list[str]] = {"linear": ["linear"], "mlp": ["blocks.0", "blocks.2", "linear"], "cnn": ["linear"]}
#: method -> (adapter family, engine, label)
METHODS: dict[str, tuple[str, str, str]] = {
    "full": ("full", "backprop", "Full training"),
    "lora": ("lowrank", "backprop", "LoRA"),
    "cola_lowrank": ("lowrank", "gl", "ColA low rank"),
    "cola_linear": ("linear", "gl", "ColA linear"),
    "cola_mlp": ("mlp", "gl", "ColA MLP"),
}
#: family -> options (ColA's: low rank r 8 with scale 1; the linear and MLP auxiliaries at their defaults)
OPTIONS: dict[str, dict[str, Any]] = {"full": {}, "lowrank": {"r": 8, "lora_alpha": 8}, "linear": {}, "mlp": {}}
LRS = (3e-4, 1e-3, 3e-3, 1e-2)
#: per-step training losses kept in results.json (the gl-vs-backprop gaps are computed over every step first)
KEEP_LOSSES = 100
#: the learning rate of a family when the check is skipped (--lr-steps 0): what the check chose in the full run
DEFAULT_LR: dict[str, float] = {"full": 3e-3, "lowrank": 1e-2, "linear": 3e-3, "mlp": 3e-3}


# -- one cell (a fresh subprocess in the full run) -------------------------------------------------------------
def cell_config(
    base: str,
    family: str,
    engine: str,
    lr: float,
    steps: int,
    batch: int,
    seed: int,
    out: str,
    eval_every: int,
    eval_limit: int | None,
    test_limit: int | None,
    max_rows: int | None = None,
    test: bool = True,
) -> Any:
    """The ``TrainConfig`` of one cell."""
    from cotune.training.config import config_from_dict

    options = {"target_modules": "all"} if family == "full" else {**OPTIONS[family], "target_modules": TARGETS[base]}
    task_opts: dict[str, Any] = {"max_rows": max_rows} if max_rows else {}
    return config_from_dict(
        {
            "model": base,
            "task": {"kind": "image_cls", "data": str(DATA / "fashion-mnist"), "options": task_opts},
            "method": {"name": family, "options": options},
            "engine": {"name": engine, "options": {"interval": 1} if engine == "gl" else {}},
            "optim": {"optimizer": "adam", "lr": lr, "scheduler": "constant"},
            "seed": seed,
            "batch_size": batch,
            "eval_batch_size": 500,
            "max_steps": steps,
            "eval_every": eval_every,
            "eval_limit": eval_limit,
            "test": test,
            "test_limit": test_limit,
            "log_every": max(1, steps // 50),
            "save_every": 0,
            "keep_checkpoints": 1,
            "overwrite": True,
            "progress": False,
            "output_dir": out,
        }
    )


def _base_state(model: Any) -> dict[str, Any]:
    """The base model's own weights inside an adapted model (``x.base.weight`` -> ``x.weight``; no adapters)."""
    return {k.replace(".base.", "."): v for k, v in model.state_dict().items() if ".adapters." not in k}


def run_cell(
    base: str,
    method: str,
    lr: float,
    steps: int,
    batch: int,
    seed: int,
    out: str,
    eval_every: int,
    eval_limit: int | None,
    test_limit: int | None,
    threads: int = 1,
    max_rows: int | None = None,
    zero_shot: bool = False,
    test: bool = True,
    engine: str | None = None,
) -> dict[str, Any]:
    """Train one (base, method) cell through the Trainer; its scores, curves, per-step losses and cost.

    ``engine``: train the method's family with this engine instead (the LR check trains every family with backprop).
    """
    import torch

    from cotune.training.trainer import Trainer, seed_everything

    set_offline()
    torch.set_num_threads(threads)
    family, default_engine, _ = METHODS[method]
    engine = engine or default_engine
    cfg = cell_config(
        base, family, engine, lr, steps, batch, seed, out, eval_every, eval_limit, test_limit, max_rows, test
    )
    losses: list[float] = []
    tr = Trainer(cfg, callbacks=[lambda _tr, _step, result: losses.append(float(result.loss))], verbose=False)
    t0 = time.perf_counter()
    res = tr.train()
    seconds = time.perf_counter() - t0
    evals = list(tr.state.evals)
    r: dict[str, Any] = {
        "base": base,
        "method": method,
        "family": family,
        "engine": engine,
        "lr": lr,
        "steps": res.steps,
        "batch": batch,
        "trainable_params": res.trainable_parameters,
        "base_params": sum(v.numel() for v in _base_state(tr.model).values()),
        "test_accuracy": res.test["accuracy"] if res.test else None,
        "test_loss": res.test["loss"] if res.test else None,
        "test_rows": test_limit,
        "best_step": res.best_step,
        "val_best": res.validation.get("accuracy"),
        "val_final": evals[-1]["accuracy"] if evals else None,
        "curve": [(e["step"], e["accuracy"]) for e in evals],
        "losses": losses,
        "train_seconds": res.train_seconds,
        "seconds": seconds,
        "run_dir": out,
    }
    if zero_shot or family != "full":
        seed_everything(seed)  # the same draws the trainer made before building the base
        fresh = tr.task.build_model(base)
        if family != "full":  # the adapter methods left the base exactly as it was built
            mine = _base_state(tr.model)
            r["base_unchanged"] = all(torch.equal(v, mine[k]) for k, v in fresh.state_dict().items())
        if zero_shot:
            rows = tr.task.load("test").rows
            with torch.no_grad():
                r["zero_shot_accuracy"] = tr.task.evaluate(fresh.eval(), rows, 500, test_limit)["accuracy"]
    return r


def final_adapter(run_dir: str) -> dict[str, Any]:
    """The adapter weights of a run's last checkpoint."""
    from safetensors.torch import load_file

    (ckpt,) = sorted(Path(run_dir).glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))[-1:]
    return load_file(str(ckpt / "adapter" / "adapter_model.safetensors"))


def weights_gap(run_a: str, run_b: str) -> float:
    """The largest absolute difference between two runs' final adapter weights."""
    a, b = final_adapter(run_a), final_adapter(run_b)
    if set(a) != set(b):
        raise RuntimeError(f"adapters differ in their keys: {sorted(set(a) ^ set(b))}")
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


# -- the learning-rate check ----------------------------------------------------------------------------------------
def lr_check(args: argparse.Namespace, out: Path) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Per family: the LR of ``--lrs`` with the best mean validation accuracy after ``--lr-steps`` backprop steps on
    the check bases (gl is not checked separately: it computes backprop's gradient)."""
    families = sorted({METHODS[m][0] for m in METHODS})
    lrs = [float(x) for x in args.lrs.split(",")]
    bases = ["linear"] if args.smoke else ["linear", "mlp"]
    rows: list[dict[str, Any]] = []
    for family in families:
        method = next(m for m, v in METHODS.items() if v[0] == family)
        for base in bases:
            for lr in lrs:
                kw = _cell_kw(args, out / "lr_check", base, method, lr, args.lr_steps, test=False)
                r = _run(args, {**kw, "eval_every": 0, "engine": "backprop"})  # eval_every 0: once, at the end
                rows.append(
                    {
                        "family": family,
                        "base": base,
                        "lr": lr,
                        "val_accuracy": r.get("val_final"),
                        "error": r.get("error"),
                    }
                )
                print(f"  lr check {family:8} {base:6} lr {lr:g}: val acc {_pct(r.get('val_final'))}", flush=True)
    chosen = {}
    for family in families:

        def mean_acc(lr: float, fam: str = family) -> float:
            accs = [x["val_accuracy"] for x in rows if x["family"] == fam and x["lr"] == lr]
            return sum(a if a is not None else 0.0 for a in accs) / max(1, len(accs))

        chosen[family] = max(lrs, key=mean_acc)
    return chosen, rows


def _pct(v: float | None) -> str:
    return "—" if v is None else f"{100 * v:.1f}"


def _cell_kw(
    args: argparse.Namespace, root: Path, base: str, method: str, lr: float, steps: int, test: bool = True
) -> dict[str, Any]:
    kw: dict[str, Any] = {
        "base": base,
        "method": method,
        "lr": lr,
        "steps": steps,
        "batch": args.batch_size,
        "seed": args.seed,
        "out": str(root / (f"{base}_{METHODS[method][0]}_lr{lr:g}" if not test else f"{base}_{method}")),
        "eval_every": max(1, steps // 10),
        "eval_limit": args.eval_rows,
        "test_limit": args.test_rows,
        "threads": args.threads,
        "zero_shot": method == "lora" and test,
        "test": test,
    }
    if args.smoke:
        kw.update(max_rows=600, eval_limit=50, test_limit=50)
    return kw


def _run(args: argparse.Namespace, kw: dict[str, Any]) -> dict[str, Any]:
    """One cell, in-process for smoke runs and in a fresh interpreter otherwise; a failure is recorded, not raised."""
    try:
        if args.smoke:
            return run_cell(**kw)
        return run_isolated("benchmarks.cola_image:run_cell", kw, timeout=args.cell_timeout, threads=args.threads)
    except (RuntimeError, subprocess.TimeoutExpired) as e:  # a failed cell must not lose the others
        print(f"  {kw['base']} {kw['method']} FAILED: {str(e).splitlines()[-1]}", flush=True)
        return {"base": kw["base"], "method": kw["method"], "error": str(e)[-2000:]}


def loss_gap(bp: dict[str, Any], gl: dict[str, Any]) -> dict[str, Any]:
    """The largest per-step training-loss differences between a backprop cell and its gl twin."""
    n = min(len(bp["losses"]), len(gl["losses"]))
    gaps = [abs(a - b) for a, b in zip(bp["losses"][:n], gl["losses"][:n], strict=True)]
    return {"steps": n, "first_10": max(gaps[:10], default=None), "all": max(gaps, default=None)}


def compact(cell: dict[str, Any]) -> dict[str, Any]:
    """A cell as saved: per-step losses cut to the first ``KEEP_LOSSES`` (the gl check is stored whole), so that
    results.json stays small enough to commit."""
    return {**cell, "losses": cell["losses"][:KEEP_LOSSES]} if "losses" in cell else cell


# -- tables and plots ---------------------------------------------------------------------------------------------
def gl_check(cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per base: LoRA (backprop) against ColA low rank (gl), the same family, data order and optimizer."""
    by = {(c["base"], c["method"]): c for c in cells if "error" not in c}
    out = []
    for base in BASES:
        bp, gl = by.get((base, "lora")), by.get((base, "cola_lowrank"))
        if bp is None or gl is None:
            continue
        gap = gl.get("loss_gap_vs_backprop") or loss_gap(bp, gl)
        out.append(
            {
                "base": base,
                "steps": gap["steps"],
                "max_loss_gap_first_10": gap["first_10"],
                "max_loss_gap": gap["all"],
                "final_weight_gap": gl.get("weights_vs_backprop"),
                "test_accuracy_backprop": bp["test_accuracy"],
                "test_accuracy_gl": gl["test_accuracy"],
            }
        )
    return out


def tables(res: dict[str, Any]) -> str:
    cells = [c for c in res["results"] if "error" not in c]
    by = {(c["base"], c["method"]): c for c in cells}
    headers = ["base", "zero-shot", *(METHODS[m][2] for m in METHODS)]
    rows = []
    for base in BASES:
        if not any(b == base for b, _ in by):
            continue
        zs = by.get((base, "lora"), {}).get("zero_shot_accuracy")
        row: list[Any] = [base, _pct(zs)]
        for m in METHODS:
            c = by.get((base, m))
            row.append("—" if c is None else f"{_pct(c['test_accuracy'])} ({c['trainable_params']:,})")
        rows.append(row)
    steps = ", ".join(f"{b} {by[(b, 'lora')]['steps']}" for b in BASES if (b, "lora") in by)
    text = [f"Test accuracy % (trainable parameters); steps per cell: {steps}", markdown_table(headers, rows)]
    lrs = res.get("lr") or {}
    if lrs:
        text.append("Learning rate (Adam, constant): " + ", ".join(f"{f} {v:g}" for f, v in sorted(lrs.items())))
    chk = gl_check(cells)
    if chk:
        text.append(
            markdown_table(
                [
                    "base",
                    "steps",
                    "max loss gap, first 10 steps",
                    "max loss gap, all steps",
                    "final weights max gap",
                    "test acc backprop",
                    "test acc gl",
                ],
                [
                    [
                        c["base"],
                        c["steps"],
                        c["max_loss_gap_first_10"],
                        c["max_loss_gap"],
                        c["final_weight_gap"],
                        _pct(c["test_accuracy_backprop"]),
                        _pct(c["test_accuracy_gl"]),
                    ]
                    for c in chk
                ],
                digits=8,
            )
        )
    check = res.get("lr_check") or []
    if check:
        lr_vals = sorted({x["lr"] for x in check})
        fams = sorted({(x["family"], x["base"]) for x in check})
        acc = {(x["family"], x["base"], x["lr"]): x["val_accuracy"] for x in check}
        text.append(
            "LR check (validation accuracy %):\n\n"
            + markdown_table(
                ["family", "base", *(f"lr {v:g}" for v in lr_vals)],
                [[f, b, *(_pct(acc.get((f, b, v))) for v in lr_vals)] for f, b in fams],
            )
        )
    return "\n\n".join(text)


def plot(res: dict[str, Any], out: Path) -> Path:
    cells = [c for c in res["results"] if "error" not in c]
    panels = {
        f"{b} base": {METHODS[c["method"]][2]: tuple(zip(*c["curve"])) for c in cells if c["base"] == b and c["curve"]}
        for b in BASES
        if any(c["base"] == b for c in cells)
    }
    return panel_plot(
        out / "curves.png",
        panels,
        "step",
        "validation accuracy",
        "Fashion-MNIST, frozen random bases: full vs LoRA vs ColA",
    )


def report(res: dict[str, Any], out: Path) -> int:
    text = tables(res)
    print("\n" + text)
    (out / "table.md").write_text(text + "\n")
    plot(res, out)
    failed = [c for c in res["results"] if "error" in c]
    for c in failed:
        print(f"FAILED {c['base']} {c['method']}")
    print(
        f"\n{len(res['results']) - len(failed)} cells, {len(failed)} failed; wrote {out}/results.json, table.md, "
        "curves.png"
    )
    return 0


# -- the suite ----------------------------------------------------------------------------------------------------
def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks cola_image", description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="3 steps per cell, 600 rows, 50-row evaluations")
    p.add_argument("--bases", default=",".join(BASES), help="comma list of: " + ", ".join(BASES))
    p.add_argument("--methods", default=",".join(METHODS), help="comma list of: " + ", ".join(METHODS))
    p.add_argument("--steps", type=int, default=2000, help="optimizer steps per linear/MLP cell")
    p.add_argument("--cnn-steps", type=int, default=1000, help="optimizer steps per CNN cell")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lrs", default=",".join(f"{x:g}" for x in LRS), help="learning rates the check compares")
    p.add_argument("--lr-steps", type=int, default=300, help="steps per LR-check run (0: use DEFAULT_LR)")
    p.add_argument("--eval-rows", type=int, default=2000, help="validation rows per curve point")
    p.add_argument("--test-rows", type=int, default=None, help="test rows scored (default: all 10,000)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per cell")
    p.add_argument("--cell-timeout", type=float, default=1800)
    p.add_argument("--out", default=None, help="output folder (default runs/bench/cola_image)")
    p.add_argument("--report", action="store_true", help="only rebuild table.md and curves.png from results.json")
    p.add_argument(
        "--merge",
        nargs="+",
        default=[],
        metavar="DIR",
        help="with --report: also take the cells of these output folders (a later cell replaces an "
        "earlier one of the same base and method)",
    )
    return p.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse(argv)
    set_offline()
    for name, valid in (("bases", BASES), ("methods", METHODS)):
        bad = [x for x in getattr(args, name).split(",") if x not in valid]
        if bad:
            print(f"unknown {name} {bad}; valid: {', '.join(valid)}")
            return 2
    if args.merge and not args.report:  # merging only rebuilds tables; it must not start a new run
        print("--merge only works with --report (it merges existing results.json files)")
        return 2
    out = out_dir("cola_image", args.smoke, args.out)
    if args.report:
        res: dict[str, Any] = {}
        merged: dict[tuple[str, str], dict[str, Any]] = {}
        for folder in [out, *map(Path, args.merge)]:
            saved = folder / "results.json"
            if not saved.exists():
                continue
            got = json.loads(saved.read_text())
            for key in ("lr", "lr_check", "args"):
                res.setdefault(key, got.get(key))
            for c in got.get("results", []):
                merged[(c["base"], c["method"])] = c
        res.update(results=list(merged.values()), gl_check=gl_check(list(merged.values())))
        if args.merge:
            res.update(machine=machine(), merged_from=[str(out), *args.merge])
            write_json(out / "results.json", {**res, "results": [compact(c) for c in res["results"]]})
        return report(res, out)

    started = time.perf_counter()
    if args.smoke:
        args.lrs, args.lr_steps, args.steps, args.cnn_steps, args.batch_size = "1e-3,1e-2", 3, 4, 3, 8
    res = {"machine": machine(), "args": vars(args), "results": []}
    if args.lr_steps > 0:
        res["lr"], res["lr_check"] = lr_check(args, out)
    else:
        res["lr"], res["lr_check"] = dict(DEFAULT_LR), []

    def save() -> None:
        res["gl_check"] = gl_check(res["results"])
        res["wall_seconds"] = time.perf_counter() - started
        write_json(out / "results.json", {**res, "results": [compact(c) for c in res["results"]]})

    methods = args.methods.split(",")
    for base in args.bases.split(","):
        steps = args.cnn_steps if base == "cnn" else args.steps
        for method in [m for m in METHODS if m in methods]:
            kw = _cell_kw(args, out / "runs", base, method, res["lr"][METHODS[method][0]], steps)
            t0 = time.perf_counter()
            r = _run(args, kw)
            if "error" not in r and method == "cola_lowrank":
                lora = next(
                    (c for c in res["results"] if (c["base"], c["method"]) == (base, "lora") and "error" not in c), None
                )
                if lora is not None:
                    r["weights_vs_backprop"] = weights_gap(lora["run_dir"], r["run_dir"])
                    r["loss_gap_vs_backprop"] = loss_gap(lora, r)
            res["results"].append(r)
            save()
            if "error" not in r:
                print(
                    f"  {base:6} {method:12} test acc {_pct(r['test_accuracy'])} params {r['trainable_params']:,} "
                    f"{time.perf_counter() - t0:.0f} s",
                    flush=True,
                )
    report(res, out)
    save()
    print(f"({time.perf_counter() - started:.0f} s)")
    return 1 if any("error" in c for c in res["results"]) else 0
