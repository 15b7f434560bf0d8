"""MeZO that learns: prompt-based SST-2 through SmolLM2's LM head, zeroth order against backprop on the same prompt.

``python -m benchmarks mezo_prompt [--steps 400] [--batch 16] [--eval-rows 300]`` trains on SST-2 as MeZO's paper
does it: each sentence becomes ``"{sentence} It was"`` and the label words `` terrible`` / `` great`` are scored
by their log-likelihood through the LM head (``multiple_choice`` with ``template`` + ``verbalizer``), so training
starts from the model's zero-shot accuracy instead of a random classification head. Cells: low-rank adapters with
ZO-SGD and ZO-Adam, LoRETTA's tensor-train update (``loretta_rep``) with ZO-SGD, and low-rank with backprop (AdamW)
on the same prompt, rows and steps (the gap zeroth order leaves). Every cell reports the dev accuracy of the
untrained model (zero-shot), its best and final dev accuracy and its curve. Writes
``runs/bench/mezo_prompt/results.json`` and ``mezo_prompt.png``; ``--report`` rebuilds them from the results
file, ``--cells`` runs a subset. ``--collect DIR...`` merges the cells of earlier runs (their ``--out``
folders) into ``--out``, rebuilding from its training log any cell stopped before its last step (its
seconds are then the log's wall time, evaluations included). ``--smoke``: 2 steps, 8 dev rows.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from benchmarks._common import DATA, machine, markdown_table, out_dir, set_offline, write_json

#: name -> (template, verbalizer). ``it_was`` is MeZO's SST-2 prompt; SmolLM2-135M answers it with one word for
#: almost every sentence (a degenerate 52% start). ``review`` starts at 77% with both words in use.
PROMPTS: dict[str, tuple[str, list[str]]] = {
    "it_was": ("{text} It was", ["terrible", "great"]),
    "review": ("Review: {text}\nSentiment:", ["negative", "positive"]),
}
#: name -> (method, method options, engine, engine options, optimizer, lr). MeZO's LoRA grid is lr 1e-4 / 5e-5 with
#: eps 1e-2 over 20k+ steps; a CPU budget of a few hundred steps takes the best rate of a short sweep (ZO-SGD at
#: 100 steps, batch 8, 200 dev rows: lr 3e-3 beat 1e-2 and 3e-2 for both families; docs/RESULTS.md).
CELLS: dict[str, tuple[str, dict, str, dict, str, float]] = {
    "lowrank_zo_sgd": ("lowrank", {"r": 8, "lora_alpha": 16}, "zo", {"eps": 1e-2, "zo_optimizer": "sgd"}, "sgd", 3e-3),
    "lowrank_zo_adam": ("lowrank", {"r": 8, "lora_alpha": 16}, "zo", {"eps": 1e-2, "zo_optimizer": "adam"}, "adamw",
                        1e-4),
    "loretta_rep_zo_sgd": ("loretta_rep", {}, "zo", {"eps": 1e-2, "zo_optimizer": "sgd"}, "sgd", 3e-3),
    "lowrank_backprop": ("lowrank", {"r": 8, "lora_alpha": 16}, "backprop", {}, "adamw", 1e-4),
}


def task_options(a: argparse.Namespace) -> dict[str, Any]:
    template, verbalizer = PROMPTS[a.prompt]
    return {"template": template, "verbalizer": verbalizer, "max_length": a.max_len}


def run_cell(name: str, a: argparse.Namespace, out: Path) -> dict[str, Any]:
    from benchmarks.quality import _curves, _read_log
    from cotune.training.config import config_from_dict
    from cotune.training.trainer import train

    method, mopts, engine, eopts, opt, lr = CELLS[name]
    lr = a.lr if a.lr is not None else lr
    if engine == "zo":
        eopts = {**eopts, "n_directions": a.n_directions}
    cfg = config_from_dict({
        "model": "smollm2",
        "task": {"kind": "multiple_choice", "data": str(DATA / "glue" / "SST-2"), "options": task_options(a)},
        "method": {"name": method, "options": dict(mopts)}, "engine": {"name": engine, "options": dict(eopts)},
        "optim": {"optimizer": opt, "lr": lr, "scheduler": "constant"}, "seed": a.seed, "batch_size": a.batch,
        "eval_batch_size": 32, "max_steps": a.steps, "eval_every": a.eval_every, "eval_limit": a.eval_rows,
        "save_every": 0, "keep_checkpoints": 1, "overwrite": True, "progress": False,
        "output_dir": str(out / "runs" / name),
    })
    t0 = time.perf_counter()
    res = train(cfg, verbose=False)
    evals, trains = _read_log(Path(cfg.output_dir) / "log.jsonl")
    return {"cell": name, "method": method, "engine": engine, "optimizer": eopts.get("zo_optimizer", opt), "lr": lr,
            "n_directions": eopts.get("n_directions"), "best": res.validation.get("accuracy"), "best_step": res.best_step,
            "trainable_params": res.trainable_parameters, "train_seconds": res.train_seconds,
            "seconds": time.perf_counter() - t0, **_curves(evals, trains, "accuracy")}


def collect(dirs: list[str]) -> dict[str, Any]:
    """One results dict from earlier runs' ``--out`` folders; a cell without a result is rebuilt from its log."""
    import yaml

    from benchmarks.quality import _curves, _records, _split

    res: dict[str, Any] = {}
    for d in map(Path, dirs):
        done = json.loads((d / "results.json").read_text()) if (d / "results.json").exists() else {"cells": []}
        cells = {c["cell"]: c for c in done["cells"]}
        for log in sorted(d.glob("runs/*/log.jsonl")):
            name = log.parent.name
            if name in cells:
                continue
            cfg = yaml.safe_load((log.parent / "config.yaml").read_text())
            records = _records(log)
            evals, trains = _split(records)
            if not evals:  # stopped before its first evaluation: nothing to report
                continue
            start = records[0]
            best = max(evals, key=lambda e: e["accuracy"])
            eopts = cfg["engine"]["options"]
            cells[name] = {
                "cell": name, "method": cfg["method"]["name"], "engine": cfg["engine"]["name"],
                "optimizer": eopts.get("zo_optimizer", cfg["optim"]["optimizer"]), "lr": cfg["optim"]["lr"],
                "n_directions": eopts.get("n_directions"), "best": best["accuracy"], "best_step": best["step"],
                "trainable_params": start["trainable_parameters"], "stopped_at": trains[-1]["step"],
                "train_seconds": log.stat().st_mtime - (log.parent / "config.yaml").stat().st_mtime,
                **_curves(evals, trains, "accuracy"),
            }
        base = {k: v for k, v in done.items() if k != "cells"}
        res = {**base, **res, "cells": res.get("cells", []) + list(cells.values())}
    return res


