"""linear, mlp and bottleneck families on the real MiniLM model and real SST-2 rows.

References are independent: a second copy of the base model with forward hooks that add the documented
formula written out here with einsum / explicit layers.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cotune.adapters import (
    adapters,
    attach,
    load_adapter,
    make_config,
    merge,
    save_adapter,
    sites,
    trainable_parameters,
    unmerge,
)
from cotune.adapters.methods import method_configs
from cotune.errors import CotuneError
from cotune.models import load_model


def _randomise(model, name=None, std=0.05, seed=1):
    """Give zero-initialised weights real values so equalities are not trivially 0 == 0."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in trainable_parameters(model, name).values():
            p.add_(torch.randn(p.shape, generator=g) * std)


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def _twin(model):
    """A fresh MiniLM with exactly the weights of ``model`` (before any adapter is attached)."""
    twin = load_model("minilm", "seq_cls", num_labels=2).eval()
    twin.load_state_dict(model.state_dict())
    return twin


def _hook_reference(twin, ads, formula, sequential=False):
    """Forward hooks on ``twin`` adding ``formula(adapter, u)`` at each adapted module."""
    hooks = []
    for path, ad in ads.items():
        if sequential:
            hook = lambda m, i, o, ad=ad: o + formula(ad, o)  # noqa: E731 - u is the module output
        else:
            hook = lambda m, i, o, ad=ad: o + formula(ad, i[0])  # noqa: E731 - u is the module input
        hooks.append(twin.get_submodule(path).register_forward_hook(hook))
    return hooks


def _linear_formula(ad, u):
    w = ad.linear.weight.detach()
    out = torch.einsum("bti,oi->bto", u, w)
    return out + ad.linear.bias.detach() if ad.linear.bias is not None else out


def _mlp_formula(ad, u):
    # hidden_sizes [16, 8], GELU: three affine maps written out, the activation between them.
    lin = [m for m in ad.mlp if isinstance(m, nn.Linear)]
    assert [tuple(m.weight.shape) for m in lin] == [(16, u.shape[-1]), (8, 16), (ad.d_out, 8)]
    h = u
    for k, m in enumerate(lin):
        h = torch.einsum("bti,oi->bto", h, m.weight.detach()) + m.bias.detach()
        if k < len(lin) - 1:
            h = F.gelu(h)
    return h


def _bottleneck_formula(ad, y):
    down = torch.einsum("bti,oi->bto", y, ad.adapter_down.weight.detach()) + ad.adapter_down.bias.detach()
    return torch.einsum("bti,oi->bto", torch.tanh(down), ad.adapter_up.weight.detach()) + ad.adapter_up.bias.detach()


@pytest.mark.parametrize(
    ("family", "options", "formula", "sequential", "n_sites"),
    [
        ("linear", {"bias": True}, _linear_formula, False, 12),  # query + value in 6 layers
        ("mlp", {"hidden_sizes": [16, 8], "activation": "gelu"}, _mlp_formula, False, 12),
        ("bottleneck", {"bottleneck_size": 16, "activation": "tanh"}, _bottleneck_formula, True, 12),
    ],
)
def test_forward_equals_formula(minilm_cls, sst2_batch, family, options, formula, sequential, n_sites):
    batch, _ = sst2_batch
    twin = _twin(minilm_cls)
    before = _logits(minilm_cls, batch)
    attach(minilm_cls, family, **options)
    assert len(sites(minilm_cls)) == n_sites
    # Zero-initialised output layer: attaching changes nothing, bit for bit.
    assert torch.equal(_logits(minilm_cls, batch), before)
    _randomise(minilm_cls)
    hooks = _hook_reference(twin, adapters(minilm_cls), formula, sequential)
    got, want = _logits(minilm_cls, batch), _logits(twin, batch)
    assert (got - before).abs().max() > 1e-3  # the randomised adapters really act
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    for h in hooks:
        h.remove()


def test_bottleneck_default_is_houlsby_and_pfeiffer_preset(minilm_cls):
    attach(minilm_cls, "bottleneck")
    paths = sorted(sites(minilm_cls))
    assert paths == sorted(
        [f"bert.encoder.layer.{i}.attention.output.dense" for i in range(6)]
        + [f"bert.encoder.layer.{i}.output.dense" for i in range(6)]
    )
    ad = next(iter(adapters(minilm_cls).values()))
    assert ad.site == "sequential" and ad.adapter_down.weight.shape == (64, 384)
    assert torch.count_nonzero(ad.adapter_up.weight) == 0 and torch.count_nonzero(ad.adapter_up.bias) == 0
    # Houlsby: 12 sites x (384*64 + 64 + 64*384 + 384) parameters.
    assert sum(p.numel() for p in trainable_parameters(minilm_cls).values()) == 12 * (2 * 384 * 64 + 64 + 384)

    (cfg,) = method_configs("pfeiffer", minilm_cls, bottleneck_size=8)
    attach(minilm_cls, cfg, name="pf")
    pf = sorted(adapters(minilm_cls, "pf"))
    assert pf == [f"bert.encoder.layer.{i}.output.dense" for i in range(6)]


