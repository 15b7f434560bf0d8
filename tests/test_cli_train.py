"""``cotune train / eval / export`` from the command line, and every example config as written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cotune.adapters.methods import method_configs, methods
from cotune.cli import main
from cotune.engines.base import ENGINES
from cotune.tasks.base import TASK_TYPES
from cotune.training.config import load_config

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((REPO / "examples").glob("*.yaml"))
#: Two steps on a few rows: what a test can afford, applied on top of an example as overrides.
TINY = [
    "max_steps=2",
    "train_limit=16",
    "batch_size=4",
    "eval_every=0",
    "eval_limit=4",
    "eval_batch_size=4",
    "save_every=0",
    "test=false",
    "--quiet",
]


def test_there_are_examples_for_every_seed_method():
    names = {p.stem for p in EXAMPLES}
    for want in (
        "cola_lowrank_minilm_sst2",
        "cola_lowrank_i4_minilm_sst2",
        "cola_linear_minilm_sst2",
        "cola_mlp_minilm_sst2",
        "cola_lowrank_merged_minilm_sst2",
        "cola_smollm2_gsm8k",
        "cola_smollm2_mmlu",
        "adakron_minilm_mrpc",
        "madakron_minilm_mrpc",
        "loretta_adp_minilm_sst2",
        "loretta_adp_zo_minilm_sst2",
        "loretta_rep_minilm_sst2",
        "loretta_rep_zo_minilm_sst2",
    ):
        assert want in names


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_every_example_is_a_valid_config(path, monkeypatch):
    monkeypatch.chdir(REPO)  # examples use data paths relative to the repository root
    cfg = load_config(path)
    assert cfg.task.kind in TASK_TYPES and cfg.engine.name in ENGINES and cfg.method.name in methods()
    assert Path(cfg.task.data).exists(), f"{path.name}: {cfg.task.data} not found"
    assert cfg.output_dir == f"runs/{path.stem}"
    # The method's options are valid for its family / preset (model-independent check).
    method_configs(cfg.method.name, None, **cfg.method.options)
    import importlib

    from cotune.tasks.base import _accepted_options

    mod, _, cls = TASK_TYPES[cfg.task.kind].partition(":")
    assert set(cfg.task.options) <= _accepted_options(getattr(importlib.import_module(mod), cls))


@pytest.mark.parametrize(
    "example",
    ["cola_lowrank_merged_minilm_sst2", "loretta_adp_zo_minilm_sst2", "madakron_minilm_mrpc", "cola_smollm2_mmlu"],
)
def test_examples_run_two_steps(example, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    out = tmp_path / example
    # SmolLM2: short prompts, and LoRA init instead of PiSSA (210 SVDs of the Llama weights take ~1 min on CPU).
    extra = ["task.options.max_length=64", "method.options.init=lora", "batch_size=2"] if "smollm2" in example else []
    rc = main(["train", f"examples/{example}.yaml", f"output_dir={out}", *TINY[:-1], *extra, TINY[-1]])
    summary = json.loads(capsys.readouterr().out)
    assert rc == 0 and summary["steps"] == 2 and summary["trainable_parameters"] > 0
    assert (out / "adapter" / "adapter_model.safetensors").is_file() and (out / "checkpoint-2").is_dir()


def test_multiple_choice_trains_on_the_default_cloze_scoring_with_gl(tmp_path, monkeypatch, capsys):
    """The default scoring's loss (cross-entropy over the options' log-likelihoods) through gradient learning."""
    monkeypatch.chdir(REPO)
    out = tmp_path / "cloze"
    extra = ["task.options.max_length=64", "task.options.scoring=cloze", "method.options.init=lora", "batch_size=2",
             "engine.name=gl"]
    rc = main(["train", "examples/cola_smollm2_mmlu.yaml", f"output_dir={out}", *TINY[:-1], *extra, TINY[-1]])
    summary = json.loads(capsys.readouterr().out)
    assert rc == 0 and summary["steps"] == 2 and summary["trainable_parameters"] > 0
    val = summary["validation"]
    assert set(val) == {"accuracy", "accuracy_norm", "loss"} and val["loss"] > 0


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    """A lowrank run through the CLI (a ColA run name with the offline substitute model)."""
    out = tmp_path_factory.mktemp("cli") / "run"
    args = ["train", "--control_name", "glue-sst2_roberta-base_sc_lora_4", "model=minilm", f"output_dir={out}"]
    args += ["task.data=" + str(REPO.parent / "shared" / "data" / "glue" / "SST-2"), "task.options.max_length=32",
             "task.options.pooling=model"]  # BERT's own pooler, so that export can write a plain transformers model
    rc = main([*args, *TINY])
    return rc, out, args


def test_control_name_run_and_output_folder_refusal(cli_run, capsys):
    rc, out, args = cli_run
    assert rc == 0
    cfg = load_config(out / "config.yaml")
    assert (cfg.model, cfg.engine.name, cfg.method.name, cfg.batch_size) == ("minilm", "backprop", "lowrank", 4)
    capsys.readouterr()
    assert main([*args, *TINY]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main([*args, *TINY, "--overwrite"]) == 0


def test_eval_and_export_commands(cli_run, tmp_path, capsys, sst2_batch):
    import torch
    from transformers import AutoModelForSequenceClassification

    _, out, _ = cli_run
    capsys.readouterr()
    assert main(["eval", "--adapter", str(out / "adapter"), "--limit", "8", "--out", str(tmp_path / "m.json")]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["split"] == "validation" and 0 <= printed["accuracy"] <= 1
    assert json.loads((tmp_path / "m.json").read_text()) == printed
    # Export without the run config: the base model and the head size come from the adapter itself.
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in (out / "adapter").iterdir():
        (bare / f.name).write_bytes(f.read_bytes())
    assert main(["export", "--adapter", str(bare), "--model", "minilm", "--out", str(tmp_path / "m1")]) == 0
    assert main(["export", "--adapter", str(out / "adapter"), "--out", str(tmp_path / "m2")]) == 0
    batch, _ = sst2_batch
    with torch.no_grad():
        a = AutoModelForSequenceClassification.from_pretrained(tmp_path / "m1").eval()(**batch).logits
        b = AutoModelForSequenceClassification.from_pretrained(tmp_path / "m2").eval()(**batch).logits
    assert torch.equal(a, b)


def test_export_refuses_non_mergeable_families(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    out = tmp_path / "kron"
    assert (
        main(["train", "examples/adakron_minilm_mrpc.yaml", f"output_dir={out}", *TINY[:1], "max_steps=1", *TINY[1:]])
        == 0
    )
    capsys.readouterr()
    assert main(["export", "--adapter", str(out / "adapter"), "--out", str(tmp_path / "x")]) == 2
    assert "not mergeable" in capsys.readouterr().err


def test_sst2_benchmark_smoke(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO))  # benchmarks/ is a top-level package of the repository
    from benchmarks import sst2_minilm

    assert sst2_minilm.main(["--smoke", "--out", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "smoke.json").read_text())
    assert summary["smoke"] and summary["steps"] == 3 and 0 <= summary["accuracy"] <= 1
    # LoRA r 8 on every linear layer (q, k, v, attention.output.dense: 384x384; intermediate 384->1536; output
    # 1536->384) is r(d_in + d_out) each, plus the 384x2 head with bias. No pooler dense: the head reads MiniLM's
    # mean pooling (cotune.tasks.pooling), which has no weights.
    per_layer = 4 * 8 * (384 + 384) + 2 * 8 * (384 + 1536)
    assert summary["trainable_parameters"] == 6 * per_layer + 384 * 2 + 2


def test_incomplete_model_folders_say_what_is_missing(tmp_path, capsys):
    from cotune.models import minilm_path

    src = minilm_path()
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_bytes((src / "config.json").read_bytes())
    data = str(REPO.parent / "shared" / "data" / "glue" / "SST-2")
    args = ["train", "--control_name", "glue-sst2_x_sc_lora_4", f"model={folder}", f"task.data={data}"]
    assert main([*args, f"output_dir={tmp_path / 'a'}", "--quiet"]) == 2
    assert "missing weights" in capsys.readouterr().err
    (folder / "model.safetensors").symlink_to(src / "model.safetensors")
    assert main([*args, f"output_dir={tmp_path / 'b'}", "--quiet"]) == 2
    assert "missing a tokenizer" in capsys.readouterr().err
