"""Run one benchmark suite: ``python -m benchmarks SUITE [args]``; without a suite, list them."""

from __future__ import annotations

import importlib
import pkgutil
import sys
from pathlib import Path


def suites() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules([str(Path(__file__).parent)]) if not m.name.startswith("_"))


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: python -m benchmarks SUITE [--smoke] [options]\nsuites: " + ", ".join(suites()))
        return 0
    if argv[0] not in suites():
        print(f"unknown suite {argv[0]!r}; suites: {', '.join(suites())}", file=sys.stderr)
        return 2
    return int(importlib.import_module(f"benchmarks.{argv[0]}").main(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