@pytest.mark.parametrize("bias", [False, True])
def test_linear_merge_matches_unmerged_and_unmerge_is_exact(minilm_cls, sst2_batch, bias):
    batch, _ = sst2_batch
    attach(minilm_cls, "linear", bias=bias)
    _randomise(minilm_cls, std=0.02)
    base_params = {k: v.detach().clone() for k, v in minilm_cls.named_parameters() if ".base." in k}
    unmerged = _logits(minilm_cls, batch)
    merge(minilm_cls)
    merged = _logits(minilm_cls, batch)
    torch.testing.assert_close(merged, unmerged, rtol=0, atol=1e-5)
    changed = {k for k, v in minilm_cls.named_parameters() if ".base." in k and not torch.equal(v, base_params[k])}
    assert any(k.endswith("base.weight") for k in changed)
    assert any(k.endswith("base.bias") for k in changed) == bias  # the bias folds into the base bias
    unmerge(minilm_cls)
    assert all(torch.equal(v, base_params[k]) for k, v in minilm_cls.named_parameters() if ".base." in k)
    assert torch.equal(_logits(minilm_cls, batch), unmerged)


def test_linear_bias_refuses_merge_into_biasless_base():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8, bias=False), nn.ReLU(), nn.Linear(8, 2))
    attach(model, "linear", bias=True, target_modules=["0"])
    x = torch.randn(3, 8)
    with torch.no_grad():
        before = model(x)
    with pytest.raises(CotuneError, match="without a bias"):
        merge(model)
    with torch.no_grad():
        assert torch.equal(model(x), before)  # nothing was changed


@pytest.mark.parametrize("family", ["mlp", "bottleneck"])
def test_nonlinear_families_refuse_merge(minilm_cls, sst2_batch, family):
    batch, _ = sst2_batch
    attach(minilm_cls, family)
    _randomise(minilm_cls)
    before = _logits(minilm_cls, batch)
    with pytest.raises(CotuneError, match=f"not mergeable.*{family}|{family}.*not mergeable"):
        merge(minilm_cls)
    assert torch.equal(_logits(minilm_cls, batch), before)


@pytest.mark.parametrize(
    ("family", "options"),
    [("linear", {"bias": True}), ("mlp", {"hidden_sizes": [32, 16, 8], "activation": "silu"}), ("bottleneck", {})],
)
def test_save_load_roundtrip(minilm_cls, sst2_batch, tmp_path, family, options):
    batch, _ = sst2_batch
    fresh = _twin(minilm_cls)
    attach(minilm_cls, family, **options)
    _randomise(minilm_cls)
    want = _logits(minilm_cls, batch)
    save_adapter(minilm_cls, tmp_path / "ad")
    saved = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert saved["cotune_components"][0]["cotune_family"] == family
    load_adapter(fresh, tmp_path / "ad")
    assert torch.equal(_logits(fresh, batch), want)
    got_cfg = adapters(fresh)[next(iter(adapters(fresh)))].config
    want_cfg = make_config(family, **options)
    for key, value in options.items():
        assert getattr(got_cfg, key) == value == getattr(want_cfg, key)


def test_bad_options_name_the_valid_values():
    with pytest.raises(CotuneError, match="positive integers"):
        make_config("mlp", hidden_sizes=[])
    with pytest.raises(CotuneError, match="positive integers"):
        make_config("mlp", hidden_sizes=[128, 0])
    with pytest.raises(CotuneError, match="valid: relu, gelu"):
        make_config("mlp", activation="softplus")
    with pytest.raises(CotuneError, match="positive integer"):
        make_config("bottleneck", bottleneck_size=0)
    with pytest.raises(CotuneError, match="valid: relu"):
        make_config("bottleneck", activation="elu")
    with pytest.raises(CotuneError, match="unknown option"):
        make_config("linear", r=8)
    with pytest.raises(CotuneError, match="no default placement"):
        method_configs("houlsby", nn.Linear(2, 2))
