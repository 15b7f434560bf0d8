"""The multi-tenant benchmark's smoke run: the whole pipeline (cotune gl with micro passes, PEFT) runs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_multitenant_benchmark_smoke(shared_data, tmp_path):
    sys.path.insert(0, str(REPO))
    from benchmarks import multitenant

    assert multitenant.main(["--smoke", "--out", str(tmp_path)]) == 0
    out = tmp_path / "smoke"
    res = json.loads((out / "results.json").read_text())
    row = res["rows"][0]
    assert row["K"] == 2 and row["tasks"] == ["sst2", "rte"]
    cot = row["cotune_gl:2"]
    assert set(cot["last_loss"]) == {"sst2", "rte"} and all(v == v for v in cot["last_loss"].values())
    assert len(row["peft_seq"]["runs"]) == 2 and row["peft_seq"]["loop_s"] > 0
    assert (out / "throughput.png").stat().st_size > 0 and (out / "memory.png").stat().st_size > 0
