"""``cotune`` command line: parses, then calls the same public functions a Python user calls.

Each subcommand lives in ``cotune.commands.<name>`` with ``add_arguments(parser)`` and ``run(args) -> int``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from cotune.errors import CotuneError

COMMANDS = {
    "demo": "train an adapter on a real model and data offline, backprop next to ColA gradient learning",
    "params": "print per-module and total trainable parameters of a method on a model",
    "train": "train from a YAML config with key=value overrides",
    "eval": "evaluate a saved adapter on a data set",
    "export": "merge an adapter into its base and save a full transformers model",
    "chat": "talk to a causal LM with a trained adapter, local (--adapter) or on a server (--server); streamed",
    "verify": "check gradient learning against backprop for every adapter family",
    "serve": "run the fine-tuning-as-a-service HTTP server",
    "client": "talk to a cotune server (register, submit, status, download, predict)",
    "worker": "run your remote-fitter job's adapter updates on this machine (ColA: the server sends gradients only)",
}


def _module(name: str):
    return importlib.import_module(f"cotune.commands.{name}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cotune", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help_text in COMMANDS.items():
        try:
            mod = _module(name)
        except ModuleNotFoundError as e:
            if e.name != f"cotune.commands.{name}":
                raise
            continue
        p = sub.add_parser(name, help=help_text, description=help_text)
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse stops filling ``key=value ...`` after an option (``train x.yaml --overwrite max_steps=2``):
    # give such late overrides to the commands that take overrides; anything else is still an error.
    late = [a for a in extra if "=" in a and not a.startswith("-")]
    if late and isinstance(getattr(args, "overrides", None), list):
        args.overrides += late
        extra = [a for a in extra if a not in late]
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return int(args._run(args) or 0)
    except CotuneError as e:
        print(f"cotune {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"cotune {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
