"""LoRETTA's tensorized classifier head (``--tensor_layers ...,cls``) on any encoder, MiniLM included."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from user_cli import REPO, TINY, cotune

from cotune.adapters import adapters, attach
from cotune.adapters.families.loretta import TTLinearAdapter
from cotune.adapters.methods import method_configs
from cotune.errors import CotuneError


def _families(configs) -> dict[str, list]:
    out: dict[str, list] = {}
    for c in configs:
        out.setdefault(c.family, []).append(c.target_modules)
    return out


def test_tensor_layers_cls_tensorizes_minilms_pooler_dense(minilm_cls, sst2_batch):
    batch, _ = sst2_batch
    assert "tt_linear" not in _families(method_configs("loretta_adp", minilm_cls))  # auto keeps the pretrained pooler
    assert "tt_linear" not in _families(method_configs("loretta_adp", minilm_cls, tensor_layers="adapters"))
    configs = method_configs("loretta_adp", minilm_cls, tensor_layers="adapters,cls")
    assert _families(configs)["tt_linear"] == [["pooler.dense"]]
    assert ["classifier"] in _families(configs)["full"]
    assert _families(method_configs("loretta_rep", minilm_cls, tensor_head=True))["tt_linear"] == [["pooler.dense"]]
    attach(minilm_cls, configs)
    head = adapters(minilm_cls)["bert.pooler.dense"]
    assert isinstance(head, TTLinearAdapter) and head.d_in == head.d_out == 384
    # The pooler now computes tanh(u W_TT + b) on the first token, and the loss reaches the TT cores.
    minilm_cls.eval()  # no dropout between the pooler and the classifier
    out = minilm_cls(**batch, output_hidden_states=True)
    first = out.hidden_states[-1][:, 0]
    pooled = torch.tanh(first @ head.weight() + head.bias)
    torch.testing.assert_close(out.logits, minilm_cls.classifier(pooled), rtol=1e-5, atol=1e-5)
    out.logits.sum().backward()
    assert all(c.grad is not None and c.grad.abs().sum() > 0 for c in head.cores)


def test_bad_tensor_layers_are_clear_errors(minilm_cls):
    with pytest.raises(CotuneError, match="tensor_layers"):
        method_configs("loretta_adp", minilm_cls, tensor_layers="adapters,cls,embeddings")
    with pytest.raises(CotuneError, match="tensor_head"):
        method_configs("loretta_adp", minilm_cls, tensor_head="maybe")
    with pytest.raises(CotuneError, match="tensor_layers says tensor_head=True"):
        method_configs("loretta_adp", minilm_cls, tensor_layers="adapters,cls", tensor_head=False)


def test_tensorized_head_from_the_command_line(tmp_path, shared_data):
    out = cotune("params", "--model", "minilm", "--task", "seq_cls", "--method", "loretta_adp",
                 "tensor_layers=adapters,cls", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "bert.pooler.dense" in out.stdout
    cfg = yaml.safe_load((REPO / "examples" / "loretta_adp_minilm_sst2.yaml").read_text())
    cfg["task"]["data"] = str(shared_data / "glue" / "SST-2")
    (tmp_path / "l.yaml").write_text(yaml.safe_dump(cfg))
    # MiniLM's head reads its mean pooling by default: no pooler dense to tensorize, and the error says so
    out = cotune("train", "l.yaml", "method.options.tensor_layers=adapters,cls", *TINY, "--quiet", cwd=tmp_path)
    assert out.returncode == 2 and "task.options.pooling=model" in out.stderr, out.stderr
    out = cotune("train", "l.yaml", "method.options.tensor_layers=adapters,cls", "task.options.pooling=model", *TINY,
                 "--quiet", "--overwrite", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    saved = json.loads((tmp_path / "runs" / "loretta_adp_minilm_sst2" / "adapter" / "adapter_config.json").read_text())
    tt = [c for c in saved["cotune_components"] if c["cotune_family"] == "tt_linear"]
    assert tt and tt[0]["target_modules"] == ["pooler.dense"]
