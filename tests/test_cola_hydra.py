"""cola (CoLA) and hydra (HydraLoRA) on the real MiniLM model and real SST-2 rows.

Every formula is written out here independently (double loops over (A_i, B_j) pairs, hand-listed
heuristic pairings, the random draw replayed from the same seeded generator, an explicit softmax).
"""

from __future__ import annotations

import pytest
import torch

from cotune.adapters import (
    adapters,
    attach,
    detach,
    load_adapter,
    make_config,
    merge,
    parameter_report,
    save_adapter,
    sites,
    trainable_parameters,
    unmerge,
)
from cotune.adapters.draws import keep_mask
from cotune.adapters.families.cola import heuristic_groups
from cotune.errors import CotuneError
from cotune.models import load_model, meta_model

QV = ["query", "value"]


def _fresh():
    torch.manual_seed(0)  # the same classifier-head init as the minilm_cls fixture
    return load_model("minilm", "seq_cls", num_labels=2).eval()


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def _randomise(model, name=None, std=0.02, seed=1):
    """Move every factor off its init by an independent random amount (copies then differ)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in trainable_parameters(model, name).values():
            p.add_(torch.randn(p.shape, generator=g) * std)


def _hidden(model, batch):
    """Real 384-wide token states (the embeddings of the SST-2 rows): what layer 0's query reads."""
    with torch.no_grad():
        return model.bert.embeddings(input_ids=batch["input_ids"], token_type_ids=batch["token_type_ids"])


def _one_adapter(model, path="bert.encoder.layer.0.attention.self.query"):
    return adapters(model)[path]


def _pairs_formula(ad, u, pairs):
    """s-free g(u) = Σ over (i, j) of B_j A_i u, written as an explicit loop."""
    out = torch.zeros(*u.shape[:-1], ad.d_out)
    for i, j in pairs:
        out += torch.einsum("or,ri,bti->bto", ad.cola_B[j].detach(), ad.cola_A[i].detach(), u)
    return out


# --- forward formulas ------------------------------------------------------------------------------


def test_heuristic_groups_by_hand():
    assert heuristic_groups(2, 5) == [[0, 1, 4], [2, 3]]  # k=2, leftover B4 -> A0
    assert heuristic_groups(2, 7) == [[0, 1, 2, 6], [3, 4, 5]]  # k=3, leftover B6 -> A0
    assert heuristic_groups(3, 5) == [[0, 3], [1, 4], [2]]  # k=1, leftovers B3, B4 -> A0, A1
    assert heuristic_groups(3, 2) == [[0], [1], []]  # k=0: round-robin only, A2 unused
    assert heuristic_groups(2, 3) == [[0, 2], [1]]


@pytest.mark.parametrize(
    ("m", "n", "strategy", "pairs"),
    [
        (2, 3, "full", [(i, j) for i in range(2) for j in range(3)]),
        (2, 5, "heuristic", [(0, 0), (0, 1), (1, 2), (1, 3), (0, 4)]),
        (3, 2, "heuristic", [(0, 0), (1, 1)]),
    ],
)
def test_cola_forward_equals_pair_sum(minilm_cls, sst2_batch, m, n, strategy, pairs):
    batch, _ = sst2_batch
    attach(minilm_cls, "cola", num_A=m, num_B=n, strategy=strategy, init="lora", target_modules=["query"])
    _randomise(minilm_cls)
    ad = _one_adapter(minilm_cls)
    u = _hidden(minilm_cls, batch)
    assert ad.scaling == 2.0  # 16 / 8
    for mode in (ad.train, ad.eval):  # deterministic strategies: same map in both modes
        mode()
        with torch.no_grad():
            torch.testing.assert_close(ad(u), _pairs_formula(ad, u, pairs), rtol=1e-5, atol=1e-6)
    assert not ad.stochastic
    # delta_weight is the same map as a matrix (mergeable): s Σ B_j A_i.
    dw = sum(ad.cola_B[j].detach() @ ad.cola_A[i].detach() for i, j in pairs)
    torch.testing.assert_close(ad.delta_weight(), 2.0 * dw, rtol=1e-5, atol=1e-6)


