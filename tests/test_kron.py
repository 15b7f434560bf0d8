"""kron (AdaKron) and MAdaKron: the Kronecker formula, the mixture's draws and expectation, placement on a
real MiniLM, save/load, the consistency loss, and clear errors."""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch

from cotune.adapters import attach, load_adapter, make_config, merge, save_adapter, sites
from cotune.adapters.families.kron import Kron, consistency_loss
from cotune.errors import CotuneError


def gelu_ref(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def kron_ref(u, w2, b2, w1, b1, wb, bb):
    """Direct formula, token by token: z[i·r/4 + j] = a_i v_j, g = W_B GELU(z) + b_B."""
    flat = u.reshape(-1, u.shape[-1]).double()
    out = []
    for x in flat:
        a = w2.double() @ x + b2.double()
        v = w1.double() @ x + b1.double()
        z = torch.stack([a[i] * v[j] for i in range(a.numel()) for j in range(v.numel())])
        out.append(wb.double() @ gelu_ref(z) + bb.double())
    return torch.stack(out).reshape(*u.shape[:-1], -1)


def make_kron(d: int = 24, r: int = 8, **kw) -> Kron:
    torch.manual_seed(0)
    ad = Kron(make_config("kron", r=r, **kw), d, d)
    with torch.no_grad():  # non-zero biases so the bias paths are checked too
        for name, p in ad.named_parameters():
            # biases N(0, 0.5); weights x20 to make GELU non-trivial (std 0.4 instead of 0.02)
            p.normal_(0, 0.5) if "bias" in name else p.mul_(20)
    return ad


def test_kron_forward_equals_outer_product_formula():
    ad = make_kron().eval()
    u = torch.randn(2, 3, 24)
    want = kron_ref(
        u, ad.down_a.weight[0], ad.down_a.bias[0], ad.down_v.weight[0], ad.down_v.bias[0], ad.up.weight, ad.up.bias
    )
    torch.testing.assert_close(ad(u).double(), want, rtol=1e-5, atol=1e-6)
    assert ad.site == "sequential" and ad.scaling == 1.0 and not ad.stochastic


def test_kron_init_follows_design():
    torch.manual_seed(1)
    ad = Kron(make_config("kron", r=48), 768, 768)
    for w in (ad.down_v.weight[0], ad.up.weight):  # 9,216 and 36,864 samples
        assert abs(w.std().item() - 0.02) < 0.02 * 0.05 and abs(w.mean().item()) < 1e-3
    for b in (ad.down_a.bias[0], ad.down_v.bias[0], ad.up.bias):
        assert torch.count_nonzero(b) == 0
    assert ad.num_parameters() == 49_936  # 768·4+4 + 768·12+12 + 48·768+768


@pytest.mark.parametrize("mixture", ["partial", "full"])
def test_mixture_starts_as_copies_computing_adakron_in_training_and_eval(mixture):
    """AdaMix deep-copies its expert, so MAdaKron's first step is AdaKron's: every draw, and the eval average,
    compute the plain adapter made from the same seed. Independent expert draws fail this."""
    torch.manual_seed(3)
    plain = Kron(make_config("kron", r=16), 32, 32)
    torch.manual_seed(3)
    mix = Kron(make_config("kron", r=16, mixture=mixture, num_experts=3), 32, 32)
    assert len(mix.down_a) == 3 and mix.down_a.stacked()[0].std() > 0.015
    plain, mix = plain.double(), mix.double()  # float64: the eval mean of three equal experts rounds at 1e-16
    u = torch.randn(4, 5, 32, dtype=torch.float64)
    with torch.no_grad():
        want = plain(u)
        torch.testing.assert_close(mix.eval()(u), want, rtol=1e-12, atol=1e-15)
        mix.train()
        assert {mix.draw(s)["down_a"] for s in range(20)} == {0, 1, 2}
        for seed in range(20):
            torch.testing.assert_close(mix(u, seed=seed), want, rtol=0, atol=0)


@pytest.mark.parametrize("mixture", ["partial", "full"])
def test_mixture_eval_equals_expectation_over_expert_pairs(mixture):
    ad = make_kron(mixture=mixture, num_experts=3).eval()
    ea, ev = len(ad.down_a), len(ad.down_v)
    assert (ea, ev) == ((3, 1) if mixture == "partial" else (3, 3))
    u = torch.randn(5, 24, dtype=torch.float64)
    zs = []
    for i, j in itertools.product(range(ea), range(ev)):  # every equally likely (a-expert, v-expert) pair
        a = u @ ad.down_a.weight[i].double().T + ad.down_a.bias[i].double()
        v = u @ ad.down_v.weight[j].double().T + ad.down_v.bias[j].double()
        zs.append((a[:, :, None] * v[:, None, :]).reshape(5, -1))
    want = gelu_ref(torch.stack(zs).mean(0)) @ ad.up.weight.double().T + ad.up.bias.double()
    torch.testing.assert_close(ad(u.float()).double(), want, rtol=1e-5, atol=1e-6)


def test_training_draws_one_expert_per_group_from_the_seed_only():
    ad = make_kron(mixture="full", num_experts=3).train()
    assert ad.stochastic
    u = torch.randn(4, 24)
    pair_out = {
        (i, j): kron_ref(
            u, ad.down_a.weight[i], ad.down_a.bias[i], ad.down_v.weight[j], ad.down_v.bias[j], ad.up.weight, ad.up.bias
        )
        for i, j in itertools.product(range(3), range(3))
    }
    seen = []
    for seed in range(60):
        rng = torch.get_rng_state()
        out = ad(u, seed=seed).double()
        assert torch.equal(rng, torch.get_rng_state()), "a seeded call must not touch the global RNG"
        hits = [p for p, ref in pair_out.items() if torch.allclose(out, ref, rtol=1e-5, atol=1e-6)]
        assert len(hits) == 1, f"seed {seed}: output matches {len(hits)} expert pairs, expected exactly one"
        picks = ad.draw(seed)
        assert hits[0] == (picks["down_a"], picks["down_v"])
        torch.manual_seed(seed + 1000)  # the global RNG must not matter: same seed, same draw
        assert torch.equal(ad(u, seed=seed), out.float())
        seen.append(hits[0])
    assert set(seen) == set(pair_out), "60 draws should visit all 9 expert pairs"
    assert {i for i, _ in seen} == {0, 1, 2} and {j for _, j in seen} == {0, 1, 2}


def test_partial_mixture_draws_only_the_four_dim_factor():
    ad = make_kron(mixture="partial", num_experts=2).train()
    assert set(ad.draw(3)) == {"down_a"} and len(ad.down_v) == 1
    u = torch.randn(4, 24)
    outs = {tuple(ad(u, seed=s).flatten()[:3].tolist()) for s in range(20)}
    assert len(outs) == 2  # two experts of the 4-dim factor, nothing else random
    assert not ad.eval().stochastic


def test_undrawn_experts_are_left_alone_by_adamw_as_in_adamix():
    """AdaMix keeps its experts in a ``ModuleList`` and calls only the drawn one, so an undrawn expert gets no
    gradient and AdamW skips it: no weight decay, no momentum step, no step count. The reference below is
    that structure (each expert its own ``nn.Linear``, a copy of one draw); six AdamW steps with weight decay
    must give the same weights, and an expert left out of step 1 must not move. A stacked (E, k, d) tensor
    fails this: its undrawn slice gets a zero gradient that AdamW still decays and moves by momentum."""
    torch.manual_seed(0)
    mix = Kron(make_config("kron", r=8, mixture="full", num_experts=2), 16, 16).double().train()
    downs = {
        g: torch.nn.ModuleList(torch.nn.Linear(16, f.weight[0].shape[0]).double() for _ in range(len(f)))
        for g, f in (("down_a", mix.down_a), ("down_v", mix.down_v))
    }
    up = torch.nn.Linear(8, 16).double()
    with torch.no_grad():
        for g, experts in downs.items():
            for e, lin in enumerate(experts):
                lin.weight.copy_(getattr(mix, g).weight[e])
                lin.bias.copy_(getattr(mix, g).bias[e])
        up.weight.copy_(mix.up.weight)
        up.bias.copy_(mix.up.bias)
    ref_params = [*downs["down_a"].parameters(), *downs["down_v"].parameters(), *up.parameters()]
    opt = torch.optim.AdamW(mix.parameters(), lr=0.05, weight_decay=0.1)
    ref_opt = torch.optim.AdamW(ref_params, lr=0.05, weight_decay=0.1)
    u = torch.randn(3, 16, dtype=torch.float64)
    # step 1 draws expert 0 in both groups (so expert 1 of each is left out); five more steps draw freely
    seeds = [next(s for s in range(40) if mix.draw(s) == {"down_a": 0, "down_v": 0}), *range(5)]
    for step, seed in enumerate(seeds):
        picks = mix.draw(seed)
        a, v = downs["down_a"][picks["down_a"]](u), downs["down_v"][picks["down_v"]](u)
        ref = up(torch.nn.functional.gelu((a[:, :, None] * v[:, None, :]).flatten(1)))
        ref.pow(2).sum().backward()
        mix(u, seed=seed).pow(2).sum().backward()
        if step == 0:
            assert mix.down_a.weight[1].grad is None and mix.down_v.bias[1].grad is None
            before = [t.detach().clone() for t in (mix.down_a.weight[1], mix.down_v.bias[1])]
        for o in (opt, ref_opt):
            o.step()
            o.zero_grad(set_to_none=True)
        if step == 0:
            assert torch.equal(before[0], mix.down_a.weight[1]) and torch.equal(before[1], mix.down_v.bias[1])
            assert not torch.equal(before[0], mix.down_a.weight[0])
    ours = [*mix.down_a.weight, *mix.down_a.bias, *mix.down_v.weight, *mix.down_v.bias, mix.up.weight, mix.up.bias]
    theirs = [*(lin.weight for lin in downs["down_a"]), *(lin.bias for lin in downs["down_a"]),
              *(lin.weight for lin in downs["down_v"]), *(lin.bias for lin in downs["down_v"]), up.weight, up.bias]
    assert len({tuple(mix.draw(s).values()) for s in seeds}) > 1  # both experts of a group were trained
    for x, y in zip(ours, theirs, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-14)


def test_kron_bad_input_is_a_clear_error():
    with pytest.raises(CotuneError, match="multiple of 4"):
        make_config("kron", r=10)
    with pytest.raises(CotuneError, match="unknown kron mixture"):
        make_config("kron", mixture="soup")
    with pytest.raises(CotuneError, match="needs a mixture"):
        make_config("kron", num_experts=4)


def test_consistency_loss_matches_symmetric_kl_with_stop_gradient():
    torch.manual_seed(0)
    l1 = torch.randn(6, 3, requires_grad=True)
    l2 = torch.randn(6, 3, requires_grad=True)
    loss = consistency_loss(l1, l2)
    p1, p2 = l1.softmax(-1).double(), l2.softmax(-1).double()
    kl = lambda p, q: (p * (p.log() - q.log())).sum(-1).mean()  # noqa: E731 - KL(p || q)
    torch.testing.assert_close(loss.double(), 0.5 * (kl(p2, p1) + kl(p1, p2)), rtol=1e-6, atol=1e-7)
    loss.backward()
    # With the targets detached, d/dlogits1 of ½KL(sg p2 || p1) is ½(p1 − p2)/B (and symmetrically).
    torch.testing.assert_close(l1.grad.double(), 0.5 * (p1 - p2) / 6, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(l2.grad.double(), 0.5 * (p2 - p1) / 6, rtol=1e-5, atol=1e-7)


def _ffn_outputs(model):
    return [n for n, _ in model.named_modules() if n.endswith("output.dense") and ".attention." not in n]


def test_kron_on_minilm_matches_hooks_roundtrips_and_refuses_merge(minilm_cls, sst2_batch, tmp_path):
    batch, _ = sst2_batch
    ref_model = copy.deepcopy(minilm_cls)
    model = attach(minilm_cls, "kron", r=16, mixture="full", num_experts=2)
    paths = sorted(sites(model))
    assert paths == sorted(_ffn_outputs(ref_model)) and len(paths) == 6  # not attention.output.dense
    torch.manual_seed(5)
    with torch.no_grad():
        for s in sites(model).values():
            for p in s.adapters["default"].parameters():
                p.normal_(0, 0.05)
    # Independent reference: the untouched model with forward hooks adding the formula's g(y) (eval: expert means).
    for path in paths:
        ad = sites(model)[path].adapters["default"]
        w = [
            t.detach()
            for t in (*(x.mean(0) for x in ad.down_a.stacked()), *(x.mean(0) for x in ad.down_v.stacked()))
        ]
        hook = lambda m, i, y, w=w, ad=ad: y + kron_ref(y, *w, ad.up.weight.detach(), ad.up.bias.detach()).float()  # noqa: E731
        ref_model.get_submodule(path).register_forward_hook(hook)
    model.eval()
    with torch.no_grad():
        out = model(**batch).logits
        torch.testing.assert_close(out, ref_model(**batch).logits, rtol=1e-4, atol=1e-5)
    save_adapter(model, tmp_path / "kron")
    fresh = copy.deepcopy(ref_model)
    for m in fresh.modules():
        m._forward_hooks.clear()
    load_adapter(fresh, tmp_path / "kron")
    with torch.no_grad():
        assert torch.equal(fresh.eval()(**batch).logits, out)
    with pytest.raises(CotuneError, match="not mergeable"):
        merge(model)


def test_site_seed_replays_the_servers_draw(minilm_cls, sst2_batch):
    """Gradient learning's contract: the seed the site hands to the tap reproduces the adapter's output."""
    batch, labels = sst2_batch
    model = attach(minilm_cls, "kron", r=8, mixture="full", num_experts=4).train()
    torch.manual_seed(5)
    with torch.no_grad():  # experts start as copies; set them apart, as training does, so draws differ
        for s in sites(model).values():
            for p in s.adapters["default"].parameters():
                p.add_(torch.randn_like(p) * 0.02)
    seen = []

    def tap(site, ad, u, h, seed):
        seen.append((ad, u.detach(), h.detach(), seed))
        return h

    for s in sites(model).values():
        s.taps["default"] = tap
    for _ in range(2):
        model(**batch)
    assert len(seen) == 12 and len({s for *_, s in seen}) == 12  # a fresh seed per call and per layer
    replays_other_seed = []
    for ad, u, h, seed in seen:
        assert torch.equal(u + ad.scaling * ad(u, seed=seed), h)  # bit for bit: the same draw, the same math
        replays_other_seed.append(torch.equal(u + ad(u, seed=seed + 1), h))
    assert not all(replays_other_seed), "another seed should draw other experts somewhere"


def test_gradient_learning_gradient_equals_backprop_with_replayed_draws(minilm_cls, sst2_batch):
    """Gradient learning's contract for MAdaKron: from the captured (u, δ, seed) alone, ∇ of ½‖g(u;w) − sg(g(u;w_t) − s·δ)‖² at
    w_t equals the backprop gradient — only because the fitter replays the server's expert draws."""
    batch, labels = sst2_batch
    model = attach(minilm_cls, "kron", r=8, mixture="full", num_experts=3).train()
    records = []

    def tap(site, ad, u, h, seed):
        rec = {"ad": ad, "u": u.detach(), "seed": seed}
        h.register_hook(lambda g, rec=rec: rec.__setitem__("delta", g.detach()))
        records.append(rec)
        return h

    for s in sites(model).values():
        s.taps["default"] = tap
    torch.nn.functional.cross_entropy(model(**batch).logits, labels).backward()
    params = [p for rec in records for p in rec["ad"].parameters()]
    backprop = [p.grad for p in params]

    def fitter_grads(seed_shift: int) -> list[torch.Tensor]:
        # The fitter works on its own copy in fp64: ℓ's target g − s·δ loses δ's low bits in fp32 (|δ| ≪ |g|).
        grads = []
        for rec in records:
            ad = copy.deepcopy(rec["ad"]).double()
            g = ad(rec["u"].double(), seed=rec["seed"] + seed_shift)
            target = (g - ad.scaling * rec["delta"].double()).detach()
            (0.5 * (g - target).square().sum()).backward()
            grads += [p.grad for p in ad.parameters()]
        return grads

    def same(got: torch.Tensor | None, want: torch.Tensor | None) -> bool:
        # An expert that was not drawn has no gradient (None) on both sides, as AdaMix's optimizer expects.
        if got is None or want is None:
            return got is want
        return torch.allclose(got.float(), want, rtol=1e-4, atol=1e-9)

    assert sum(g is None for g in backprop) > 0 and sum(g is not None for g in backprop) > len(records) * 2
    for got, want in zip(fitter_grads(0), backprop, strict=True):
        assert same(got, want)
    # Without the server's seed the fitter draws other experts, and the gradients no longer match.
    assert not all(same(got, want) for got, want in zip(fitter_grads(1), backprop, strict=True))
