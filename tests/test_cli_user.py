"""The command line as a user runs it: a subprocess started outside the repository (``python -m cotune``)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import yaml
from user_cli import REPO, TINY, cotune

from cotune.training.config import load_config


def test_python_dash_m_cotune(tmp_path):
    out = cotune("--help", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "train" in out.stdout and "usage: cotune" in out.stdout


def test_copied_example_trains_with_data_root(tmp_path, shared_data):
    """An example copied out of the repository, its ``../shared/data/...`` found under ``data_root``."""
    shutil.copy(REPO / "examples" / "lora_minilm_sst2.yaml", tmp_path / "my.yaml")
    out = cotune("train", "my.yaml", f"data_root={shared_data}", *TINY, "--quiet", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    assert summary["steps"] == 2
    assert (tmp_path / "runs" / "lora_minilm_sst2" / "adapter" / "adapter_config.json").is_file()
    # Evaluating it shows a progress bar (stderr) and prints the metrics (stdout).
    out = cotune("eval", "--adapter", "runs/lora_minilm_sst2/adapter", "--limit", "8", "--batch-size", "4", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    # The bar of 2 batches: tqdm redraws at most every 0.1 s and clears itself (leave=False), so which count it
    # last drew ("1/2" or "2/2") depends on the machine's speed; its total is always drawn.
    assert re.search(r"eval: .*\d/2 \[", out.stderr), out.stderr
    assert 0.0 <= json.loads(out.stdout)["accuracy"] <= 1.0


def test_paths_in_a_config_are_relative_to_its_folder(tmp_path, shared_data, monkeypatch):
    project = tmp_path / "project"
    (project / "configs").mkdir(parents=True)
    (project / "data").mkdir()
    shutil.copytree(shared_data / "glue" / "SST-2", project / "data" / "sst2")
    cfg = yaml.safe_load((REPO / "examples" / "lora_minilm_sst2.yaml").read_text())
    cfg["task"]["data"] = "../data/sst2"
    (project / "configs" / "run.yaml").write_text(yaml.safe_dump(cfg))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the working directory must not matter
    loaded = load_config(project / "configs" / "run.yaml")
    assert Path(loaded.task.data) == (project / "data" / "sst2").absolute()
    # A short name or a missing path is left for the data roots, as before.
    cfg["task"]["data"] = "glue/SST-2"
    (project / "configs" / "short.yaml").write_text(yaml.safe_dump(cfg))
    assert load_config(project / "configs" / "short.yaml").task.data == "glue/SST-2"


def test_a_string_where_a_number_belongs_is_one_error_line(tmp_path, shared_data):
    cfg = yaml.safe_load((REPO / "examples" / "lora_minilm_sst2.yaml").read_text())
    cfg["task"]["data"] = str(shared_data / "glue" / "SST-2")
    cfg["method"]["options"]["r"] = "8"
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(cfg))
    for args in (["bad.yaml"], ["bad.yaml", 'method.options.r="8"', "method.options.lora_alpha=8"]):
        out = cotune("train", *args, *TINY, "--quiet", cwd=tmp_path)
        assert out.returncode == 2, out.stderr
        assert "Traceback" not in out.stderr
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and "option r" in lines[0] and "expected an integer" in lines[0], out.stderr
    out = cotune("train", "bad.yaml", "method.options.r=8", "batch_size=four", *TINY[:1], cwd=tmp_path)
    assert out.returncode == 2 and "batch_size" in out.stderr and "Traceback" not in out.stderr
    out = cotune("train", "bad.yaml", "method.options.r=8", "optim.lr=nan", *TINY, "--quiet", cwd=tmp_path)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines()[-1].startswith("cotune train: error:") and "lr" in out.stderr
