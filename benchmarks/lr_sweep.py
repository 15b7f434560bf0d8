"""A learning rate per adapter family: a short sweep on one task, the best rate of each family kept.

``python -m benchmarks lr_sweep [--methods lowrank,kron,...] [--factors 0.3 1 3] [--steps 150]`` trains every
method of ``benchmarks.quality.METHODS`` (MiniLM, mean pooling, backprop, the quality suite's optimizer and
linear schedule with 10% warm-up) on SST-2 (``--task``) at its rate (``quality.method_lr``: the family's ``default_lr``
unless the method names its own) times each factor, and reports each family's
best dev score per rate and the rate that won. A rate is only replaced when another one beats it by more
than ``--margin`` points (default 1.0: about the noise of 300 dev rows at 80%), so the table never moves a
default on noise. Each cell runs in a fresh interpreter (``run_isolated``); ``--jobs 2`` runs two at once.
Writes ``runs/bench/lr_sweep/results.json`` after each cell and ``lr_sweep.png``; ``--report`` rebuilds the
table and plot, ``--merge DIR...`` (with ``--report``) takes the cells of other runs too (another sweep's, or a
``benchmarks quality`` run's backprop cells of the same task, steps and batch).
``--smoke``: lowrank at its own rate, 2 steps.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any

from benchmarks._common import machine, markdown_table, out_dir, run_isolated, set_offline, write_json
from benchmarks.quality import GLUE_TASKS, METHODS, method_lr


def chosen(cells: list[dict[str, Any]], current: float, margin: float) -> dict[str, Any] | None:
    """The winning cell of one family: the best dev score, unless the current rate is within ``margin``."""
    ok = [c for c in cells if "error" not in c and c.get("best") is not None]
    if not ok:
        return None
    best = max(ok, key=lambda c: c["best"])
    here = next((c for c in ok if abs(c["lr"] - current) <= 1e-12 * current), None)
    return here if here is not None and best["best"] - here["best"] <= margin / 100 else best


def across(sweeps: list[dict[str, Any]]) -> dict[str, float]:
    """Each family's rate over sweeps on different tasks (each a results.json): a family swept on one task keeps
    that sweep's ``chosen``; one swept on several takes, among the rates every task measured, the rate whose
    largest shortfall from a task's best score is smallest (no task may lose much to another's winner). A task
    swept at several budgets speaks through its longest: a short run measures how soon a rate leaves the
    constant prediction, which the longer run of the same task includes, and it must not outvote it."""
    def ok(c: dict[str, Any]) -> bool:
        return "error" not in c and c.get("best") is not None

    longest: dict[tuple[str, str], dict[str, Any]] = {}  # (family, task) -> the sweep that speaks for it
    for s in sweeps:
        for method in dict.fromkeys(c["method"] for c in s["cells"] if ok(c)):  # in order: a stable table
            key = (method, s["task"])
            if key not in longest or s.get("steps", 0) > longest[key].get("steps", 0):
                longest[key] = s
    by_family: dict[str, list[dict[str, Any]]] = {}
    for (method, _), s in longest.items():
        by_family.setdefault(method, []).append(s)
    rates: dict[str, float] = {}
    for method, swept in by_family.items():
        if len(swept) == 1:
            only = swept[0].get("chosen", {}).get(method)
            if only is not None:
                rates[method] = only
            continue
        tables = [{c["lr"]: c["best"] for c in s["cells"] if c["method"] == method and ok(c)} for s in swept]
        common = set.intersection(*(set(t) for t in tables))
        if common:
            rates[method] = min(sorted(common), key=lambda lr: max(max(t.values()) - t[lr] for t in tables))
    return rates


def centre(cell: dict[str, Any]) -> float:
    """The rate a cell's sweep was centred on (its factor was typed or stored rounded: 0.333, 0.3333)."""
    return float(f"{cell['lr'] / cell['factor']:.2g}")


def merged_cells(saved: dict[str, Any], res: dict[str, Any]) -> list[dict[str, Any]]:
    """The cells another run adds to the sweep ``res``: a sweep's own, or a quality run's backprop cells of the
    same task, budget and families (a converged cell at the default rate is that rate's point of the sweep)."""
    if "cells" in saved:
        return saved["cells"]
    swept = {c["method"] for c in res["cells"]}
    keep = ("best", "best_step", "final", "curve", "trainable_params", "train_seconds", "seconds")
    return [{"method": r["method"], "factor": 1.0, "lr": r["lr"], **{k: r[k] for k in keep}}
            for r in saved["results"] if r.get("suite") == "glue" and r.get("engine") == "backprop" and "error" not in r
            and r["method"] in swept and r["task"] == res["task"] and r["steps"] == res["steps"]
            and r["config"]["batch_size"] == res["batch"]]


def merge(res: dict[str, Any], saved: dict[str, Any]) -> None:
    """Adds another run's cells (``merged_cells``) to the sweep ``res``, replacing a family's cell at the same
    rate. Factors stay relative to the rate the family's sweep was centred on: the sweep's own, or, for a family
    the sweep did not have, the first merged cell's (so that a later quality cell does not land in its column)."""
    centres = {c["method"]: centre(c) for c in res["cells"]}
    for c in merged_cells(saved, res):
        c = dict(c, factor=float(f"{c['lr'] / centres.setdefault(c['method'], centre(c)):.3g}"))
        res["cells"] = [x for x in res["cells"] if (x["method"], x["lr"]) != (c["method"], c["lr"])] + [c]


