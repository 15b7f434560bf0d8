"""SST-2 with MiniLM + LoRA (lowrank r=8, scale 1, every linear layer) + the trained head, via ``cotune.training.train``.

Target: >= 85% SST-2 dev accuracy within 15 minutes on 2 CPU cores. The run is exactly what
``cotune train examples/lora_minilm_sst2.yaml`` does (400 steps of 32, AdamW lr 2e-3, linear decay, max length 64); ``--peft`` also trains the same
LoRA with Hugging Face PEFT on the same batches in a plain loop and reports the accuracy and time ratios.

    python -m benchmarks sst2_minilm            # the full run (prints a table, writes runs/bench/sst2_minilm/)
    python -m benchmarks sst2_minilm --smoke    # a few steps, < 30 s
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "glue" / "SST-2"
BUDGET_S = 15 * 60
TARGET = 0.85


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks sst2_minilm", description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="a few steps on a few rows (< 30 s)")
    p.add_argument("--data", default=str(DATA), help="the GLUE SST-2 folder (train.tsv, dev.tsv)")
    p.add_argument("--out", default=str(REPO / "runs" / "bench" / "sst2_minilm"))
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--eval-every", type=int, default=200)
    p.add_argument(
        "--targets",
        default="query,key,value,dense",
        help="comma-separated module suffixes for LoRA (default: every linear layer; 'query,value' is LoRA's classic)",
    )
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (the target is stated for 2 cores)")
    p.add_argument("--peft", action="store_true", help="also train the same LoRA with Hugging Face PEFT and compare")
    return p.parse_args(argv)


def config(args: argparse.Namespace):
    from cotune.training.config import config_from_dict

    smoke = args.smoke
    return config_from_dict(
        {
            "model": "minilm",
            "task": {"kind": "seq_cls", "data": args.data, "options": {"max_length": args.max_length}},
            "method": {
                "name": "lowrank",
                "options": {"r": 8, "lora_alpha": 8, "target_modules": args.targets.split(",")},
            },
            "engine": {"name": "backprop"},
            "optim": {"optimizer": "adamw", "lr": args.lr, "scheduler": "linear", "warmup_steps": 0 if smoke else 30},
            "seed": 0,
            "batch_size": 8 if smoke else args.batch_size,
            "eval_batch_size": 64,
            "max_steps": 3 if smoke else args.steps,
            "train_limit": 64 if smoke else None,
            "eval_every": 0 if smoke else args.eval_every,
            "eval_limit": 32 if smoke else None,
            "save_every": 0,
            "keep_checkpoints": 1,
            "overwrite": True,
            "progress": not smoke,
            "output_dir": str(Path(args.out) / ("smoke" if smoke else "cotune")),
        }
    )


def train_peft(cfg) -> dict[str, float]:
    """The same LoRA (same targets, r 8, alpha 8, classifier in modules_to_save) trained by PEFT on the same batches."""
    import torch
    from peft import LoraConfig, get_peft_model

    from cotune.engines.base import make_optimizer, make_scheduler
    from cotune.tasks import make_task
    from cotune.tasks.order import epoch_order
    from cotune.training.trainer import seed_everything, split_rows

    seed_everything(cfg.seed)
    task = make_task(cfg.task.kind, cfg.task.data, model=cfg.model, **cfg.task_options())
    model = task.build_model(cfg.model)
    targets = list(cfg.method.options["target_modules"])
    lora = LoraConfig(r=8, lora_alpha=8, target_modules=targets, modules_to_save=["classifier"], task_type="SEQ_CLS")
    model = get_peft_model(model, lora)
    rows, _ = split_rows(task.load("train").rows, cfg)
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    opt = make_optimizer(params, cfg.optim)
    from dataclasses import replace

    sched = make_scheduler(opt, replace(cfg.optim, total_steps=cfg.max_steps))
    spe = -(-len(rows) // cfg.batch_size)
    t0 = time.perf_counter()
    model.train()
    for step in range(cfg.max_steps):
        epoch, pos = divmod(step, spe)
        idx = epoch_order(len(rows), cfg.seed, epoch)[pos * cfg.batch_size : (pos + 1) * cfg.batch_size]
        loss = task.loss(model, task.collate([rows[i] for i in idx]))
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - t0
    val = task.load("validation").rows
    model.eval()
    with torch.no_grad():
        metrics = task.evaluate(model, list(val), cfg.eval_batch_size, cfg.eval_limit)
    return {"accuracy": float(metrics["accuracy"]), "train_seconds": seconds, "steps": cfg.max_steps}


def main(argv: list[str]) -> int:
    args = parse(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    from cotune.training.trainer import train

    torch.set_num_threads(args.threads)
    cfg = config(args)
    t0 = time.perf_counter()
    res = train(cfg, verbose=not args.smoke)
    seconds = time.perf_counter() - t0
    acc = res.validation.get("accuracy", float("nan"))
    rows = [("cotune lowrank r8 + head", acc, res.train_seconds, seconds, res.steps)]
    summary: dict[str, object] = {
        "accuracy": acc,
        "best_step": res.best_step,
        "seconds": seconds,
        "train_seconds": res.train_seconds,
        "steps": res.steps,
        "threads": args.threads,
        "load_average": os.getloadavg()[0],
        "trainable_parameters": res.trainable_parameters,
        "smoke": args.smoke,
        "target": {"accuracy": TARGET, "seconds": BUDGET_S},
    }
    if args.peft:
        peft = train_peft(cfg)
        rows.append(
            ("PEFT LoRA r8 + head (same batches)", peft["accuracy"], peft["train_seconds"], float("nan"), cfg.max_steps)
        )
        summary["peft"] = peft
        summary["accuracy_ratio_cotune_over_peft"] = acc / peft["accuracy"]
        summary["train_time_ratio_cotune_over_peft"] = res.train_seconds / peft["train_seconds"]
    print(f"\n{'run':<40} {'dev accuracy':>12} {'train s':>9} {'total s':>9} {'steps':>6}")
    for name, a, ts, s, n in rows:
        print(f"{name:<40} {a:>12.4f} {ts:>9.1f} {s:>9.1f} {n:>6}")
    if not args.smoke:
        ok = acc >= TARGET and seconds <= BUDGET_S
        print(
            f"target >= {TARGET:.0%} within {BUDGET_S // 60} min on {args.threads} threads: {'met' if ok else 'NOT met'}"
            f" (load average {summary['load_average']:.1f}: other processes shared the cores)"
        )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / ("smoke.json" if args.smoke else "results.json")).write_text(json.dumps(summary, indent=1))
    return 0
