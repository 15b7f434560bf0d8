"""``python -m benchmarks service_llm --smoke``: SmolLM2 fine-tuned through a real ``cotune serve`` subprocess for
2 steps, evaluated before (base model, the server's evaluation code) and after (the job's result) on 4 held-out
Alpaca items; results.json, the printed tables, the loss curve and the adapter come out."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_service_llm_benchmark_smoke(shared_data, tmp_path, capsys):
    sys.path.insert(0, str(REPO))
    from benchmarks import service_llm

    assert service_llm.main(["--smoke", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    out = tmp_path / "smoke"
    res = json.loads((out / "results.json").read_text())

    cfg = res["config"]
    assert cfg["smoke"] and cfg["steps"] == 2 and cfg["batch_size"] == 2 and cfg["max_length"] == 64
    assert cfg["eval_rows"] == 4 and cfg["max_new_tokens"] == 4 and cfg["train_rows"] == 899
    train = json.loads((out / "data" / "alpaca_train.json").read_text())
    held = json.loads((out / "data" / "alpaca_eval.json").read_text())
    assert len(train) == 899 and len(held) == 4 and held[0] not in train  # disjoint, deterministic split

    assert res["job"]["status"] == "succeeded" and res["job"]["step"] == 2 and res["skipped_steps"] == 0
    assert res["loss_steps"] == [1, 2] and len(res["losses"]) == 2
    assert all(math.isfinite(x) and x > 0 for x in res["losses"])
    assert res["train_loss"] == res["losses"][-1]
    for side in ("before", "after"):
        m = res[side]
        assert {"loss", "perplexity", "rouge_l"} <= set(m), side
        assert math.isfinite(m["loss"]) and math.isclose(m["perplexity"], math.exp(m["loss"]), rel_tol=1e-6)
        assert 0.0 <= m["rouge_l"] <= 1.0
    assert res["before"] != res["after"]  # the adapter trained and changed the model
    assert "CausalLMTask.evaluate" in res["before_evaluated_by"] and "Workload.evaluate" in res["before_evaluated_by"]

    t = res["timing"]
    assert len(res["step_s"]) == 1 and t["median_step_s"] == res["step_s"][0] > 0
    assert 0 < t["first_step_s"] <= t["train_s"] <= t["job_wall_s"] < t["total_s"]
    assert res["server_peak_rss_bytes"] is None or res["server_peak_rss_bytes"] > 2**28
    assert len(res["load_average"]["before"]) == 3 and res["machine"]["cpu_count"] >= 1

    assert res["table"] in printed and "before (base model)" in printed and "after (service job)" in printed
    assert "median s/step" in printed and "rouge_l" in printed
    assert (out / "loss_curve.png").stat().st_size > 0
    assert (out / "adapter" / "adapter_model.safetensors").stat().st_size > 0
    assert "succeeded" in (out / "server.log").read_text()
