"""``report_to``: TensorBoard for real (its own event files, read back with its own reader), and a clear error
naming the pip command when the W&B extra is missing."""

from __future__ import annotations

import importlib.util
import json

import pytest
import yaml
from user_cli import REPO, TINY, cotune


def _config(tmp_path, shared_data):
    cfg = yaml.safe_load((REPO / "examples" / "lora_minilm_sst2.yaml").read_text())
    cfg["task"]["data"] = str(shared_data / "glue" / "SST-2")
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    return "c.yaml"


def test_report_to_tensorboard_writes_the_logged_scalars(tmp_path, shared_data):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = cotune("train", _config(tmp_path, shared_data), *TINY, "eval_every=1", "log_every=1",
                 "report_to=tensorboard", "--quiet", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    run = tmp_path / "runs" / "lora_minilm_sst2"
    logged = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/lr", "eval/accuracy", "eval/loss"} <= tags
    for kind, key in (("train", "loss"), ("eval", "accuracy")):
        want = [(r["step"], r[key]) for r in logged if r["type"] == kind]
        got = [(e.step, e.value) for e in acc.Scalars(f"{kind}/{key}")]
        assert len(got) == len(want) == 2
        assert all(gs == ws and abs(gv - wv) < 1e-6 for (gs, gv), (ws, wv) in zip(got, want))


def test_report_to_wandb_without_the_extra_names_the_pip_command(tmp_path, shared_data):
    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed here; this checks the message users see without the extra")
    out = cotune("train", _config(tmp_path, shared_data), *TINY, "report_to=wandb", "--quiet", cwd=tmp_path)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "pip install 'cotune[wandb]'" in out.stderr


def test_report_to_unknown_name_is_refused_before_the_model_loads(tmp_path, shared_data):
    out = cotune("train", _config(tmp_path, shared_data), "report_to=[tensorboard,mlflow]", cwd=tmp_path)
    assert out.returncode == 2 and "mlflow" in out.stderr and "tensorboard, wandb" in out.stderr
    assert "Loading weights" not in out.stderr
