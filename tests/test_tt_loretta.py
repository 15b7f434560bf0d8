"""TT layers and the LoRETTA families: materialised == core by core == a brute-force reference, the design's
init, shapes, placement on real MiniLM / a tiny Llama / a tiny RoBERTa head, merge and save/load."""

from __future__ import annotations

import copy
import itertools
import math

import numpy as np
import pytest
import torch
import transformers

from cotune.adapters import adapters, attach, load_adapter, make_config, merge, save_adapter, sites, unmerge
from cotune.adapters.families.loretta import LorettaAdp, LorettaRep
from cotune.adapters.methods import method_configs
from cotune.adapters.tt import TTLinear, auto_mode, default_tt_shape, factorize, tt_contract
from cotune.errors import CotuneError


def brute_matrix(cores, d_in, d_out):
    """W[i, j] from the definition, entry by entry (vectorised over entries): the flat index
    f = i·d_out + j has the row-major multi-index (i_1, …, i_d) over n_1…n_d, and the entry is
    G_1[:, i_1, :] · G_2[:, i_2, :] ⋯ G_d[:, i_d, :]."""
    dims = [g.shape[1] for g in cores]
    idx = np.unravel_index(np.arange(d_in * d_out), dims)  # row-major (C order)
    m = torch.ones(d_in * d_out, 1, 1, dtype=torch.float64)
    for g, i in zip(cores, idx):
        m = m @ g.detach().double()[:, torch.as_tensor(i), :].permute(1, 0, 2)  # (F, r, r')
    return m.reshape(d_in, d_out)


def test_brute_matrix_is_the_definition():
    """The vectorised reference against an explicit loop over every entry of a small TT."""
    torch.manual_seed(0)
    cores = [torch.randn(1, 2, 3), torch.randn(3, 3, 2), torch.randn(2, 2, 1)]
    for (a, b, c), i in zip(itertools.product(range(2), range(3), range(2)), range(12)):
        want = (cores[0][:, a, :] @ cores[1][:, b, :] @ cores[2][:, c, :]).item()
        assert abs(brute_matrix(cores, 3, 4).reshape(-1)[i].item() - want) < 1e-6


@pytest.mark.parametrize(
    "d_in,d_out,shape",
    [(6, 4, [2, 3, 4]), (6, 4, [4, 3, 2]), (10, 6, [4, 3, 5]), (12, 5, [6, 10]), (8, 9, [3, 8, 3])],
)
def test_tt_matrix_and_contraction_equal_brute_force(d_in, d_out, shape):
    torch.manual_seed(0)
    t = TTLinear(d_in, d_out, shape, rank=3).double()
    w = brute_matrix(list(t.cores), d_in, d_out)
    torch.testing.assert_close(t.weight(), w, rtol=1e-12, atol=1e-12)
    u = torch.randn(7, d_in, dtype=torch.float64)
    torch.testing.assert_close(tt_contract(u, list(t.cores), d_in, d_out), u @ w, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "d_in,d_out", [(768, 64), (64, 768), (1024, 64), (64, 1024), (4096, 64), (768, 8), (8, 768), (768, 768), (384, 64)]
)
def test_materialized_equals_core_by_core_fp32(d_in, d_out):
    torch.manual_seed(0)
    a = TTLinear(d_in, d_out, mode="materialize")
    b = TTLinear(d_in, d_out, mode="cores")
    b.load_state_dict(a.state_dict())
    u = torch.randn(3, 5, d_in)
    ya, yb = a(u), b(u)
    assert ya.shape == (3, 5, d_out)
    assert ((ya - yb).norm() / ya.norm()).item() < 1e-6
    (ya.square().sum()).backward()
    (yb.square().sum()).backward()
    for ga, gb in zip(a.parameters(), b.parameters()):
        assert ((ga.grad - gb.grad).norm() / ga.grad.norm()).item() < 1e-5


