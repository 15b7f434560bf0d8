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


def test_zo_benchmark_linear_probe_head_is_frozen(monkeypatch, shared_data):
    """With ``head_init="lp"`` the head is fitted first and MeZO trains only the lowrank adapters."""
    monkeypatch.syspath_prepend(str(REPO))
    sys.modules.pop("benchmarks.zo", None)
    from benchmarks import zo

    res = zo.mezo_sst2(2, 1e-3, 1e-3, 4, 32, 32, 0, head_init="lp", lp_rows=64)
    assert res["trainable"] == 6 * 2 * (2 * 8 * 384)  # lowrank r 8 on query/value of 6 layers; no head
    assert res["head_init"] == "lp" and 0.0 <= res["acc_untrained"] <= 1.0 and 0.0 <= res["acc_before"] <= 1.0


def test_zo_start_benchmark_smoke(monkeypatch, tmp_path, shared_data, capsys):
    monkeypatch.syspath_prepend(str(REPO))
    sys.modules.pop("benchmarks.zo_start", None)
    from benchmarks import zo_start

    monkeypatch.setattr(zo_start, "out_dir", lambda suite, smoke: tmp_path)
    assert zo_start.main(["--smoke"]) == 0
    res = json.loads((tmp_path / "results.json").read_text())
    assert 0.0 < res["pooled_std"] < 1.0  # tanh outputs
    assert set(res["head_sgd"]) == {"0.01", "1.0"} and 0.0 <= res["zero_shot_mean"] <= 1.0
    # the larger step moves the head further from the zero start: its loss falls more
    assert res["head_sgd"]["1.0"]["loss_last"] < res["head_sgd"]["0.01"]["loss_last"]
    assert "(c) zero-shot" in capsys.readouterr().out
