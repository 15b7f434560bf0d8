"""``cotune eval --adapter DIR [--config CONFIG.yaml | --task KIND --data PATH --model M] [key=value ...]``.

Evaluates a saved adapter on one split (validation by default) and prints the task's metrics as JSON.
Without ``--config`` the run's own ``config.yaml`` (beside the adapter folder) is used when there is one.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--adapter", required=True, help="adapter folder (RUN/adapter, RUN/checkpoint-N/adapter, or a PEFT folder)"
    )
    p.add_argument("--config", help="training config (default: the run's config.yaml beside the adapter)")
    p.add_argument("--model", help="base model (default: the config's / the adapter's base_model_name_or_path)")
    p.add_argument("--task", dest="kind", help="task kind: seq_cls | causal_lm | multiple_choice | image_cls | seq2seq")
    p.add_argument("--data", help="data set folder/file (or hub name online)")
    p.add_argument(
        "--split", default="validation", help="split to evaluate: train | validation | test (default validation)"
    )
    p.add_argument("--limit", type=int, help="evaluate at most this many rows")
    p.add_argument("--batch-size", type=int, help="evaluation batch size (default: the config's eval_batch_size)")
    p.add_argument("--out", help="also write the metrics to this JSON file")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument(
        "overrides", nargs="*", metavar="key=value", help="config overrides, e.g. task.options.max_length=64"
    )


def run(args: argparse.Namespace) -> int:
    from cotune.training.saved import eval_config, load_trained
    from cotune.training.trainer import isolated_rng

    cfg = eval_config(
        args.adapter, args.config, args.overrides, model=args.model, task={"kind": args.kind, "data": args.data}
    )
    task, model = load_trained(cfg, args.adapter)
    rows = task.load(args.split).rows
    model.eval()
    import torch

    from cotune.tasks.progress import progress

    with isolated_rng(), torch.no_grad(), progress(not args.quiet):
        metrics = task.evaluate(model, list(rows), args.batch_size or cfg.eval_batch_size, args.limit)
    out = {"adapter": str(args.adapter), "split": args.split, **{k: float(v) for k, v in metrics.items()}}
    print(json.dumps(out, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1))
    return 0