def test_auto_mode_picks_dense_for_adapters_and_cores_for_the_head():
    assert auto_mode(768, 64, 5) == "materialize" and auto_mode(4096, 64, 5) == "materialize"
    assert auto_mode(768, 768, 5) == "cores"


def test_init_std_and_bias_range_follow_the_design():
    torch.manual_seed(0)
    d_in = d_out = 1024
    t = TTLinear(d_in, d_out, [32, 32, 32, 32], rank=16)
    scale = (1 / math.sqrt(d_in + d_out)) ** (1 / 4)
    for k, g in enumerate(t.cores):  # core k: randn / sqrt(r_k) · (1/sqrt(d_in+d_out))^(1/d)
        want = scale / math.sqrt(t.ranks[k + 1])
        assert abs(g.std().item() - want) < 0.05 * want, (k, g.std().item(), want)
    w = t.weight()  # Var W = 1/(d_in+d_out) because the rank sums cancel the 1/r_k factors
    assert abs(w.std().item() - 1 / math.sqrt(d_in + d_out)) < 0.1 / math.sqrt(d_in + d_out)
    bound = 1 / math.sqrt(d_out)
    assert t.bias.abs().max().item() <= bound and abs(t.bias.std().item() - bound / math.sqrt(3)) < 0.1 * bound


def test_shapes_defaults_and_errors():
    assert default_tt_shape(768, 64) == [8, 8, 12, 8, 8] and default_tt_shape(64, 768) == [8, 8, 12, 8, 8]
    assert default_tt_shape(4096, 64) == [16, 16, 16, 4, 4, 4] and default_tt_shape(1024, 64) == [4, 8, 8, 8, 8, 4]
    assert default_tt_shape(768, 8) == [8, 8, 12, 8] and default_tt_shape(4096, 8) == [16, 16, 8, 4, 4]
    assert default_tt_shape(768, 768) == [12, 8, 8, 8, 8, 12]
    assert factorize(384) == [8, 8, 6] and default_tt_shape(384, 64) == [8, 8, 6, 8, 8]
    assert math.prod(factorize(7919)) == 7919  # a prime stays whole
    with pytest.raises(CotuneError, match="product 1,024"):
        TTLinear(768, 64, [8, 8, 16])
    with pytest.raises(CotuneError, match="product"):
        LorettaAdp(make_config("loretta_adp", tt_shape=[8, 8, 8]), 768, 768)
    with pytest.raises(CotuneError, match="tt_mode"):
        make_config("loretta_rep", tt_mode="fast")
    with pytest.raises(CotuneError, match="tt_rank"):
        TTLinear(8, 8, rank=0)


def _perturb(model, name="default", std=0.05, seed=3):
    torch.manual_seed(seed)
    with torch.no_grad():
        for ad in adapters(model, name).values():
            for p in ad.parameters():
                p.add_(torch.randn_like(p) * std)


def _fresh(model):
    out = copy.deepcopy(model)
    for m in out.modules():
        m._forward_hooks.clear()
        m._forward_pre_hooks.clear()
    return out


def adp_ref(ad: LorettaAdp, u):
    """U(ReLU(D(u))) with the weights from the brute-force definition (fp64)."""
    wd = brute_matrix(list(ad.down.cores), ad.down.d_in, ad.down.d_out)
    wu = brute_matrix(list(ad.up.cores), ad.up.d_in, ad.up.d_out)
    return torch.relu(u.double() @ wd + ad.down.bias.double()) @ wu + ad.up.bias.double()


def test_loretta_adp_formula():
    torch.manual_seed(0)
    ad = LorettaAdp(make_config("loretta_adp", bottleneck=6, tt_shape=[3, 4, 2, 3]), 12, 12)
    u = torch.randn(4, 12)
    torch.testing.assert_close(ad(u).double(), adp_ref(ad, u), rtol=1e-5, atol=1e-6)
    assert ad.site == "sequential" and ad.num_parameters() == 2 * (1 * 3 * 5 + 5 * 4 * 5 + 5 * 2 * 5 + 5 * 3) + 6 + 12


