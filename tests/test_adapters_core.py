"""The adapter contract, attach/merge/save/load and PEFT interop, on the real MiniLM model."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

import cotune
from cotune.adapters import (
    adapter_sets,
    adapters,
    attach,
    detach,
    load_adapter,
    make_config,
    merge,
    parameter_report,
    save_adapter,
    set_active,
    sites,
    trainable_parameters,
    unmerge,
)
from cotune.errors import CotuneError
from cotune.models import load_model


def _randomise(model, name=None, std=0.05):
    """Give zero-initialised factors real values so equalities are not trivially 0 == 0."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in trainable_parameters(model, name).values():
            p.add_(torch.randn(p.shape, generator=g) * std)


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def test_lowrank_forward_equals_formula(minilm_cls, sst2_batch):
    batch, _ = sst2_batch
    base = load_model("minilm", "seq_cls", num_labels=2).eval()
    base.load_state_dict(minilm_cls.state_dict())
    attach(minilm_cls, "lowrank", r=4, lora_alpha=8, target_modules=["query"])
    _randomise(minilm_cls)
    # Independent reference: a forward hook adding (alpha/r) * x A^T B^T to each query output.
    ads = adapters(minilm_cls)
    hooks = []
    for path, ad in ads.items():
        A, B = ad.lora_A.weight.detach(), ad.lora_B.weight.detach()
        hooks.append(base.get_submodule(path).register_forward_hook(
            lambda m, i, o, A=A, B=B: o + 2.0 * (i[0] @ A.T @ B.T)))
    torch.testing.assert_close(_logits(minilm_cls, batch), _logits(base, batch), rtol=0, atol=1e-5)
    for h in hooks:
        h.remove()


def test_trainable_count_equals_peft(minilm_cls):
    attach(minilm_cls, [make_config("lowrank", r=8), make_config("full")])
    _, total, _ = parameter_report(minilm_cls)
    ref = get_peft_model(load_model("minilm", "seq_cls", num_labels=2),
                         LoraConfig(r=8, target_modules=["query", "value"], task_type="SEQ_CLS"))
    peft_trainable = sum(p.numel() for p in ref.parameters() if p.requires_grad)
    assert total == peft_trainable == 74_498
    assert all(not p.requires_grad for n, p in minilm_cls.named_parameters() if ".adapters." not in n)


