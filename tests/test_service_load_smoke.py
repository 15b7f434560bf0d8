"""``python -m benchmarks service_load --smoke``: a few seconds of concurrent polling and predicting on loopback
while jobs train; no request may fail, and the status latency percentiles are reported."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_service_load_smoke(tmp_path, shared_data):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    out = subprocess.run([sys.executable, "-m", "benchmarks", "service_load", "--smoke", "--out", str(tmp_path)],
                         cwd=REPO, capture_output=True, text=True, env=env, timeout=240)
    assert out.returncode == 0, out.stdout + out.stderr
    res = json.loads((tmp_path / "results.json").read_text())["runs"]["process"]
    assert res["errors"] == 0 and res["requests"] > 0
    assert res["status"]["n"] > 0 and res["status"]["p50_ms"] <= res["status"]["p95_ms"] <= res["status"]["p99_ms"]
    assert res["predict"]["n"] > 0 and res["training_steps_during_load"] > 0
    assert "p99" in out.stdout