def report(res: dict[str, Any], out: Path, margin: float) -> str:
    from benchmarks._common import _plt

    by: dict[str, list[dict[str, Any]]] = {}
    for c in res["cells"]:
        by.setdefault(c["method"], []).append(c)

    def column(factor: float) -> float:  # 0.333 and 0.3333 (factors typed by hand) share a column
        return float(f"{factor:.2g}")

    factors = sorted({column(c["factor"]) for c in res["cells"]})
    rows, winners = [], {}
    for method, cells in by.items():
        cur = centre(cells[0])
        win = chosen(cells, cur, margin)
        winners[method] = None if win is None else win["lr"]
        at = {column(c["factor"]): c for c in cells}
        rows.append([method, f"{cur:.1e}", *[
            "—" if f not in at else "failed" if "error" in at[f] else f"{100 * at[f]['best']:.1f}" for f in factors],
            "—" if win is None else f"{win['lr']:.1e}"])
    table = markdown_table(["family", "current lr", *[f"× {f:g}" for f in factors], "chosen lr"], rows)
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for method, cells in by.items():
        ok = sorted((c for c in cells if "error" not in c), key=lambda c: c["lr"])
        ax.plot([c["lr"] for c in ok], [100 * c["best"] for c in ok], marker="o", label=method)
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel(f"best {GLUE_TASKS[res['task']][2]} on {res['eval_rows']} dev rows")
    ax.set_title(f"Learning-rate sweep, MiniLM, {res['steps']} steps of {res['batch']}")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out / "lr_sweep.png", dpi=110)
    plt.close(fig)
    res["chosen"] = winners
    return table


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks lr_sweep", description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--report", action="store_true", help="rebuild the table and plot from results.json")
    p.add_argument("--merge", nargs="+", default=[], metavar="DIR", help="with --report: other runs' cells too")
    p.add_argument("--methods", default=",".join(METHODS), help="comma list of: " + ", ".join(METHODS))
    p.add_argument("--factors", type=float, nargs="+", default=[0.3, 1.0, 3.0])
    p.add_argument("--task", default="sst2")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--eval-rows", type=int, default=300)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--margin", type=float, default=1.0, help="points a new rate must win by")
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    methods = a.methods.split(",")
    if bad := [m for m in methods if m not in METHODS]:
        print(f"unknown methods {bad}; valid: {', '.join(METHODS)}")
        return 2
    if a.merge and not a.report:
        print("--merge only works with --report")
        return 2
    if a.smoke:
        methods, a.factors, a.steps, a.batch, a.eval_rows, a.max_length = ["lowrank"], [1.0], 2, 4, 8, 32
    out = out_dir("lr_sweep", a.smoke, a.out)
    path = out / "results.json"
    if a.report:
        res = json.loads(path.read_text())
        for folder in a.merge:
            merge(res, json.loads((Path(folder) / "results.json").read_text()))
        print(report(res, out, a.margin))
        write_json(path, res)
        return 0
    set_offline()
    res = {"task": a.task, "steps": a.steps, "batch": a.batch, "eval_rows": a.eval_rows, "margin": a.margin,
           "machine": machine(), "cells": []}

    def one(method: str, factor: float) -> dict[str, Any]:
        lr = float(f"{method_lr(method) * factor:.2g}")
        kw = {"task": a.task, "method": method, "engine": "backprop", "steps": a.steps, "batch": a.batch,
              "max_len": a.max_length, "seed": 0, "out": str(out / "runs" / f"{method}_{lr:g}"),
              "eval_every": max(1, a.steps // 3), "threads": a.threads, "eval_limit": a.eval_rows, "lr": lr}
        try:
            r = run_isolated("benchmarks.quality:run_cell", kw, timeout=3600, threads=a.threads)
        except (RuntimeError, subprocess.TimeoutExpired) as e:  # one family's failure must not lose the others
            return {"method": method, "factor": factor, "lr": lr, "error": str(e)[-2000:]}
        keep = ("best", "best_step", "final", "curve", "trainable_params", "train_seconds", "seconds")
        return {"method": method, "factor": factor, "lr": lr, **{k: r[k] for k in keep}}

    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=max(1, a.jobs)) as pool:
        futures = [pool.submit(one, m, f) for m in methods for f in a.factors]
        for fut in as_completed(futures):
            c = fut.result()
            res["cells"].append(c)
            msg = c.get("error", "").splitlines()[-1:] or [f"best {100 * c['best']:.1f}%"]
            print(f"  {c['method']:12} lr {c['lr']:.1e}: {msg[0]}  ({time.perf_counter() - t0:.0f} s)", flush=True)
            write_json(path, res)
    res["cells"].sort(key=lambda c: (methods.index(c["method"]), c["lr"]))
    print(report(res, out, a.margin))
    write_json(path, res)
    return 1 if any("error" in c for c in res["cells"]) else 0