def test_loretta_adp_preset_on_minilm(minilm_cls, sst2_batch, tmp_path):
    batch, _ = sst2_batch
    ref, pristine = copy.deepcopy(minilm_cls), copy.deepcopy(minilm_cls)
    model = attach(minilm_cls, method_configs("loretta_adp", minilm_cls))
    ads = adapters(model)
    adp_paths = sorted(p for p, a in ads.items() if isinstance(a, LorettaAdp))
    assert len(adp_paths) == 12 and all(p.endswith(("attention.output.dense", ".output.dense")) for p in adp_paths)
    assert all(ads[p].down.shape == [8, 8, 6, 8, 8] for p in adp_paths)  # H = 384: the automatic factorisation
    norms = sorted(p for p, a in ads.items() if a.config.family == "full" and p != "classifier")
    assert norms == sorted(n for n, m in ref.named_modules() if isinstance(m, torch.nn.LayerNorm))  # all 13
    assert "classifier" in ads and "bert.pooler.dense" not in ads  # BERT head: classifier trained, pooler kept
    _perturb(model)
    # Reference: the untouched model, with hooks adding the brute-force adapter and using the perturbed
    # LayerNorm / classifier parameters.
    with torch.no_grad():
        for p in adp_paths:
            ad = ads[p]
            ref.get_submodule(p).register_forward_hook(lambda m, i, y, ad=ad: y + adp_ref(ad, y).float())
        for p, ad in ads.items():
            if ad.config.family == "full":
                for k, v in ad.named_parameters():
                    ref.get_submodule(p).get_parameter(k).copy_(v)
        out = model.eval()(**batch).logits
        torch.testing.assert_close(out, ref(**batch).logits, rtol=1e-4, atol=1e-5)
    save_adapter(model, tmp_path / "adp")
    load_adapter(pristine, tmp_path / "adp")
    with torch.no_grad():
        assert torch.equal(pristine.eval()(**batch).logits, out)
    with pytest.raises(CotuneError, match="not mergeable"):
        merge(model)


def test_loretta_adp_compute_modes_agree_on_minilm(minilm_cls, sst2_batch):
    batch, _ = sst2_batch
    a = attach(copy.deepcopy(minilm_cls), "loretta_adp", tt_mode="materialize")
    b = attach(copy.deepcopy(minilm_cls), "loretta_adp", tt_mode="cores")
    b.load_state_dict(a.state_dict())
    with torch.no_grad():
        la, lb = a(**batch).logits, b(**batch).logits
    assert ((la - lb).norm() / la.norm()).item() < 1e-5


def test_loretta_rep_on_minilm_merge_and_roundtrip(minilm_cls, sst2_batch, tmp_path):
    batch, _ = sst2_batch
    base_model = copy.deepcopy(minilm_cls)
    model = attach(minilm_cls, "loretta_rep")
    ads = adapters(model)
    assert len(ads) == 12 and all(p.endswith(("query", "value")) for p in ads)
    ad = next(iter(ads.values()))
    assert isinstance(ad, LorettaRep) and ad.scaling == 2.0 and ad.tt_A.shape == [8, 8, 6, 8]
    assert ad.num_parameters() == 2 * (40 + 200 + 150 + 40)
    _perturb(model, std=0.2)
    # delta_weight against the definition: s·(A_full B_full)ᵀ in nn.Linear layout.
    want = 2.0 * (brute_matrix(list(ad.tt_A.cores), 384, 8) @ brute_matrix(list(ad.tt_B.cores), 8, 384)).T
    torch.testing.assert_close(ad.delta_weight().double(), want, rtol=1e-5, atol=1e-7)
    u = torch.randn(3, 384)
    got, ref_out = ad(u).double() * 2.0, u.double() @ want.T
    assert ((got - ref_out).norm() / ref_out.norm()).item() < 1e-6
    with torch.no_grad():
        out = model.eval()(**batch).logits
        assert (out - base_model(**batch).logits).abs().max() > 1e-3  # the adapter does change the model
        merge(model)
        assert all(s.merged == "default" for s in sites(model).values())
        merged = model(**batch).logits
        torch.testing.assert_close(merged, out, rtol=1e-5, atol=1e-5)
        unmerge(model)
        assert torch.equal(model(**batch).logits, out)
    save_adapter(model, tmp_path / "rep")
    load_adapter(base_model, tmp_path / "rep")
    with torch.no_grad():
        assert torch.equal(base_model.eval()(**batch).logits, out)


