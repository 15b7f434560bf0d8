"""ColA collaboration run names (``~``, ``_col``): K users' adapters trained on one base in one ``cotune train``
run through the tenant bank, each user's metric reported, each adapter saved and evaluable on its own."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file
from user_cli import cotune

SMALL = ["max_steps=3", "train_limit=16", "eval_limit=8", "eval_batch_size=8", "--quiet"]


@pytest.mark.parametrize("name,users,merged", [
    ("glue-sst2_minilm_sc_cola-lowrank~linear-1_4", ["lowrank", "linear"], False),
    ("glue-sst2_minilm_sc_cola-lowrank-1_4_col", ["lowrank", "lowrank"], True),
])
def test_collaboration_trains_every_user_and_reports_each_metric(tmp_path, shared_data, name, users, merged):
    extra = ["report_to=tensorboard"] if merged else []
    out = cotune("train", "--control_name", name, f"data_root={shared_data}", *SMALL, *extra, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    assert summary["merged"] is merged and summary["engine"] == "gl" and summary["steps"] == 3
    ids = [f"user{k}-{f}" for k, f in enumerate(users)]
    assert list(summary["users"]) == ids
    weights = []
    for tid in ids:
        u = summary["users"][tid]
        assert u["steps"] == 3 and u["skipped"] == 0 and u["train_rows"] == 8  # 16 rows dealt to 2 users
        assert 0.0 <= u["validation"]["accuracy"] <= 1.0
        weights.append(load_file(str(tmp_path / u["adapter"] / "adapter_model.safetensors")))
    # The users learnt from different rows: their heads differ.
    assert not (weights[0]["base_model.model.classifier.weight"] == weights[1]["base_model.model.classifier.weight"]).all()
    if extra:  # each user's validation metrics under its own TensorBoard tag
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        acc = EventAccumulator(str(tmp_path / summary["output_dir"] / "tensorboard"))
        acc.Reload()
        for tid in ids:
            (event,) = acc.Scalars(f"eval/{tid}/accuracy")
            assert event.step == 3 and abs(event.value - summary["users"][tid]["validation"]["accuracy"]) < 1e-6
    # A user's adapter is an ordinary run: `cotune eval` rebuilds it and finds the reported metric again.
    first = summary["users"][ids[0]]
    ev = cotune("eval", "--adapter", first["adapter"], "--limit", "8", "--quiet", cwd=tmp_path)
    assert ev.returncode == 0, ev.stderr
    assert abs(json.loads(ev.stdout)["loss"] - first["validation"]["loss"]) < 1e-5
