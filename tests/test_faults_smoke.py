"""``python -m benchmarks faults --smoke``: four SIGKILLs of the trainer or the API of a real ``cotune serve``
(during training, a checkpoint, an adapter save or an upload), each followed by every invariant; the jobs end
equal to uninterrupted runs of the same specs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_faults_smoke(shared_data, tmp_path, capsys):
    sys.path.insert(0, str(REPO))
    from benchmarks import faults

    assert faults.main(["--smoke", "--out", str(tmp_path)]) == 0, capsys.readouterr().out
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["kills"] == 4 and len(res["kill_log"]) == 4 and res["violations"] == []
    assert {k["target"] for k in res["kill_log"]} == {"trainer", "api"}  # both processes were killed
    assert res["jobs"] >= 1 and res["max_adapter_difference"] <= 1e-6
    assert "invariants violated: 0" in capsys.readouterr().out