def test_cola_random_replays_the_seeded_draw(minilm_cls, sst2_batch):
    batch, _ = sst2_batch
    attach(minilm_cls, "cola", num_A=3, num_B=4, strategy="random", init="lora", target_modules=["query"])
    _randomise(minilm_cls)
    ad = _one_adapter(minilm_cls)
    u = _hidden(minilm_cls, batch)
    ad.train()
    assert ad.stochastic
    outs = set()
    for seed in (0, 1, 7, 1234):
        gen = torch.Generator().manual_seed(seed)
        draw = torch.randint(0, 4, (3,), generator=gen).tolist()  # one B per A_i, as the adapter draws
        with torch.no_grad():
            got = ad(u, seed=seed)
            torch.testing.assert_close(got, _pairs_formula(ad, u, list(enumerate(draw))), rtol=1e-5, atol=1e-6)
            assert torch.equal(ad(u, seed=seed), got)  # replayable
        outs.add(tuple(draw))
    assert len(outs) > 1  # the draws really differ between seeds
    # Eval: the expectation over draws, (1/N) Σ_i Σ_j B_j A_i.
    ad.eval()
    full = [(i, j) for i in range(3) for j in range(4)]
    with torch.no_grad():
        torch.testing.assert_close(ad(u), _pairs_formula(ad, u, full) / 4, rtol=1e-5, atol=1e-6)
    assert not ad.stochastic


def test_cola_dropout_mask_per_pair_replays(minilm_cls, sst2_batch):
    batch, _ = sst2_batch
    attach(minilm_cls, "cola", num_A=2, num_B=2, init="lora", lora_dropout=0.25, target_modules=["query"])
    _randomise(minilm_cls)
    ad = _one_adapter(minilm_cls).train()
    u = _hidden(minilm_cls, batch)
    want = torch.zeros(*u.shape[:-1], ad.d_out)
    masks = [keep_mask(u, 0.25, seed=5, stream=i * 2 + j) for i in range(2) for j in range(2)]
    assert all(not torch.equal(masks[0], m) for m in masks[1:])  # a mask of its own per pair
    for i in range(2):
        for j in range(2):
            want += (u * masks[i * 2 + j] / 0.75) @ ad.cola_A[i].detach().T @ ad.cola_B[j].detach().T
    with torch.no_grad():
        torch.testing.assert_close(ad(u, seed=5), want, rtol=1e-5, atol=1e-6)
        assert not torch.equal(ad(u, seed=6), want)


# --- PiSSA init, residual, detach, reload ----------------------------------------------------------


def test_pissa_init_factors_and_residual(minilm_cls):
    path = "bert.encoder.layer.1.intermediate.dense"  # a non-square 1536x384 weight
    w = minilm_cls.get_submodule(path).weight.detach().clone()
    attach(minilm_cls, "cola", target_modules=[path])
    ad = adapters(minilm_cls)[path]
    s = 16 / 8
    # Independent reference: the best rank-8 approximation from float64 SVD.
    u, sv, vh = torch.linalg.svd(w.double(), full_matrices=False)
    w_r = (u[:, :8] * sv[:8]) @ vh[:8]
    a_sum = sum(a.detach() for a in ad.cola_A)
    b_sum = sum(b.detach() for b in ad.cola_B)
    torch.testing.assert_close((s * b_sum @ a_sum).double(), w_r, rtol=0, atol=2e-5)
    torch.testing.assert_close(sites(minilm_cls)[path].base.weight.double(), w - w_r, rtol=0, atol=2e-5)
    # A_i = A0 / M, B_j = B0 / N: equal copies, each its own storage; A0 rows are √(S_r/s)-scaled Vh rows.
    assert all(torch.equal(ad.cola_A[0], a) for a in ad.cola_A) and all(torch.equal(ad.cola_B[0], b) for b in ad.cola_B)
    assert len({p.data_ptr() for p in ad.parameters()}) == 5
    row_norms = (2 * ad.cola_A[0].detach()).double().norm(dim=1)
    torch.testing.assert_close(row_norms, (sv[:8] / s).sqrt(), rtol=1e-5, atol=0)