def test_cotune_to_peft_and_back(minilm_cls, sst2_batch, tmp_path):
    batch, _ = sst2_batch
    attach(minilm_cls, [make_config("lowrank", r=8, lora_alpha=16), make_config("full")])
    _randomise(minilm_cls)
    ours = _logits(minilm_cls, batch)
    save_adapter(minilm_cls, tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "SEQ_CLS" and cfg["modules_to_save"] == ["classifier"]
    peft_model = PeftModel.from_pretrained(load_model("minilm", "seq_cls", num_labels=2), tmp_path / "a").eval()
    torch.testing.assert_close(_logits(peft_model, batch), ours, rtol=0, atol=1e-6)
    # PEFT's own folder back into cotune (different targets and rank).
    pm = get_peft_model(load_model("minilm", "seq_cls", num_labels=2),
                        LoraConfig(r=4, lora_alpha=8, target_modules=["key", "dense"], task_type="SEQ_CLS"))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n or "classifier" in n:
                p.normal_(std=0.05)
    pm.eval()
    pm.save_pretrained(tmp_path / "p")
    m = load_adapter(load_model("minilm", "seq_cls", num_labels=2).eval(), tmp_path / "p")
    torch.testing.assert_close(_logits(m, batch), _logits(pm, batch), rtol=0, atol=1e-6)


def test_merge_unmerge(minilm_cls, sst2_batch):
    batch, _ = sst2_batch
    before = {k: v.clone() for k, v in minilm_cls.state_dict().items()}
    attach(minilm_cls, "lowrank", r=8, lora_alpha=16)
    _randomise(minilm_cls)
    unmerged = _logits(minilm_cls, batch)
    merge(minilm_cls)
    torch.testing.assert_close(_logits(minilm_cls, batch), unmerged, rtol=0, atol=1e-5)
    unmerge(minilm_cls)
    detach(minilm_cls, "default")
    after = minilm_cls.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # bit for bit


def test_named_sets_and_activation(minilm_cls, sst2_batch):
    batch, _ = sst2_batch
    plain = _logits(minilm_cls, batch)
    attach(minilm_cls, "lowrank", name="a", r=4)
    attach(minilm_cls, "lowrank", name="b", r=2, target_modules=["key"])
    _randomise(minilm_cls, "a")
    _randomise(minilm_cls, "b")
    assert sorted(adapter_sets(minilm_cls)) == ["a", "b"]
    yb = _logits(minilm_cls, batch)
    set_active(minilm_cls, "a")
    ya = _logits(minilm_cls, batch)
    set_active(minilm_cls, None)
    torch.testing.assert_close(_logits(minilm_cls, batch), plain, rtol=0, atol=0)
    assert not torch.allclose(ya, yb) and not torch.allclose(ya, plain)
    detach(minilm_cls, "a")
    detach(minilm_cls, "b")
    assert not sites(minilm_cls)


def test_dropout_replays_with_seed():
    lin = torch.nn.Linear(6, 5)
    cfg = make_config("lowrank", r=2, lora_dropout=0.5)
    ad = cotune.adapters.get_family("lowrank").adapter_cls(cfg, 6, 5, lin).train()
    torch.nn.init.normal_(ad.lora_B.weight)
    x = torch.randn(3, 6)
    assert ad.stochastic
    torch.testing.assert_close(ad(x, seed=7), ad(x, seed=7), rtol=0, atol=0)
    assert not torch.allclose(ad(x, seed=7), ad(x, seed=8))


def test_errors_say_what_to_fix(minilm_cls, tmp_path):
    with pytest.raises(CotuneError, match="known: .*lowrank"):
        attach(minilm_cls, "lowrnk")
    with pytest.raises(CotuneError, match="nearest module names: query"):
        attach(minilm_cls, "lowrank", target_modules=["qurey"])
    with pytest.raises(CotuneError, match="valid: .*lora_alpha"):
        attach(minilm_cls, "lowrank", rank=8)
    assert not sites(minilm_cls) and not adapter_sets(minilm_cls)  # nothing half-attached
    attach(minilm_cls, "lowrank", name="x", r=4)
    save_adapter(minilm_cls, tmp_path / "ok", name="x")
    # A corrupt weights file and a missing one.
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text((tmp_path / "ok" / "adapter_config.json").read_text())
    (bad / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    fresh = load_model("minilm", "seq_cls", num_labels=2)
    with pytest.raises(CotuneError, match="corrupt"):
        load_adapter(fresh, bad)
    (bad / "adapter_model.safetensors").unlink()
    with pytest.raises(CotuneError, match="not found"):
        load_adapter(fresh, bad)
    (bad / "adapter_config.json").write_text("{")
    with pytest.raises(CotuneError, match="not valid JSON"):
        load_adapter(fresh, bad)


def test_adapter_for_another_base_is_refused(minilm_cls, tmp_path):
    from cotune.models import meta_model

    attach(minilm_cls, "lowrank", r=4)
    save_adapter(minilm_cls, tmp_path / "a")
    other = meta_model("bert", hidden_size=128, num_hidden_layers=6, num_attention_heads=2, intermediate_size=256)
    with pytest.raises(CotuneError, match=r"shape mismatch.*saved \(4, 384\) vs model \(4, 128\)"):
        load_adapter(other.to_empty(device="cpu"), tmp_path / "a")
    assert not adapter_sets(other) and not sites(other)  # the failed load left the model as it was


def test_meta_model_params_cost_no_memory():
    from cotune.commands.params import format_report
    from cotune.models import meta_model

    llama = meta_model("llama")  # Llama-2-7B sizes on the meta device
    attach(llama, "lowrank", r=8)
    rows, total, base = parameter_report(llama)
    assert base == 6_738_415_616 and total == 32 * 2 * 8 * (4096 + 4096)
    assert "4,194,304" in format_report(rows, total, base)


def test_offline_hub_name_fails_at_once(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CotuneError, match="minilm"):
        load_model("bert-base-uncased", "seq_cls")


def test_cli_params(capsys):
    from cotune.cli import main

    assert main(["params", "--model", "config:gpt2", "--method", "lowrank", "r=4"]) == 0
    out = capsys.readouterr().out
    assert "transformer.h.*.attn.c_attn" in out and f"{12 * 4 * (768 + 2304):,}" in out
    assert main(["params", "--model", "config:gpt2", "--method", "nope"]) == 2


def test_families_function_survives_subpackage_imports():
    # Importing a family module must not shadow cotune.adapters.families (the function) with the subpackage.
    import cotune.adapters as pkg
    from cotune.adapters.families import kron  # noqa: F401

    assert callable(pkg.families) and "kron" in pkg.families() and "lowrank" in cotune.families()
