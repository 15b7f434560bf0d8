"""The flag-mapping tables of examples/README.md are true of the code: every ``key=value`` in the cotune column is
a valid override (type-checked config, valid method and task options), every command parses."""

from __future__ import annotations

import importlib
import re
import shlex
from pathlib import Path

import pytest

from cotune.cli import build_parser
from cotune.config import parse_overrides
from cotune.tasks.base import TASK_TYPES, _accepted_options
from cotune.training.config import load_config

DOC = Path(__file__).resolve().parents[1] / "examples" / "README.md"
#: Per table: what a row's overrides apply on top of (the seed's method and task), and placeholder values.
BASES = {
    "CoLA": ["method.name=cola", "task.kind=causal_lm"],
    "AdaKron": ["method.name=kron", "task.kind=seq_cls"],
    "LoRETTA": ["method.name=loretta_adp", "task.kind=seq_cls"],
    "ColA": ["method.name=lowrank", "task.kind=seq_cls"],
}
PLACEHOLDERS = {"=N": "=1"}


def rows() -> list[tuple[str, str, str]]:
    """``(table, seed flag cell, cotune cell)`` of every row under "From the seeds' flags to cotune"."""
    text = DOC.read_text().split("## From the seeds' flags to cotune", 1)[1]
    out = []
    for block in re.split(r"^### ", text, flags=re.M)[1:]:
        table = block.split()[0]
        for line in block.splitlines():
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if len(cells) == 2 and line.startswith("|") and not set(cells[1]) <= set("-") and cells[1] != "cotune":
                out.append((table, cells[0], cells[1]))
    return out


def test_every_seed_has_a_table():
    assert {t for t, _, _ in rows()} == set(BASES) and len(rows()) > 60


@pytest.mark.parametrize("table,flag,cell", rows(), ids=[f"{t}:{f[:40]}" for t, f, _ in rows()])
def test_row_is_true_of_the_code(table, flag, cell):
    for span in re.findall(r"`([^`]+)`", cell):
        words = shlex.split(span)
        if words[0] == "cotune":  # a command: it must parse as written
            args, extra = build_parser().parse_known_args(words[1:])
            assert not [e for e in extra if "=" not in e], f"{span}: unknown arguments {extra}"
            continue
        if not all("=" in w for w in words):
            continue  # a value named in prose (`fpb`), not an override
        for old, new in PLACEHOLDERS.items():
            words = [w.replace(old, new) if w.endswith(old) else w for w in words]
        cfg = load_config(None, ["task.data=x", *BASES[table], *words])  # type-checks keys, values, method options
        kind = cfg.task.kind
        mod, _, cls_name = TASK_TYPES[kind].partition(":")
        valid = _accepted_options(getattr(importlib.import_module(mod), cls_name))
        unknown = set(parse_overrides(words).get("task", {}).get("options", {})) - valid
        assert not unknown, f"{span}: task options {unknown} are not options of {kind}"