@pytest.mark.parametrize(
    ("strategy", "init", "targets"),
    [
        ("full", "pissa", None),  # the default placement: all 36 linear layers of the encoder
        ("heuristic", "pissa", QV),
        ("random", "pissa", QV),
        ("full", "pissa_perturbed", QV),
    ],
)
def test_pissa_step0_unchanged_and_detach_restores(minilm_cls, sst2_batch, strategy, init, targets):
    batch, _ = sst2_batch
    pristine = {k: v.detach().clone() for k, v in minilm_cls.named_parameters()}
    want = _logits(minilm_cls, batch)
    with torch.no_grad():
        want_h = minilm_cls(**batch, output_hidden_states=True).hidden_states[-1]
    attach(minilm_cls, "cola", strategy=strategy, init=init, target_modules=targets)
    assert len(sites(minilm_cls)) == (36 if targets is None else 12)
    res = [s.base.weight for s in sites(minilm_cls).values()]
    assert not any(torch.equal(r, pristine[p + ".weight"]) for r, p in zip(res, sites(minilm_cls)))
    for ad in adapters(minilm_cls).values():
        ad.train()  # random: every draw pairs identical copies, so even training-mode draws match
    with torch.no_grad():
        out = minilm_cls(**batch, output_hidden_states=True)
    torch.testing.assert_close(out.logits, want, rtol=0, atol=1e-5)
    torch.testing.assert_close(out.hidden_states[-1], want_h, rtol=0, atol=1e-4)
    if init == "pissa_perturbed":
        ad = _one_adapter(minilm_cls)
        assert not torch.equal(ad.cola_A[0], ad.cola_A[1]) and not torch.equal(ad.cola_B[0], ad.cola_B[2])
    detach(minilm_cls, "default")
    assert all(torch.equal(v, pristine[k]) for k, v in minilm_cls.named_parameters())
    assert not sites(minilm_cls)


def test_reload_restores_the_same_residual(minilm_cls, sst2_batch, tmp_path):
    batch, _ = sst2_batch
    attach(minilm_cls, "cola", target_modules=QV)
    _randomise(minilm_cls)  # stands for training: the factors no longer equal their init
    want = _logits(minilm_cls, batch)
    residual = {p: s.base.weight.detach().clone() for p, s in sites(minilm_cls).items()}
    save_adapter(minilm_cls, tmp_path / "cola")
    fresh = _fresh()
    load_adapter(fresh, tmp_path / "cola")
    assert all(torch.equal(s.base.weight, residual[p]) for p, s in sites(fresh).items())
    assert torch.equal(_logits(fresh, batch), want)


def test_second_pissa_set_on_same_module_is_refused(minilm_cls):
    attach(minilm_cls, "cola", target_modules=["query"])
    before = {k: v.detach().clone() for k, v in minilm_cls.named_parameters()}
    with pytest.raises(CotuneError, match="already holds the PiSSA residual"):
        attach(minilm_cls, "cola", name="second", target_modules=["query"])
    assert all(torch.equal(v, before[k]) for k, v in minilm_cls.named_parameters())
    attach(minilm_cls, "cola", name="second", init="lora", target_modules=["query"])  # lora init is fine


# --- merging ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", ["full", "heuristic"])
def test_cola_merge_matches_unmerged(minilm_cls, sst2_batch, strategy):
    batch, _ = sst2_batch
    attach(minilm_cls, "cola", strategy=strategy, num_B=5, target_modules=QV)
    _randomise(minilm_cls)
    residual = {p: s.base.weight.detach().clone() for p, s in sites(minilm_cls).items()}
    unmerged = _logits(minilm_cls, batch)
    merge(minilm_cls)
    torch.testing.assert_close(_logits(minilm_cls, batch), unmerged, rtol=0, atol=1e-5)
    unmerge(minilm_cls)
    assert all(torch.equal(s.base.weight, residual[p]) for p, s in sites(minilm_cls).items())
    assert torch.equal(_logits(minilm_cls, batch), unmerged)


# --- the copy-symmetry property ----------------------------------------------------------------------


