"""``cotune params --model M --method NAME [key=value ...]``: trainable parameters per module and in total."""

from __future__ import annotations

import argparse

from cotune.adapters import attach, parameter_report
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


def format_report(rows: list[tuple[str, int]], total: int, base: int, per_module: bool = False) -> str:
    """A table of trainable parameters; modules that differ only by layer index are grouped."""
    import re

    lines = []
    if per_module:
        lines += [f"{path:<60} {n:>12,}" for path, n in rows]
    else:
        groups: dict[str, list[int]] = {}
        for path, n in rows:
            groups.setdefault(re.sub(r"\.\d+\.", ".*.", path), []).append(n)
        lines += [f"{k:<60} {len(v):>4} x {v[0]:>10,} = {sum(v):>12,}" for k, v in groups.items()]
    lines.append(f"{'trainable parameters':<60} {total:>25,}")
    lines.append(f"{'base model parameters':<60} {base:>25,}")
    lines.append(f"{'trainable %':<60} {100 * total / max(base, 1):>25.4f}")
    return "\n".join(lines)