def tiny_llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(cfg).eval()


def test_loretta_adp_llama_placement_matches_hooks():
    ref = tiny_llama()
    model = attach(copy.deepcopy(ref), method_configs("loretta_adp", ref))
    ads = adapters(model)
    kinds = {p.rsplit(".", 1)[-1]: ad.site for p, ad in ads.items() if isinstance(ad, LorettaAdp)}
    assert kinds == {"gate_proj": "pre", "up_proj": "pre", "down_proj": "sequential"}
    assert sum(isinstance(a, LorettaAdp) for a in ads.values()) == 6
    assert sum(a.config.family == "full" for a in ads.values()) == 5  # 2 norms per layer + the final norm
    assert "lm_head" not in ads
    _perturb(model)
    with torch.no_grad():
        for p, ad in ads.items():
            mod = ref.get_submodule(p)
            if isinstance(ad, LorettaAdp) and ad.site == "pre":
                mod.register_forward_pre_hook(lambda m, args, ad=ad: (args[0] + adp_ref(ad, args[0]).float(),))
            elif isinstance(ad, LorettaAdp):
                mod.register_forward_hook(lambda m, i, y, ad=ad: y + adp_ref(ad, y).float())
            else:
                mod.weight.copy_(ad.weight)
        ids = torch.randint(0, 64, (2, 7))
        torch.testing.assert_close(model(input_ids=ids).logits, ref(input_ids=ids).logits, rtol=1e-4, atol=1e-5)


def test_tensorized_head_on_tiny_roberta(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.RobertaConfig(
        vocab_size=100, hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=40, num_labels=3,
    )  # fmt: skip
    ref = transformers.RobertaForSequenceClassification(cfg).eval()
    model = attach(copy.deepcopy(ref), method_configs("loretta_rep", ref))
    ads = adapters(model)
    head = ads["classifier.dense"]
    assert head.config.family == "tt_linear" and head.site == "replace" and head.shape == [8, 6, 8, 6]
    assert ads["classifier.out_proj"].config.family == "full"
    assert head.num_parameters() == (1 * 8 * 5 + 5 * 6 * 5 + 5 * 8 * 5 + 5 * 6 * 1) + 48
    _perturb(model)
    ids = torch.randint(3, 100, (2, 9))
    with torch.no_grad():
        out = model(input_ids=ids).logits
        # Reference: the head by hand — features[:, 0] -> x W_TT + b -> tanh -> out_proj (perturbed).
        for p, ad in ads.items():
            if ad.config.family == "loretta_rep":
                ref.get_submodule(p).register_forward_hook(lambda m, i, y, ad=ad: y + ad.scaling * ad(i[0]))
        feats = ref.roberta(input_ids=ids).last_hidden_state[:, 0]
        w = brute_matrix(list(head.cores), 48, 48)
        x = torch.tanh(feats.double() @ w + head.bias.double())
        op = ads["classifier.out_proj"]
        torch.testing.assert_close(out.double(), x @ op.weight.double().T + op.bias.double(), rtol=1e-4, atol=1e-5)
        merge(model)  # loretta_rep, tt_linear and full all merge
        torch.testing.assert_close(model(input_ids=ids).logits, out, rtol=1e-5, atol=1e-5)
        unmerge(model)
    save_adapter(model, tmp_path / "rep")
    fresh = _fresh(ref)
    load_adapter(fresh, tmp_path / "rep")
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=ids).logits, out)