def _adamw_steps(model, batch, labels, groups, steps=3):
    opt = torch.optim.AdamW(groups, lr=1e-3, weight_decay=0.0, eps=1e-6)
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(model(**batch).logits, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_full_strategy_copies_stay_identical_and_equal_a_faster_lora(minilm_cls, sst2_batch):
    batch, labels = sst2_batch
    lora = _fresh()  # cola with M = N = 1 is one PiSSA-initialised LoRA
    attach(minilm_cls, "cola", num_A=2, num_B=3, target_modules=QV)
    attach(lora, "cola", num_A=1, num_B=1, target_modules=QV)
    init = {k: v.detach().clone() for k, v in trainable_parameters(minilm_cls).items()}
    _adamw_steps(minilm_cls, batch, labels, list(trainable_parameters(minilm_cls).values()))
    # The single LoRA's A learns M = 2 times and its B N = 3 times faster (AdamW updates are linear in lr).
    params = trainable_parameters(lora)
    a_ps = [p for k, p in params.items() if ".cola_A." in k]
    b_ps = [p for k, p in params.items() if ".cola_B." in k]
    _adamw_steps(lora, batch, labels, [{"params": a_ps, "lr": 2e-3}, {"params": b_ps, "lr": 3e-3}])
    for path, ad in adapters(minilm_cls).items():
        assert all(torch.equal(ad.cola_A[0], a) for a in ad.cola_A), path
        assert all(torch.equal(ad.cola_B[0], b) for b in ad.cola_B), path
        assert not torch.equal(ad.cola_A[0], init[f"{path}.cola_A.0"])  # they did train
        single = adapters(lora)[path]
        torch.testing.assert_close(2 * ad.cola_A[0], single.cola_A[0], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(3 * ad.cola_B[0], single.cola_B[0], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(_logits(minilm_cls, batch), _logits(lora, batch), rtol=0, atol=1e-5)


# --- parameter count -------------------------------------------------------------------------------


def test_llama31_8b_parameter_share_is_066_percent():
    model = meta_model(
        "llama",
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
    )
    attach(model, "cola")  # r 8, α 16, 2|3, all seven linear layers (default for llama)
    rows, trainable, base = parameter_report(model)
    assert len(rows) == 32 * 7
    # Per layer r·(M·d_in + N·d_out) over q, k, v, o (4096→4096/1024) and gate, up, down (4096↔14336).
    shapes = [(4096, 4096), (4096, 1024), (4096, 1024), (4096, 4096), (4096, 14336), (4096, 14336), (14336, 4096)]
    per_layer = sum(8 * (2 * i + 3 * o) for i, o in shapes)
    assert trainable == 32 * per_layer == 52_953_088
    assert base == 8_030_261_248  # Llama-3.1-8B
    assert round(100 * trainable / base, 2) == 0.66
    assert all(p.device.type == "meta" for p in model.parameters())
    # HydraLoRA at the same places, r 8, N 3: r·(d_in + N·d_out) + N·d_in per target (A, heads, router).
    attach(model, "hydra", name="hydra")
    _, hydra_trainable, _ = parameter_report(model, "hydra")
    assert hydra_trainable == 32 * sum(8 * (i + 3 * o) + 3 * i for i, o in shapes) == 46_727_168


# --- hydra -------------------------------------------------------------------------------------------


def test_hydra_forward_and_router(minilm_cls, sst2_batch):
    batch, _ = sst2_batch
    attach(minilm_cls, "hydra", num_B=4, target_modules=["query"])
    _randomise(minilm_cls)
    ad = _one_adapter(minilm_cls)
    u = _hidden(minilm_cls, batch)
    with torch.no_grad():
        w = ad.router_weights(u)
        torch.testing.assert_close(w.sum(-1), torch.ones(u.shape[:-1]), rtol=0, atol=1e-6)
        logits = torch.einsum("bti,ni->btn", u, ad.lora_route.weight)
        e = torch.exp(logits - logits.max(-1, keepdim=True).values)
        probs = e / e.sum(-1, keepdim=True)
        z = torch.einsum("ri,bti->btr", ad.lora_A.weight, u)
        want = sum(probs[..., j : j + 1] * torch.einsum("or,btr->bto", ad.lora_B[j].weight, z) for j in range(4))
        torch.testing.assert_close(ad(u), want, rtol=1e-5, atol=1e-6)
    assert ad.scaling == 2.0 and not ad.mergeable
    assert ad.num_parameters() == 8 * 384 + 4 * 384 * 8 + 4 * 384


def test_hydra_refuses_merge_and_dropout_replays(minilm_cls, sst2_batch):
    batch, _ = sst2_batch
    attach(minilm_cls, "hydra", lora_dropout=0.1, target_modules=QV)
    _randomise(minilm_cls)
    before = _logits(minilm_cls, batch)
    with pytest.raises(CotuneError, match="not mergeable"):
        merge(minilm_cls)
    assert torch.equal(_logits(minilm_cls, batch), before)
    ad = _one_adapter(minilm_cls).train()
    u = _hidden(minilm_cls, batch)
    assert ad.stochastic
    with torch.no_grad():
        assert torch.equal(ad(u, seed=3), ad(u, seed=3))
        assert not torch.equal(ad(u, seed=3), ad(u, seed=4))


# --- save / load of both families ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("family", "options"),
    [
        ("cola", {"strategy": "heuristic", "num_A": 2, "num_B": 5}),
        ("cola", {"init": "lora", "strategy": "random"}),
        ("hydra", {"num_B": 3}),
    ],
)
def test_save_load_roundtrip(minilm_cls, sst2_batch, tmp_path, family, options):
    batch, _ = sst2_batch
    attach(minilm_cls, family, target_modules=QV, **options)
    _randomise(minilm_cls)
    want = _logits(minilm_cls, batch)
    save_adapter(minilm_cls, tmp_path / "ad")
    fresh = _fresh()
    load_adapter(fresh, tmp_path / "ad")
    assert torch.equal(_logits(fresh, batch), want)
    ad = _one_adapter(fresh)
    assert all(getattr(ad.config, k) == v for k, v in options.items())


# --- bad input ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("family", "options", "message"),
    [
        ("cola", {"r": 0}, "r >= 1"),
        ("cola", {"num_A": 0}, "num_A >= 1"),
        ("cola", {"num_B": -2}, "num_B >= 1"),
        ("cola", {"strategy": "greedy"}, "valid: full, random, heuristic"),
        ("cola", {"init": "gaussian"}, "valid: pissa, lora, pissa_perturbed"),
        ("cola", {"lora_dropout": 1.0}, r"\[0, 1\)"),
        ("hydra", {"r": 0}, "r >= 1"),
        ("hydra", {"num_B": 0}, "num_B >= 1"),
    ],
)
def test_bad_options(family, options, message):
    with pytest.raises(CotuneError, match=message):
        make_config(family, **options)


def test_pissa_needs_a_matrix_weight_and_rank_bound(minilm_cls):
    with pytest.raises(CotuneError, match="2-D weight"):
        attach(minilm_cls, "cola", target_modules=["bert.embeddings.LayerNorm"])
    with pytest.raises(CotuneError, match="exceeds the rank bound"):
        attach(minilm_cls, "cola", r=3, target_modules=["classifier"])  # 2x384 head
    assert not sites(minilm_cls)


def test_pissa_on_gpt2_conv1d_layers(sst2_batch):
    """GPT-2 stores Conv1D weights as (d_in, d_out): PiSSA, merge and restore must transpose correctly."""
    import transformers

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=30522, n_positions=128)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    ids = sst2_batch[0]["input_ids"]
    pristine = {k: v.detach().clone() for k, v in model.named_parameters()}
    with torch.no_grad():
        want = model(input_ids=ids).logits
    attach(model, "cola")  # default for gpt2: c_attn, attn.c_proj (square), mlp.c_fc, mlp.c_proj
    assert len(sites(model)) == 8
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, want, rtol=0, atol=1e-4)
    _randomise(model)
    with torch.no_grad():
        unmerged = model(input_ids=ids).logits
        merge(model)
        torch.testing.assert_close(model(input_ids=ids).logits, unmerged, rtol=0, atol=1e-4)
    detach(model, "default")  # unmerges, then restores the pristine Conv1D weights
    assert all(torch.equal(v, pristine[k]) for k, v in model.named_parameters())
