"""The zeroth-order benchmark's smoke run: it runs, and its numbers have the expected shape."""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_zo_benchmark_smoke(monkeypatch, tmp_path, shared_data, capsys):
    monkeypatch.syspath_prepend(str(REPO))
    monkeypatch.chdir(tmp_path)
    sys.modules.pop("benchmarks.zo", None)
    from benchmarks import zo

    assert zo.main(["--smoke"]) == 0
    result = json.loads((tmp_path / "runs" / "bench" / "zo" / "smoke.json").read_text())
    mem = {r["mode"]: r["extra_peak_bytes"] for r in result["memory"]["rows"]}
    assert mem["mezo"] < mem["backprop"]  # MeZO keeps no activations for a backward pass
    sst2 = result["sst2"]
    assert sst2["steps"] == 20 and 0.0 <= sst2["acc_before"] <= 1.0 and 0.0 <= sst2["acc_after"] <= 1.0
    assert "MeZO on MiniLM SST-2" in capsys.readouterr().out