def zero_shot(a: argparse.Namespace) -> float:
    """Dev accuracy of the untrained model on the rows every cell is scored on."""
    from cotune.models import load_model
    from cotune.tasks import make_task

    task = make_task("multiple_choice", str(DATA / "glue" / "SST-2"), "smollm2", **task_options(a))
    return task.evaluate(load_model("smollm2", "causal_lm"), task.load("validation").rows[: a.eval_rows], 32)[
        "accuracy"]


def report(res: dict[str, Any], out: Path) -> str:
    zs = res["zero_shot"]
    rows = [[c["cell"], f"{c['lr']:g}", c["trainable_params"], c.get("stopped_at", res["steps"]), 100 * zs,
             100 * (c["best"] or 0), 100 * ((c["best"] or 0) - zs), 100 * (c["final"] or 0), c["best_step"],
             f"{c['train_seconds']:.0f}"] for c in res["cells"]]
    table = markdown_table(["cell", "lr", "trainable", "steps", "zero-shot %", "best dev %", "gain (points)",
                            "final dev %", "best step", "train s"], rows, digits=1)
    from benchmarks._common import _plt

    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    for c in res["cells"]:
        ax.plot([0] + [s for s, _ in c["curve"]], [100 * zs] + [100 * v for _, v in c["curve"]], marker=".",
                label=c["cell"])
    ax.axhline(100 * zs + 5, color="gray", ls=":", label="zero-shot + 5 (target)")
    ax.set_xlabel("step")
    ax.set_ylabel(f"SST-2 dev accuracy % ({res['eval_rows']} rows)")
    ax.set_title(f"SST-2 through SmolLM2-135M-Instruct's LM head ({res.get('prompt', 'it_was')} prompt)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "mezo_prompt.png", dpi=110)
    plt.close(fig)
    return table


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks mezo_prompt", description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--report", action="store_true", help="rebuild the table and plot from results.json")
    p.add_argument("--cells", nargs="+", default=list(CELLS), choices=list(CELLS))
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--eval-rows", type=int, default=300)
    p.add_argument("--max-len", type=int, default=64)
    p.add_argument("--prompt", default="it_was", choices=list(PROMPTS))
    p.add_argument("--n-directions", type=int, default=1, help="MeZO: directions averaged per step")
    p.add_argument("--lr", type=float, default=None, help="override every cell's learning rate (a sweep)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None)
    p.add_argument("--collect", nargs="+", default=None, metavar="DIR", help="merge earlier runs' --out folders")
    a = p.parse_args(argv)
    if a.smoke:
        a.steps, a.batch, a.eval_every, a.eval_rows = 2, 2, 2, 8
    out = out_dir("mezo_prompt", a.smoke, a.out)
    if a.collect:
        res = collect(a.collect)
        write_json(out / "results.json", res)
    elif a.report:
        res = json.loads((out / "results.json").read_text())
    else:
        import torch

        set_offline()
        torch.set_num_threads(a.threads)
        res = {"prompt": a.prompt, "template": PROMPTS[a.prompt][0], "verbalizer": PROMPTS[a.prompt][1],
               "n_directions": a.n_directions, "steps": a.steps, "batch": a.batch,
               "eval_rows": a.eval_rows, "machine": machine(), "zero_shot": zero_shot(a), "cells": []}
        for name in a.cells:
            res["cells"].append(run_cell(name, a, out))
            c = res["cells"][-1]
            print(f"{name}: best {100 * c['best']:.1f}% at step {c['best_step']} (zero-shot "
                  f"{100 * res['zero_shot']:.1f}%), {c['train_seconds']:.0f} s", flush=True)
            write_json(out / "results.json", res)
    print(report(res, out))
    return 0
