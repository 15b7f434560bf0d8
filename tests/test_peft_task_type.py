"""Adapters saved from a classification model load in Hugging Face PEFT whether or not the head was trained."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel

from cotune.adapters import adapter_sets, attach, load_adapter, make_config, save_adapter, trainable_parameters
from cotune.models import load_model


def _randomise(model):
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in trainable_parameters(model).values():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)


@pytest.mark.parametrize("with_head", [False, True])
def test_lowrank_seq_cls_loads_in_peft(minilm_cls, sst2_batch, tmp_path, with_head):
    batch, _ = sst2_batch
    base_state = {k: v.clone() for k, v in minilm_cls.state_dict().items()}
    configs = [make_config("lowrank", r=4, lora_alpha=8)] + ([make_config("full")] if with_head else [])
    attach(minilm_cls, configs)
    _randomise(minilm_cls)
    with torch.no_grad():
        ours = minilm_cls(**batch).logits
    save_adapter(minilm_cls, tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    # PEFT's SEQ_CLS model demands the head's weights; without a trained head the task type must be null.
    assert cfg["task_type"] == ("SEQ_CLS" if with_head else None)
    fresh = load_model("minilm", "seq_cls", num_labels=2).eval()
    fresh.load_state_dict(base_state)  # the same (untrained) head the adapter was trained on
    peft_model = PeftModel.from_pretrained(fresh, tmp_path / "a").eval()
    with torch.no_grad():
        theirs = peft_model(**batch).logits
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)
    # And cotune reads it back the same way.
    again = load_model("minilm", "seq_cls", num_labels=2).eval()
    again.load_state_dict(base_state)
    load_adapter(again, tmp_path / "a")
    with torch.no_grad():
        torch.testing.assert_close(again(**batch).logits, ours, rtol=0, atol=1e-5)


def test_keyword_options_go_to_the_families_given_by_name(minilm_cls):
    """README: ``attach(model, ["lowrank", make_config("full")], r=8, lora_alpha=16)``: r/alpha are lowrank's."""
    head = make_config("full")
    attach(minilm_cls, ["lowrank", head], r=8, lora_alpha=16)
    lowrank, full = adapter_sets(minilm_cls)["default"]
    assert (lowrank.family, lowrank.r, lowrank.lora_alpha) == ("lowrank", 8, 16.0)
    assert full.family == "full" and full.target_modules == ["classifier"]
    # With no name among the entries, the options update the config objects (as a single config always did).
    attach(minilm_cls, make_config("lowrank", target_modules=["key"]), name="b", r=4)
    assert adapter_sets(minilm_cls)["b"][0].r == 4
