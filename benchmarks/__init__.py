"""Benchmark suites: ``python -m benchmarks SUITE [--smoke] [options]`` (or ``make bench SUITE=...``).

Each suite is a module ``benchmarks/<suite>.py`` with ``main(argv: list[str]) -> int`` that prints a table,
writes plots/JSON under ``runs/bench/<suite>/`` and accepts ``--smoke`` (a tiny run, used by the tests).
"""
