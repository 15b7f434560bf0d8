"""The multi-tenant benchmark's smoke run: the whole pipeline (cotune gl, the one-PEFT-job anchor, peft-seq)
runs and reports the table and results.json with step times, setup, rows/s and the ratios."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_multitenant_benchmark_smoke(shared_data, tmp_path, capsys):
    sys.path.insert(0, str(REPO))
    from benchmarks import multitenant

    assert multitenant.main(["--smoke", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    out = tmp_path / "smoke"
    res = json.loads((out / "results.json").read_text())

    assert res["steps"] == 2 and res["warmup"] == 1 and res["seq"] == 16 and res["rows_per_tenant"] == 4
    assert res["machine"]["cpu_count"] >= 1
    assert len(res["load_average"]["before"]) == 3 and len(res["load_average"]["after"]) == 3
    assert "same rows per step" in res["limit"] and res["limit"] in printed

    (row,) = res["rows"]
    assert row["K"] == 2 and row["tasks"] == ["sst2", "rte"]
    runs = row["runs"]
    assert list(runs) == ["cotune-gl", "peft-1job", "peft-seq"]
    for name, r in runs.items():
        for key in ("setup_s", "median_step_s", "rows_per_s", "loop_s", "wall_s", "vs_one_peft"):
            assert math.isfinite(r[key]) and r[key] > 0, (name, key)
        assert r["rows_per_step"] == 8
        assert math.isclose(r["rows_per_s"], 8 / r["median_step_s"])
    assert runs["peft-1job"]["vs_one_peft"] == 1.0

    cot = runs["cotune-gl"]
    assert len(cot["step_s"]) == 2 and cot["median_step_s"] == cot["step_s"][1]  # the warm-up step is dropped
    assert set(cot["last_loss"]) == {"sst2", "rte"} and all(v == v for v in cot["last_loss"].values())
    one = runs["peft-1job"]
    assert one["task"] == "sst2" and len(one["step_s"]) == 2
    jobs = runs["peft-seq"]["jobs"]
    assert [j["task"] for j in jobs] == ["sst2", "rte"] and all(j["rows_per_step"] == 4 for j in jobs)
    assert math.isclose(runs["peft-seq"]["wall_s"], sum(j["wall_s"] for j in jobs))
    assert math.isclose(runs["peft-seq"]["median_step_s"], sum(j["median_step_s"] for j in jobs))

    inter = row["interleaved"]  # the same runs' steps taken in turn in one process: the goal's ratio
    assert list(inter) == ["cotune-gl", "peft-1job"] and inter["peft-1job"]["vs_one_peft"] == 1.0
    assert all(len(r["step_s"]) == 2 and math.isfinite(r["vs_one_peft"]) for r in inter.values())

    table = res["table"]
    assert "steps taken in turn" in table and "fresh process" in table
    assert "rows/s ÷ 1 PEFT job" in table and "peft-seq wall ÷ wall" in table and table in printed
    assert all(f"| {name}" in table for name in runs)
    assert (out / "throughput.png").stat().st_size > 0
