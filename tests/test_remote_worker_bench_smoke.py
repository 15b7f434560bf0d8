"""``python -m benchmarks remote_worker --smoke``: one MiniLM lowrank job with the server-side fitter and with a
``cotune worker`` subprocess (fp32 and bf16 wires), then two of each at once, each in a server of its own, for the server's memory."""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_remote_worker_benchmark_smoke(shared_data, tmp_path, capsys):
    sys.path.insert(0, str(REPO))
    from benchmarks import remote_worker

    assert remote_worker.main(["--smoke", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "results.json").read_text())["models"]["minilm"]
    x = res["families"]["lowrank"]
    assert x["server_step_s"] > 0 and x["remote_step_s"] > 0
    # the capture frame is the statistic Σδuᵀ (auto: smaller than the pairs here) and bf16 halves it
    assert x["bytes_to_worker"] > x["bytes_from_worker"] > 0
    assert 0.4 < x["bf16_bytes_to_worker"] / x["bytes_to_worker"] < 0.6
    assert x["at"]["100 Mbit/s"] > x["at"]["1 Gbit/s"] > x["remote_step_s"]
    assert x["max_rel_diff_fp32"] < x["max_rel_diff_bf16"]
    for name in ("server", "remote"):  # each measured in a server of its own, while its jobs trained
        m = res["memory"][name]
        assert m["trainer"] > m["idle"]["trainer"] > 0 and m["api"] > 0
    assert "trainer RSS" in capsys.readouterr().out
