"""Published parameter counts, reproduced on the real architectures' default sizes (meta device):
AdaKron on BERT-base, LoRETTA_adp on RoBERTa-base and Llama-2-7B, LoRETTA_rep per 768×768 target."""

from __future__ import annotations

import re
from collections import defaultdict

import pytest
import torch
import transformers

from cotune.adapters import adapters, attach, parameter_report
from cotune.adapters.methods import method_configs
from cotune.cli import main
from cotune.models import meta_model


def grouped(model) -> dict[str, int]:
    """Counts summed over layers: ``roberta.encoder.layer.*.output.dense -> n``."""
    out: dict[str, int] = defaultdict(int)
    for path, n in parameter_report(model)[0]:
        out[re.sub(r"\.\d+\.", ".*.", path)] += n
    return dict(out)


def test_kron_bert_base_r48_is_599232():
    model = attach(meta_model("bert", num_labels=2), method_configs("kron", None, r=48))
    rows, total, _ = parameter_report(model)
    assert total == 599_232  # AdaKron_48, the README's "0.6M"
    assert len(rows) == 12 and all(n == 49_936 for _, n in rows)
    assert grouped(model) == {"bert.encoder.layer.*.output.dense": 599_232}  # not attention.output.dense


def test_madakron_counts():
    """Mixtures add expert copies of the down factors only (the up projection is shared)."""
    full = attach(meta_model("bert", num_labels=2), "kron", r=48, mixture="full", num_experts=4)
    assert parameter_report(full)[1] == 12 * (4 * (768 * 4 + 4 + 768 * 12 + 12) + 48 * 768 + 768)
    partial = attach(meta_model("bert", num_labels=2), "kron", r=48, mixture="partial")  # E = 2
    assert parameter_report(partial)[1] == 12 * (2 * (768 * 4 + 4) + 768 * 12 + 12 + 48 * 768 + 768)


def test_loretta_adp_roberta_base_is_99034():
    model = meta_model("roberta", num_labels=2)
    attach(model, method_configs("loretta_adp", model))
    assert parameter_report(model)[1] == 99_034
    g = grouped(model)
    assert g["classifier.dense"] == 920 + 768  # TT [12,8,8,8,8,12], rank 5, plus bias
    assert g["classifier.out_proj"] == 768 * 2 + 2
    assert sum(v for k, v in g.items() if k.endswith("LayerNorm")) == 25 * 2 * 768  # 12 layers x 2 + embeddings
    assert g["roberta.encoder.layer.*.output.dense"] == g["roberta.encoder.layer.*.attention.output.dense"]
    assert g["roberta.encoder.layer.*.output.dense"] == 12 * ((780 + 64) + (780 + 768))  # D and U, [8,8,12,8,8]


def test_loretta_adp_deberta_base_is_99034():
    """DeBERTa-base's head is pooler.dense (tensorized) + classifier (dense), the same count as RoBERTa."""
    cfg = transformers.DebertaConfig(num_labels=2)  # the defaults are deberta-base's sizes
    with torch.device("meta"):
        model = transformers.DebertaForSequenceClassification(cfg)
    attach(model, method_configs("loretta_adp", model))
    assert parameter_report(model)[1] == 99_034
    g = grouped(model)
    assert g["pooler.dense"] == 920 + 768 and g["classifier"] == 768 * 2 + 2


def test_loretta_adp_llama2_7b_is_876800():
    model = meta_model("llama")
    attach(model, method_configs("loretta_adp", model))
    assert parameter_report(model)[1] == 876_800
    g = grouped(model)
    per_adapter = (1100 + 64) + (1100 + 4096)  # [16,16,16,4,4,4], rank 5: 80+400+400+100+100+20 per TT
    for proj in ("gate_proj", "up_proj", "down_proj"):
        assert g[f"model.layers.*.mlp.{proj}"] == 32 * per_adapter
    assert g["model.layers.*.input_layernorm"] == g["model.layers.*.post_attention_layernorm"] == 32 * 4096
    assert g["model.norm"] == 4096
    sites = {p.rsplit(".", 1)[-1]: a.site for p, a in adapters(model).items() if a.config.family == "loretta_adp"}
    assert sites == {"gate_proj": "pre", "up_proj": "pre", "down_proj": "sequential"}


def test_loretta_rep_one_768_target_is_1160():
    model = attach(
        meta_model("bert", num_labels=2), "loretta_rep", target_modules=["bert.encoder.layer.0.attention.self.query"]
    )
    assert parameter_report(model)[1] == 1_160  # LoRA r=8 would be 12,288
    roberta = meta_model("roberta", num_labels=2)
    attach(roberta, method_configs("loretta_rep", roberta))
    assert parameter_report(roberta)[1] == 24 * 1_160 + (920 + 768) + (768 * 2 + 2)
    llama = attach(meta_model("llama"), "loretta_rep")  # [16,16,8,4,4]: 80+400+200+100+20 per factor
    assert parameter_report(llama)[1] == 64 * 2 * 800


@pytest.mark.parametrize(
    "argv,want",
    [
        (["--model", "config:bert", "--method", "kron", "r=48"], "599,232"),
        (["--model", "config:roberta", "--method", "loretta_adp"], "99,034"),
    ],
)
def test_cli_params_prints_the_published_counts(capsys, argv, want):
    assert main(["params", *argv]) == 0
    out = capsys.readouterr().out
    total = next(line for line in out.splitlines() if line.startswith("trainable parameters"))
    assert total.split()[-1] == want


def test_cli_reports_bad_tt_shape_and_unknown_option(capsys):
    assert main(["params", "--model", "config:roberta", "--method", "loretta_adp", "tt_shape=[8,8,8]"]) == 2
    assert "tt_shape [8, 8, 8] has product 512" in capsys.readouterr().err
    assert main(["params", "--model", "config:bert", "--method", "kron", "r=50"]) == 2
    assert "multiple of 4" in capsys.readouterr().err
    assert main(["params", "--model", "config:bert", "--method", "loretta_rep", "rank=3"]) == 2
    assert "unknown option(s) ['rank']" in capsys.readouterr().err
