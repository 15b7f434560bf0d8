"""The generation benchmark's smoke run: cotune's batched multi-tenant decoding and the PEFT one-at-a-time anchor
both run on real Alpaca prompts, give the same greedy tokens, and the table and results.json report tokens/s,
per-request TTFT, the ratios and the memory figures (an extra tenant costs its adapter, not a second base)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_generation_benchmark_smoke(shared_data, tmp_path, capsys):
    sys.path.insert(0, str(REPO))
    from benchmarks import generation

    assert generation.main(["--smoke", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    out = tmp_path / "smoke"
    res = json.loads((out / "results.json").read_text())

    assert res["smoke"] and res["new_tokens"] == 4 and res["repeats"] == 1 and res["ks"] == [1, 2]
    assert res["machine"]["cpu_count"] >= 1 and res["torch_threads"] >= 1
    assert len(res["load_average"]["before"]) == 3 and len(res["load_average"]["after"]) == 3
    assert "540 MB" in res["limit"] and res["limit"] in printed
    assert 0 < res["adapter_bytes"] < res["base_bytes"] / 100  # LoRA r=8 on q/v: ~1.8 MB against ~540 MB

    assert [r["K"] for r in res["rows"]] == [1, 2]
    for row in res["rows"]:
        k = row["K"]
        assert row["tokens_equal"] is True and row["mismatches"] == [], row["mismatches"]
        assert len(row["tokens"]) == k and all(len(t) == 4 for t in row["tokens"])
        for run in ("cotune", "peft_seq"):
            r = row[run]
            assert r["tokens_per_s"] > 0 and math.isclose(r["tokens_per_s"], k * 4 / r["median_wall_s"])
            assert len(r["ttft_s"]) == k and all(0 < t <= r["median_wall_s"] for t in r["ttft_s"])
        assert math.isfinite(row["tokens_per_s_ratio"]) and row["tokens_per_s_ratio"] > 0
        assert math.isfinite(row["ttft_ratio"]) and row["ttft_ratio"] > 0
        mem = row["memory"]
        assert mem["adapter_bytes"] == res["adapter_bytes"] and mem["base_bytes"] == res["base_bytes"]
    per = res["rows"][1]["memory"]["rss_per_extra_tenant_bytes"]
    assert per < res["base_bytes"] / 10  # the second tenant did not bring a second base
    assert res["rows"][0]["memory"]["rss_per_extra_tenant_bytes"] is None

    table = res["table"]
    assert "tok/s ÷ peft-seq" in table and "TTFT ÷ peft-seq" in table and "tokens equal" in table
    assert table in printed
    assert (out / "throughput.png").stat().st_size > 0
