"""MMLU on SmolLM2-135M-Instruct before any training, checked against the model card's published score.

``python -m benchmarks mmlu_check [--per-subject 20] [--shots 0 5] [--scorings cloze letter]`` scores a
stratified sample of MMLU's test file (the same ``--per-subject`` questions of each of the 57 subjects, drawn
with a fixed seed from the whole file) with cotune's ``multiple_choice`` task, in each scoring and shot count,
and prints each accuracy with its 95% interval beside the published number: SmolLM2-135M-Instruct's model card
reads **MMLU (cloze) 29.3** (lighteval, zero-shot; the base SmolLM2-135M reads 31.5). The letter format is the
MMLU paper's (lm-evaluation-harness's ``mmlu``), where models this small sit near chance (25%). Shots come from
the carved train split of the same subject (the file has no dev split); the question scored is never its own
shot. Writes ``runs/bench/mmlu_check/results.json`` (after each cell) and ``mmlu_check.png``; ``--merge`` keeps
the cells of an earlier run that this one does not measure; ``--report`` rebuilds the table and plot from the
results file. ``--smoke``: 2 questions per subject for 3 subjects, 0-shot.
"""

from __future__ import annotations

import argparse
import math
import random
import time
from typing import Any

from benchmarks._common import DATA, machine, markdown_table, out_dir, set_offline, write_json

SCORINGS = ("cloze", "letter")
#: SmolLM2-135M-Instruct's model card (HuggingFaceTB), "MMLU (cloze)", lighteval, zero-shot, in %.
PUBLISHED = {"SmolLM2-135M-Instruct": 29.3, "SmolLM2-135M (base)": 31.5}


def sample(rows: list[dict], per_subject: int, seed: int = 0, subjects: int | None = None) -> list[dict]:
    """``per_subject`` rows of each subject (all of a smaller one), drawn with ``seed``, in subject order."""
    by: dict[str, list[dict]] = {}
    for r in rows:
        by.setdefault(r["subject"], []).append(r)
    rng = random.Random(seed)
    out: list[dict] = []
    for s in sorted(by)[:subjects]:
        out += rng.sample(by[s], min(per_subject, len(by[s])))
    return out


def interval(p: float, n: int) -> tuple[float, float]:
    """Wilson 95% interval of a proportion ``p`` over ``n`` questions."""
    z = 1.96
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return c - h, c + h


def measure(a: argparse.Namespace, res: dict[str, Any], path) -> None:
    """Score each (scoring, shots) cell; each one replaces its namesake in ``res`` and is saved at once."""
    import torch

    from cotune.models import load_model, load_tokenizer
    from cotune.tasks import make_task

    torch.set_num_threads(a.threads)
    model, tok = load_model("smollm2", "causal_lm").eval(), load_tokenizer("smollm2")
    for scoring in a.scorings:
        for k in a.shots:
            task = make_task("multiple_choice", str(DATA / "mmlu"), tokenizer=tok, scoring=scoring, n_shot=k,
                             max_length=a.max_length)
            every = [r for split in ("train", "validation", "test") for r in task.native(split).rows]
            rows = sample(every, a.per_subject, subjects=a.subjects)
            t0 = time.perf_counter()
            m = task.evaluate(model, rows, batch_size=a.batch_size)
            cell = {"scoring": scoring, "n_shot": k, "rows": len(rows), "seconds": time.perf_counter() - t0, **m}
            cell["interval"] = interval(m["accuracy"], len(rows))
            if "accuracy_norm" in m:
                cell["interval_norm"] = interval(m["accuracy_norm"], len(rows))
            print(f"{scoring} {k}-shot: {100 * m['accuracy']:.1f}% "
                  f"(norm {100 * m.get('accuracy_norm', float('nan')):.1f}%) on {len(rows)} rows, "
                  f"{cell['seconds']:.0f} s", flush=True)
            res["cells"] = [c for c in res["cells"] if (c["scoring"], c["n_shot"]) != (scoring, k)] + [cell]
            res["cells"].sort(key=lambda c: (SCORINGS.index(c["scoring"]), c["n_shot"]))
            write_json(path, res)


def report(res: dict[str, Any], out) -> str:
    def pct(p: float, iv: list[float]) -> str:
        return f"{100 * p:.1f} [{100 * iv[0]:.1f}, {100 * iv[1]:.1f}]"

    rows = []
    for c in res["cells"]:
        norm = pct(c["accuracy_norm"], c["interval_norm"]) if "accuracy_norm" in c else "—"
        pub = PUBLISHED["SmolLM2-135M-Instruct"] if (c["scoring"], c["n_shot"]) == ("cloze", 0) else None
        rows.append([c["scoring"], c["n_shot"], c["rows"], pct(c["accuracy"], c["interval"]), norm,
                     "—" if pub is None else f"{pub}", f"{c['seconds']:.0f}"])
    table = markdown_table(["scoring", "shots", "questions", "accuracy % [95% CI]", "length-normalised % [95% CI]",
                            "published %", "seconds"], rows)
    _plot(res, out / "mmlu_check.png")
    return table


def _plot(res: dict[str, Any], path) -> None:
    from benchmarks._common import _plt

    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 3.6))
    labels, vals, errs = [], [], []
    for c in res["cells"]:
        for key, ivk, tag in (("accuracy", "interval", ""), ("accuracy_norm", "interval_norm", " norm")):
            if key in c:
                labels.append(f"{c['scoring']}{tag}\n{c['n_shot']}-shot")
                vals.append(100 * c[key])
                errs.append([100 * (c[key] - c[ivk][0]), 100 * (c[ivk][1] - c[key])])
    ax.bar(range(len(vals)), vals, yerr=list(zip(*errs, strict=True)), capsize=3, color="tab:blue")
    ax.axhline(PUBLISHED["SmolLM2-135M-Instruct"], color="tab:red", ls="--", label="model card: cloze 0-shot 29.3")
    ax.axhline(25, color="gray", ls=":", label="chance 25")
    ax.set_xticks(range(len(vals)), labels, fontsize=7)
    ax.set_ylabel("MMLU accuracy %")
    ax.set_title("SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised) on MMLU")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks mmlu_check", description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--report", action="store_true", help="rebuild the table and plot from results.json")
    p.add_argument("--merge", action="store_true", help="keep the other cells of an earlier results.json")
    p.add_argument("--per-subject", type=int, default=20)
    p.add_argument("--subjects", type=int, default=None, help="only the first N subjects (alphabetical)")
    p.add_argument("--shots", type=int, nargs="+", default=[0, 5])
    p.add_argument("--scorings", nargs="+", default=list(SCORINGS), choices=SCORINGS)
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    if a.smoke:
        a.per_subject, a.subjects, a.shots = 2, 3, [0]
    out = out_dir("mmlu_check", a.smoke, a.out)
    path = out / "results.json"
    if a.report or a.merge:
        import json

        res = json.loads(path.read_text())
    if not a.report:
        set_offline()
        keep = res["cells"] if a.merge else []
        res = {"model": "smollm2", "published": PUBLISHED, "machine": machine(), "cells": keep}
        measure(a, res, path)
    print(report(res, out))
    return 0
