"""The head reads a sentence-transformers checkpoint's own pooling (issue 20): read from modules.json, equal to
the direct masked mean, padding-invariant, better features than BERT's untrained pooler on real SST-2, and
recorded with the adapter so that a head never reads an embedding it was not trained on."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from cotune.errors import CotuneError
from cotune.models import load_model, minilm_path
from cotune.tasks.pooling import SentencePooler, apply_pooling, checkpoint_pooling

REPO = Path(__file__).resolve().parents[1]


def test_checkpoint_pooling_read_from_modules_json(tmp_path):
    assert checkpoint_pooling(str(minilm_path())) == "mean"  # all-MiniLM-L6-v2's 1_Pooling/config.json
    assert checkpoint_pooling(str(tmp_path)) is None  # not a sentence-transformers folder
    (tmp_path / "modules.json").write_text(json.dumps([{"idx": 1, "name": "1", "path": "1_Pooling",
                                                        "type": "sentence_transformers.models.Pooling"}]))
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_cls_token": True}))
    assert checkpoint_pooling(str(tmp_path)) == "cls"
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps(
        {"pooling_mode_mean_tokens": True, "pooling_mode_max_tokens": True}))
    assert checkpoint_pooling(str(tmp_path)) is None  # two modes concatenated: not computed, the pooler stays
    (tmp_path / "modules.json").write_text("{not json")
    with pytest.raises(CotuneError, match="pooling='model'"):
        checkpoint_pooling(str(tmp_path))


def _minilm(pooling: str):
    torch.manual_seed(0)
    m = load_model("minilm", "seq_cls", num_labels=2).eval()
    return m, apply_pooling(m, str(minilm_path()), pooling)


def test_mean_pooling_equals_direct_masked_mean_and_ignores_padding(sst2_batch):
    batch, _ = sst2_batch
    m, mode = _minilm("auto")
    assert mode == "mean" and isinstance(m.bert.pooler, SentencePooler)
    assert m.config.cotune_pooling == "mean"
    with torch.no_grad():
        out = m.bert(**batch)
        h, mask = out.last_hidden_state.double(), batch["attention_mask"].double().unsqueeze(-1)
        direct = (h * mask).sum(1) / mask.sum(1)
        assert torch.allclose(out.pooler_output.double(), direct, atol=1e-6, rtol=0)
        # one row alone (no padding) pools to the same embedding as inside the padded batch
        n = int(batch["attention_mask"][0].sum())
        alone = m.bert(**{k: v[:1, :n] for k, v in batch.items()}).pooler_output
        assert torch.allclose(alone[0], out.pooler_output[0], atol=1e-5, rtol=0)
        # and the head reads it: logits = classifier(embedding) in eval mode
        logits = m(**batch).logits
        assert torch.allclose(logits, m.classifier(out.pooler_output), atol=1e-6, rtol=0)


def test_cls_and_max_modes_and_model_pooler(sst2_batch):
    batch, _ = sst2_batch
    with torch.no_grad():
        h = load_model("minilm", "base").eval()(**batch).last_hidden_state
        m, _ = _minilm("cls")
        assert torch.allclose(m.bert(**batch).pooler_output, h[:, 0], atol=1e-6)
        m, _ = _minilm("max")
        masked = h.masked_fill(batch["attention_mask"].unsqueeze(-1) == 0, -1e9)
        assert torch.allclose(m.bert(**batch).pooler_output, masked.amax(1), atol=1e-6)
        m, mode = _minilm("model")
        assert mode is None and type(m.bert.pooler).__name__ == "BertPooler"


def test_mean_pooled_features_beat_the_untrained_pooler_on_sst2(shared_data, tmp_path):
    """The cause issue 20 names, through the benchmark's smoke run: a linear probe on frozen MiniLM features of real
    SST-2 rows (400 train, 300 dev)."""
    sys.path.insert(0, str(REPO))
    from benchmarks import pooling_probe

    assert pooling_probe.main(["--smoke", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "smoke" / "results.json").read_text())
    acc = res["accuracy"]
    assert acc["auto"] > acc["model"] + 0.05 and acc["auto"] > res["majority"] + 0.15, res


def test_adapter_records_its_pooling_and_refuses_another(shared_data, tmp_path):
    from cotune.adapters import attach
    from cotune.adapters.io import load_adapter, save_adapter
    from cotune.adapters.registry import get_family
    from cotune.tasks import make_task

    task = make_task("seq_cls", "glue/SST-2", "minilm", max_rows=64)
    assert task.pooling == "auto"
    m = task.build_model()
    heads = get_family("full").config_cls(target_modules=["classifier"])
    attach(m, [get_family("lowrank").config_cls(r=4, target_modules=["query", "value"]), heads])
    save_adapter(m, tmp_path / "a")
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["cotune_pooling"] == "mean"
    again = make_task("seq_cls", "glue/SST-2", "minilm", max_rows=64).build_model()
    load_adapter(again, tmp_path / "a")  # the same default: loads
    other = make_task("seq_cls", "glue/SST-2", "minilm", max_rows=64, pooling="model").build_model()
    with pytest.raises(CotuneError, match="pooling='mean'"):
        load_adapter(other, tmp_path / "a")
    with pytest.raises(CotuneError, match="pooling must be one of"):
        make_task("seq_cls", "glue/SST-2", "minilm", pooling="avg")
