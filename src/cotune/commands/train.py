"""``cotune train CONFIG.yaml [key=value ...]``, or ``cotune train --control_name NAME [key=value ...]``.

Trains an adapter as the config says (see ``cotune.training.config.TrainConfig`` and ``examples/``) and
writes ``output_dir/``: ``config.yaml`` (resolved), ``log.jsonl``, ``learning_curve.png``, ``adapter/``
(the best adapter on the validation split, PEFT format), ``checkpoint-N/`` and ``results.json``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from cotune.errors import CotuneError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", help="YAML config (see examples/); optional with --control_name")
    p.add_argument(
        "overrides", nargs="*", metavar="key=value", help="config overrides, e.g. optim.lr=1e-3 max_steps=200"
    )
    p.add_argument(
        "--control_name",
        "--control-name",
        dest="control_name",
        help="a ColA run name, e.g. glue-sst2_roberta-base_sc_cola-lowrank-1_32 (add model=minilm offline)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing output_dir")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in output_dir")
    p.add_argument("--quiet", action="store_true", help="no progress bar or parameter table")


def resolve_config(args: argparse.Namespace):
    """The validated ``TrainConfig`` from the file, the run name and the overrides."""
    from cotune.training.config import load_config
    from cotune.training.control_name import control_name_config

    config, overrides = args.config, list(args.overrides or [])
    # With --control_name the file is optional: a first positional holding '=' is an override.
    if config is not None and "=" in config and not Path(config).is_file():
        overrides.insert(0, config)
        config = None
    if config is None and not args.control_name:
        raise CotuneError("give a config file (e.g. examples/lora_minilm_sst2.yaml) or --control_name NAME")
    base = control_name_config(args.control_name) if args.control_name else None
    extra = {}
    if args.overwrite:
        extra["overwrite"] = True
    if args.resume:
        extra["resume"] = True
    if args.quiet:
        extra["progress"] = False
    from cotune.config import deep_update, parse_overrides

    return load_config(config, deep_update(parse_overrides(overrides), extra), base=base)


def run(args: argparse.Namespace) -> int:
    from cotune.training.trainer import train

    cfg = resolve_config(args)
    if cfg.users:  # a ColA collaboration: K users' adapters on one base, each user's metric reported
        from cotune.training.collaboration import train_collaboration

        print(json.dumps(train_collaboration(cfg, verbose=not args.quiet), indent=1))
        return 0
    result = train(cfg, verbose=not args.quiet)
    summary = {
        "output_dir": str(result.output_dir),
        "steps": result.steps,
        "best_step": result.best_step,
        f"best_{result.metric}": result.best_metric,
        "validation": result.validation,
        "test": result.test,
        "trainable_parameters": result.trainable_parameters,
        "seconds": round(result.seconds, 1),
    }
    print(json.dumps(summary, indent=1))
    return 0
