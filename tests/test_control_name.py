"""ColA run names: the grammar of ColA's README examples, the mapping to cotune configs, clear errors."""

from __future__ import annotations

import pytest

from cotune.errors import CotuneError
from cotune.training.config import config_from_dict, load_config
from cotune.training.control_name import ControlName, control_name_config, parse_control_name

# The four commands of ColA's README (seed 000), verbatim.
README_NAMES = [
    "glue-cola_roberta-base_sc_full_32",
    "fpb-sa_bart-base_s2s_lora_32",
    "wikisql_bart-base_s2s_cola-lowrank-1_32",
    "dolly-15k_gpt2_clm_cola-lowrank~linear-1_32_col",
]


def test_readme_names_parse_and_round_trip():
    parsed = [parse_control_name(n) for n in README_NAMES]
    assert [p.text for p in parsed] == README_NAMES
    assert parsed[0] == ControlName("glue-cola", "roberta-base", "sc", "full", (), 1, 32, False)
    assert parsed[1].method == "lora" and parsed[1].task == "s2s"
    assert parsed[2] == ControlName("wikisql", "bart-base", "s2s", "cola", ("lowrank",), 1, 32, False)
    assert parsed[3].aux == ("lowrank", "linear") and parsed[3].collaboration


def test_sst2_cola_name_maps_to_gradient_learning():
    d = control_name_config("glue-sst2_roberta-base_sc_cola-lowrank-4_32")
    cfg = config_from_dict(d)
    assert cfg.model == "roberta-base"
    assert (cfg.task.kind, cfg.task.data) == ("seq_cls", "glue/SST-2")
    assert (cfg.engine.name, cfg.engine.options) == ("gl", {"interval": 4})
    # ColA's low-rank auxiliary model: r = 8, scale lora_alpha / r = 1.
    assert (cfg.method.name, cfg.method.options) == ("lowrank", {"r": 8, "lora_alpha": 8})
    assert cfg.batch_size == 32 and cfg.output_dir == "runs/glue-sst2_roberta-base_sc_cola-lowrank-4_32"


def test_other_methods_tasks_and_data():
    lora = config_from_dict(control_name_config("fpb-sa_bart-base_s2s_lora_16"))
    assert (lora.engine.name, lora.method.name, lora.task.kind, lora.task.data) == (
        "backprop",
        "lowrank",
        "seq2seq",
        "fpb",
    )
    assert lora.batch_size == 16
    full = config_from_dict(control_name_config("glue-cola_roberta-base_sc_full_32"))
    assert full.method.name == "full" and full.method.options == {"target_modules": "all"}
    mlp = config_from_dict(control_name_config("gsm8k_smollm2_clm_cola-mlp-1_8"))
    assert (mlp.method.name, mlp.method.options, mlp.task.kind) == ("mlp", {}, "causal_lm")
    linear = config_from_dict(control_name_config("glue-mrpc_minilm_sc_cola-linear-2_32"))
    assert linear.task.data == "glue/MRPC" and linear.engine.options == {"interval": 2}
    # Data sets with no local copy keep their hub name (they load when online).
    dolly = config_from_dict(control_name_config("dolly-15k_gpt2_clm_cola-lowrank-1_32"))
    assert dolly.task.data == "databricks/databricks-dolly-15k"


def test_overrides_apply_on_top_of_a_name():
    cfg = load_config(
        None, ["model=minilm", "max_steps=3"], base=control_name_config("glue-sst2_roberta-base_sc_lora_32")
    )
    assert cfg.model == "minilm" and cfg.max_steps == 3 and cfg.method.name == "lowrank"


@pytest.mark.parametrize(
    "name, fragment",
    [
        ("glue-sst2_roberta-base_sc_cola-lowrank-1", "expected <data>_<model>_<task>_<method>_<batch>"),
        ("imagenet_roberta-base_sc_lora_32", "unknown data 'imagenet'"),
        ("glue-sst2_roberta-base_xx_lora_32", "unknown task 'xx'"),
        ("glue-sst2_roberta-base_sc_cola-conv-1_32", "unknown auxiliary model(s) ['conv']"),
        ("glue-sst2_roberta-base_sc_adapter_32", "unknown method 'adapter'"),
        ("glue-sst2_roberta-base_sc_lora_b", "batch size 'b'"),
        ("glue-sst2_roberta-base_sc_cola-lowrank-0_32", "interval must be >= 1"),
    ],
)
def test_malformed_names_say_what_is_wrong(name, fragment):
    with pytest.raises(CotuneError) as e:
        parse_control_name(name)
    assert fragment in str(e.value)


def test_collaboration_names_become_one_run_of_several_users():
    d = control_name_config("dolly-15k_gpt2_clm_cola-lowrank~linear-1_32_col")
    assert d["users"] == ["lowrank", "linear"] and d["engine"] == {"name": "gl", "options": {"interval": 1,
                                                                                              "merged": True}}
    assert control_name_config("glue-sst2_minilm_sc_cola-mlp-1_8_col")["users"] == ["mlp", "mlp"]
    assert "users" not in control_name_config("glue-sst2_minilm_sc_cola-mlp-1_8")
    with pytest.raises(CotuneError, match="needs a cola-<aux>-<I> method"):
        control_name_config("glue-sst2_minilm_sc_lora_8_col")


def test_offline_hub_model_suggests_packaged_ones(monkeypatch, capsys):
    from cotune.cli import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rc = main(
        [
            "train",
            "--control_name",
            "glue-sst2_roberta-base_sc_cola-lowrank-1_32",
            "--quiet",
            "output_dir=/nonexistent/x",
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2
    assert "'roberta-base'" in err and "model=minilm" in err and "smollm2" in err
