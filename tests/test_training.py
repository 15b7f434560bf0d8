"""The training loop on MiniLM + real SST-2: exact resume, best-checkpoint selection, head training, export.

References are independent of the code under test: the final adapter of an uninterrupted run (resume must
reproduce it bit for bit), the per-step validation history (best selection), a fresh transformers model
loaded from the exported folder (export must reproduce the adapted model's logits).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from cotune.errors import CotuneError
from cotune.tasks.order import epoch_order
from cotune.training.checkpoint import list_checkpoints
from cotune.training.config import MethodConfig, TrainConfig, config_from_dict, load_config
from cotune.training.logging import read_log
from cotune.training.trainer import adapter_configs, train

WEIGHTS = "adapter_model.safetensors"
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def small_config(shared_data, out, **overrides) -> TrainConfig:
    """Six steps of batch 8 over 40 SST-2 rows (5 steps per epoch, so the run crosses an epoch)."""
    d = {
        "model": "minilm",
        "task": {"kind": "seq_cls", "data": str(shared_data / "glue" / "SST-2"), "options": {"max_length": 32}},
        "method": {"name": "lowrank", "options": {"r": 4, "lora_alpha": 8, "target_modules": ["query", "value"]}},
        "engine": {"name": "backprop"},
        "optim": {"lr": 5e-3},
        "batch_size": 8,
        "train_limit": 40,
        "max_steps": 6,
        "eval_every": 2,
        "eval_limit": 8,
        "eval_batch_size": 8,
        "save_every": 2,
        "progress": False,
        "output_dir": str(out),
    }
    from cotune.config import deep_update

    return config_from_dict(deep_update(d, overrides))


def tensors(folder) -> dict[str, torch.Tensor]:
    return load_file(str(folder / WEIGHTS))


def assert_same_adapter(a, b) -> None:
    ta, tb = tensors(a), tensors(b)
    assert sorted(ta) == sorted(tb)
    for k in ta:
        assert torch.equal(ta[k], tb[k]), f"{k} differs by {(ta[k] - tb[k]).abs().max().item()}"


# -- configuration ---------------------------------------------------------------------------------------------
def test_unknown_keys_list_the_valid_ones(tmp_path):
    with pytest.raises(CotuneError) as e:
        config_from_dict({"task": {"data": "x"}, "max_step": 3})
    assert "['max_step']" in str(e.value) and "max_steps" in str(e.value) and "eval_every" in str(e.value)
    with pytest.raises(CotuneError) as e:
        config_from_dict({"task": {"data": "x"}, "optim": {"learning_rate": 1}})
    assert "in 'optim'" in str(e.value) and "lr" in str(e.value) and "warmup_steps" in str(e.value)
    with pytest.raises(CotuneError, match="in 'task'.*valid keys: kind, data, options"):
        config_from_dict({"task": {"data": "x", "max_length": 3}})


def test_types_are_checked_and_yaml_looseness_is_coerced(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("task: {data: glue/SST-2}\noptim: {lr: 1e-3, betas: [0.9, 0.98]}\nmax_steps: 10.0\n")
    cfg = load_config(p, ["batch_size=4", "method.options.r=16", "method.train_head=false"])
    assert cfg.optim.lr == 1e-3 and cfg.optim.betas == (0.9, 0.98)  # YAML reads 1e-3 as a string
    assert cfg.max_steps == 10 and cfg.batch_size == 4
    assert cfg.method.options == {"r": 16} and cfg.method.train_head is False
    with pytest.raises(CotuneError, match="batch_size: expected an integer"):
        load_config(p, ["batch_size=four"])
    with pytest.raises(CotuneError, match="max_steps must be >= 1"):
        load_config(p, ["max_steps=0"])
    with pytest.raises(CotuneError, match="task.data is empty"):
        config_from_dict({})
    p.write_text("- a list\n")
    with pytest.raises(CotuneError, match="must hold a mapping"):
        load_config(p)


def test_a_run_without_lr_takes_its_methods_tuned_rate(monkeypatch):
    from cotune.adapters.families.bottleneck import BottleneckConfig
    from cotune.adapters.families.kron import KronConfig
    from cotune.adapters.methods import default_lr

    def lr(**d) -> float:
        return config_from_dict({"task": {"data": "x"}, **d}).optim.lr

    # rates no family has, so each assertion can only pass through the family it names
    monkeypatch.setattr(KronConfig, "default_lr", 0.0123)
    monkeypatch.setattr(BottleneckConfig, "default_lr", 0.0456)
    assert lr(method={"name": "kron"}) == 0.0123 == default_lr("kron")
    assert lr(method={"name": "houlsby"}) == 0.0456  # a preset: its main family's rate
    assert lr() == default_lr("lowrank") and lr(optim={"optimizer": "adam"}) == default_lr("lowrank")
    assert lr(method={"name": "kron"}, optim={"lr": 0.02}) == 0.02  # a given rate always wins
    # zeroth order and plain SGD work at other scales: OptimConfig's rate, as before
    assert lr(method={"name": "kron"}, engine={"name": "zo"}) == 1e-3
    assert lr(method={"name": "kron"}, optim={"optimizer": "sgd"}) == 1e-3
    with pytest.raises(CotuneError, match="unknown method 'lora'"):
        default_lr("lora")
    # a service job follows the same rule
    from cotune.service.jobs import _optim_config
    from cotune.service.schemas import JobSpec

    def job_lr(**spec) -> float:
        return _optim_config(JobSpec.model_validate({"train": {"path": "x"}, "steps": 3, **spec}).model_dump()).lr

    assert job_lr(method="kron", engine="gl") == 0.0123 and job_lr(method="houlsby") == 0.0456
    assert job_lr(method="kron", optim={"lr": 0.02}) == 0.02 and job_lr(method="kron", engine="zo") == 1e-3


def test_method_defaults_are_the_learning_rate_sweeps_winners():
    """Each family's default_lr is what benchmarks/lr_sweep's sweeps (docs/results/lr_sweep*/: SST-2 for every
    family, STS-B for several; CoLA, RTE, MRPC and STS-B to convergence for LoRA, CoLA, MRPC and STS-B for AdaKron)
    choose together (``lr_sweep.across``), not a guess."""
    from benchmarks.lr_sweep import across
    from cotune.adapters.methods import default_lr

    root = Path(__file__).resolve().parents[1] / "docs/results"
    sweeps = [json.loads(p.read_text()) for p in sorted(root.glob("lr_sweep*/results.json"))]
    assert {s["task"] for s in sweeps} >= {"sst2", "stsb", "cola", "rte"}
    # kron_mix (MAdaKron) is the kron family with a mixture: the family's rate is the plain kron row's
    chosen = {m: lr for m, lr in across(sweeps).items() if m != "kron_mix"}
    assert len(chosen) >= 8
    assert {m: default_lr(m) for m in chosen} == chosen


def test_epoch_order_is_a_pure_function_of_seed_and_epoch():
    a = epoch_order(1000, 3, 7)
    assert np.array_equal(a, epoch_order(1000, 3, 7))
    assert np.array_equal(np.sort(a), np.arange(1000))
    assert not np.array_equal(a, epoch_order(1000, 3, 8)) and not np.array_equal(a, epoch_order(1000, 4, 7))


def test_the_new_head_is_added_unless_the_method_covers_it(minilm_cls, shared_data, tmp_path):
    cfg = small_config(shared_data, tmp_path)
    names = [(c.family, c.target_modules) for c in adapter_configs(minilm_cls, cfg)]
    assert names == [("lowrank", ["query", "value"]), ("full", ["classifier"])]
    # loretta_adp trains MiniLM's classifier itself: no second adapter on it.
    cfg.method = MethodConfig(name="loretta_adp")
    fams = [c.family for c in adapter_configs(minilm_cls, cfg)]
    assert fams.count("full") == 2 and fams[0] == "loretta_adp"  # norms + classifier
    cfg.method = MethodConfig(name="lowrank", options={"target_modules": ["query"]}, train_head=False)
    assert [c.family for c in adapter_configs(minilm_cls, cfg)] == ["lowrank"]
    # Full fine-tuning ("all"): every module owning parameters, the head included.
    cfg.method = MethodConfig(name="full", options={"target_modules": "all"})
    (full,) = adapter_configs(minilm_cls, cfg)
    from cotune.adapters.attach import match_targets

    hit = match_targets(minilm_cls, full.target_modules)
    assert "classifier" in hit and "bert.embeddings.word_embeddings" in hit and len(hit) == 6 * 8 + 4 + 1 + 1
    # (per layer: query, key, value, attention.output.dense + LayerNorm, intermediate.dense, output.dense +
    # LayerNorm; embeddings: word, position, token_type, LayerNorm; the pooler; the classifier)



def test_full_fine_tuning_of_every_module_computes_the_base_model(minilm_cls, shared_data, sst2_batch, tmp_path):
    """``full`` on every leaf (integer-id embeddings included) is the base model, with every weight trainable."""
    from cotune.adapters import attach

    batch, labels = sst2_batch
    with torch.no_grad():
        ref = minilm_cls(**batch).logits
    cfg = small_config(shared_data, tmp_path)
    cfg.method = MethodConfig(name="full", options={"target_modules": "all"})
    n_base = sum(p.numel() for p in minilm_cls.parameters())
    attach(minilm_cls, adapter_configs(minilm_cls, cfg))
    trainable = [p for p in minilm_cls.parameters() if p.requires_grad]
    assert sum(p.numel() for p in trainable) == n_base
    out = minilm_cls(**batch, labels=labels)
    torch.testing.assert_close(out.logits, ref, rtol=0, atol=0)
    out.loss.backward()
    assert all(p.grad is not None for p in trainable)

# -- output folder -----------------------------------------------------------------------------------------------
def test_existing_output_folder_is_refused(shared_data, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(CotuneError, match="already exists.*--overwrite"):
        train(small_config(shared_data, out), verbose=False)
    with pytest.raises(CotuneError, match="not a cotune run folder"):
        train(small_config(shared_data, out, overwrite=True), verbose=False)
    with pytest.raises(CotuneError, match="not a cotune run folder"):
        train(small_config(shared_data, out, resume=True), verbose=False)
    assert (out / "notes.txt").read_text() == "mine"


# -- exact resume ----------------------------------------------------------------------------------------------------
class Kill(RuntimeError):
    pass


def kill_at(n: int):
    def cb(trainer, step, result):
        if step == n:
            raise Kill(f"simulated kill at step {n}")

    return cb


ENGINES = [
    pytest.param({"name": "backprop"}, id="backprop"),
    pytest.param({"name": "gl", "options": {"interval": 2, "placement": "thread"}}, id="gl-interval2"),
    pytest.param({"name": "zo", "options": {"eps": 1e-3}}, id="zo"),
]


@pytest.fixture(scope="module")
def reference_runs(tmp_path_factory):
    """Uninterrupted six-step runs per engine, evaluating every step, computed once per module."""
    cache: dict[str, object] = {}

    def get(engine: dict):
        key = json.dumps(engine, sort_keys=True)
        if key not in cache:
            out = tmp_path_factory.mktemp("ref") / "run"
            # Evaluation every step: it must not move the training RNG streams (dropout, data order).
            cache[key] = train(small_config(SHARED_DATA, out, engine=engine, eval_every=1), verbose=False)
        return cache[key]

    return get


@pytest.mark.parametrize("engine", ENGINES)
def test_killed_and_resumed_run_ends_with_the_same_adapter(engine, shared_data, tmp_path, reference_runs):
    ref = reference_runs(engine)
    # Killed right after step 4 (its checkpoint written), then resumed with a different eval schedule.
    out = tmp_path / "run"
    with pytest.raises(Kill):
        train(small_config(shared_data, out, engine=engine), callbacks=[kill_at(4)], verbose=False)
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-2", "checkpoint-4"]
    res = train(small_config(shared_data, out, engine=engine, eval_every=3, resume=True), verbose=False)
    assert res.steps == ref.steps == 6
    assert_same_adapter(ref.output_dir / "checkpoint-6" / "adapter", out / "checkpoint-6" / "adapter")
    # Dropout was active (MiniLM has p = 0.1) and the data crossed an epoch: both had to be replayed.
    trained = [r for r in read_log(out / "log.jsonl") if r["type"] == "eval"]
    assert [r["step"] for r in trained] == [2, 4, 6]  # steps 5-6 logged once, by the resumed run
    before = tensors(out / "checkpoint-4" / "adapter")
    after = tensors(out / "checkpoint-6" / "adapter")
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_resume_with_a_larger_max_steps_continues_exactly(shared_data, tmp_path, reference_runs):
    ref = reference_runs({"name": "backprop"})
    out = tmp_path / "run"
    train(small_config(shared_data, out, max_steps=4, eval_every=1), verbose=False)
    with pytest.raises(CotuneError, match="seed differ"):
        train(small_config(shared_data, out, resume=True, seed=1), verbose=False)
    train(small_config(shared_data, out, resume=True, eval_every=1), verbose=False)
    assert_same_adapter(ref.output_dir / "checkpoint-6" / "adapter", out / "checkpoint-6" / "adapter")
    assert_same_adapter(ref.output_dir / "adapter", out / "adapter")  # same evaluations -> same best


# -- selection, logs, test evaluation, export ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    if not SHARED_DATA.is_dir():
        pytest.skip("shared data not present")
    out = tmp_path_factory.mktemp("best") / "run"
    cfg = small_config(
        SHARED_DATA, out, eval_every=1, save_every=1, keep_checkpoints=10, eval_limit=32, test=True, test_limit=16
    )
    return cfg, train(cfg, verbose=False)


def test_best_checkpoint_is_selected_on_validation(finished_run):
    cfg, res = finished_run
    out = res.output_dir
    evals = [r for r in read_log(out / "log.jsonl") if r["type"] == "eval"]
    assert [r["step"] for r in evals] == [1, 2, 3, 4, 5, 6]
    acc = [r["accuracy"] for r in evals]
    best = int(np.argmax(acc))  # the first maximum: later ties do not replace it
    assert res.metric == "accuracy" and res.best_step == evals[best]["step"] and res.best_metric == acc[best]
    assert_same_adapter(out / f"checkpoint-{res.best_step}" / "adapter", out / "adapter")
    # Only the last keep_checkpoints=10 are kept: all six here; the head was trained along the adapters.
    assert len(list_checkpoints(out)) == 6
    first, last = tensors(out / "checkpoint-1" / "adapter"), tensors(out / "checkpoint-6" / "adapter")
    head = "base_model.model.classifier.weight"
    assert head in first and not torch.equal(first[head], last[head])


def test_test_split_is_scored_once_on_the_best_adapter(finished_run, capsys):
    from cotune.cli import main

    cfg, res = finished_run
    out = res.output_dir
    tests = [r for r in read_log(out / "log.jsonl") if r["type"] == "test"]
    assert len(tests) == 1 and tests[0]["step"] == res.best_step
    rc = main(["eval", "--adapter", str(out / "adapter"), "--split", "test", "--limit", "16"])
    printed = json.loads(capsys.readouterr().out)
    assert rc == 0
    for k in ("accuracy", "f1", "loss"):
        assert math.isclose(printed[k], res.test[k], rel_tol=0, abs_tol=1e-6)
    summary = json.loads((out / "results.json").read_text())
    assert summary["best_step"] == res.best_step and summary["test"]["accuracy"] == res.test["accuracy"]


def test_logs_curve_and_resolved_config(finished_run):
    cfg, res = finished_run
    out = res.output_dir
    assert (out / "learning_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = load_config(out / "config.yaml")
    assert saved.optim.total_steps == 6 and saved.max_steps == 6 and saved.task == cfg.task
    kinds = [r["type"] for r in read_log(out / "log.jsonl")]
    assert kinds[0] == "start" and kinds[-1] == "end" and "train" in kinds


def test_export_merges_into_a_plain_transformers_model(finished_run, sst2_batch, tmp_path):
    from transformers import AutoModelForSequenceClassification

    from cotune.commands.export import export
    from cotune.training.saved import eval_config, load_trained

    _, pooled = finished_run  # MiniLM's head reads its mean pooling by default: transformers cannot express it
    with pytest.raises(CotuneError, match="cannot express"):
        export(pooled.output_dir / "adapter", tmp_path / "pooled")
    assert not (tmp_path / "pooled").exists() or not any((tmp_path / "pooled").iterdir())
    res = train(small_config(SHARED_DATA, tmp_path / "run", task={"options": {"pooling": "model"}}), verbose=False)
    folder = export(res.output_dir / "adapter", tmp_path / "merged")
    plain = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    assert (folder / "tokenizer.json").is_file() or (folder / "vocab.txt").is_file()
    _, adapted = load_trained(eval_config(res.output_dir / "adapter"), res.output_dir / "adapter")
    adapted.eval()
    batch, _ = sst2_batch
    with torch.no_grad():
        want = adapted(**batch).logits
        got = plain(**batch).logits
    assert (got - want).abs().max().item() < 1e-5
    assert not any("lora" in k for k in plain.state_dict())
    with pytest.raises(CotuneError, match="already exists"):
        export(res.output_dir / "adapter", folder)


def test_nan_loss_stops_with_the_engines_error(shared_data, tmp_path, monkeypatch, capsys):
    from cotune.cli import main
    from cotune.tasks.seq_cls import SeqClsTask

    real = SeqClsTask.loss
    monkeypatch.setattr(SeqClsTask, "loss", lambda self, model, batch: real(self, model, batch) * float("nan"))
    cfg = small_config(shared_data, tmp_path / "nan")
    p = tmp_path / "nan.yaml"
    from cotune.training.config import save_config

    save_config(cfg, p)
    rc = main(["train", str(p), "engine.options.max_bad_steps=2", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "cotune train: error:" in err and "nan" in err.lower()


def test_a_run_whose_kept_adapter_answers_one_class_says_so(shared_data, tmp_path, capsys):
    """A classifier whose best evaluation gives every row one class scores the constant answer's score: the
    run says so once, for the adapter it keeps; a run that starts on one class and leaves it says nothing."""

    def stick_to_positive(trainer, step, result):
        if step == 1:  # a bias no feature can outvote: every later evaluation answers class 1
            bias = dict(trainer.model.named_parameters())["classifier.adapters.default.bias"]
            with torch.no_grad():
                bias.copy_(torch.tensor([0.0, 100.0]))

    cfg = small_config(shared_data, tmp_path / "stuck", max_steps=4, eval_limit=32)
    res = train(cfg, callbacks=[stick_to_positive])
    log = read_log(tmp_path / "stuck" / "log.jsonl")
    evals = [r for r in log if r["type"] == "eval"]
    assert [e["pred_classes"] for e in evals] == [1.0, 1.0] and all(e["accuracy"] < 1 for e in evals)
    warnings = [r for r in log if r["type"] == "warning"]
    assert [w["step"] for w in warnings] == [res.best_step] and "one class (class 1)" in warnings[0]["message"]
    assert capsys.readouterr().out.count("warning: step") == 1

    train(small_config(shared_data, tmp_path / "free", max_steps=4, eval_limit=32))
    log = read_log(tmp_path / "free" / "log.jsonl")
    # one class at step 2 is the normal start; the kept adapter (step 4) answers both, so no warning
    assert [(e["step"], e["pred_classes"]) for e in log if e["type"] == "eval"] == [(2, 1.0), (4, 2.0)]
    assert json.loads((tmp_path / "free" / "results.json").read_text())["best_step"] == 4
    assert not [r for r in log if r["type"] == "warning"]


def test_a_regression_run_that_predicts_one_value_says_so(shared_data, tmp_path, capsys):
    """AdaKron's lost STS-B seed gave every dev pair one prediction (pred_spread 4.4e-5) and trained on silently."""

    def flatten_head(trainer, step, result):
        if step == 3:  # after step 2's (working) evaluation: every input now gets the head's bias
            heads = [p for n, p in trainer.model.named_parameters() if n == "classifier.adapters.default.weight"]
            assert len(heads) == 1
            with torch.no_grad():
                heads[0].zero_()

    stsb = {"data": str(shared_data / "glue" / "STS-B"), "options": {"max_length": 32}}
    cfg = small_config(shared_data, tmp_path / "run", task=stsb, max_steps=3, eval_every=2, eval_limit=32)
    train(cfg, callbacks=[flatten_head])
    evals = [r for r in read_log(tmp_path / "run" / "log.jsonl") if r["type"] == "eval"]
    assert [e["step"] for e in evals] == [2, 3]
    # A working head spreads its predictions (~5% of the labels' sd after a step); the flattened one does not.
    assert evals[0]["pred_spread"] > 1e-2 and evals[1]["pred_spread"] == 0.0 and evals[1]["pearson"] == 0.0
    warnings = [r for r in read_log(tmp_path / "run" / "log.jsonl") if r["type"] == "warning"]
    assert [w["step"] for w in warnings] == [3] and "pred_spread" in warnings[0]["message"]
    out = capsys.readouterr().out
    assert out.count("warning: step") == 1 and "collapsed to one value" in out and "optim.lr" in out
