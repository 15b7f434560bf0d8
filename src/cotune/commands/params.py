"""``cotune params --model M --method NAME [key=value ...]``: trainable parameters per module and in total."""

from __future__ import annotations

import argparse

from cotune.adapters import attach, parameter_report
from cotune.adapters.attach import format_parameter_report as format_report  # this module's name for it
from cotune.adapters.methods import method_configs
from cotune.config import parse_overrides


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="local folder, minilm, smollm2, hub name, or config:bert|roberta|llama|gpt2")
    p.add_argument("--method", required=True, help="adapter family or preset (lowrank, kron, loretta_adp, …)")
    p.add_argument("--task", default="auto", help="seq_cls | causal_lm | base | auto (default)")
    p.add_argument("--num-labels", type=int, default=2, help="labels of a sequence-classification head")
    p.add_argument("--per-module", action="store_true", help="list every adapted module, not only totals per kind")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="method options, e.g. r=8 lora_alpha=16")


def run(args: argparse.Namespace) -> int:
    from cotune.models import load_model

    kwargs = {"num_labels": args.num_labels} if args.task == "seq_cls" else {}
    model = load_model(args.model, args.task, **kwargs)
    attach(model, method_configs(args.method, model, **parse_overrides(args.overrides)))
    rows, total, base = parameter_report(model)
    print(format_report(rows, total, base, per_module=args.per_module))
    return 0
