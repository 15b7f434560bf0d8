"""Gradient learning (ColA) against its reference, backprop, on MiniLM and real SST-2 sentences.

Every check trains from the same randomised adapter weights with ``BackpropEngine`` (autograd through the
whole model) and with ``GradientLearningEngine`` (no trainable parameter on the server; a fitter fed
``(u, δ)``), then compares the weights. Also: placements, update interval vs an accumulation written
here, merged mode, the bf16 wire, the sufficient statistic, dead/hung fitters, NaN handling and pairing
of a module called twice.
"""

from __future__ import annotations

import copy
import os
import random
import signal
import time

import pytest
import torch
from torch import nn

from cotune.adapters import adapters, attach, families, make_config, sites, trainable_parameters
from cotune.adapters.attach import copy_adapter_weights
from cotune.adapters.site import AdaptedModule
from cotune.commands.verify import family_configs
from cotune.engines import OptimConfig, make_engine
from cotune.engines.gradient_learning import (
    Capture,
    Fitter,
    GradientLearningEngine,
    Pair,
    Wire,
    affine_in_u,
    private_copies,
)
from cotune.errors import CotuneError

SGD = OptimConfig(optimizer="sgd", lr=0.05)
ADAMW = OptimConfig(optimizer="adamw", lr=1e-3, weight_decay=0.01)


def loss_fn(model, batch):
    return model(**batch[0], labels=batch[1]).loss


@pytest.fixture(scope="module")
def base():
    from cotune.models import load_model

    torch.manual_seed(0)
    return load_model("minilm", "seq_cls", num_labels=2).eval()


@pytest.fixture(scope="module")
def data(shared_data, minilm_tokenizer):
    """Two micro-batches of four real SST-2 dev sentences."""
    rows = (shared_data / "glue" / "SST-2" / "dev.tsv").read_text().splitlines()[1:9]
    out = []
    for chunk in (rows[:4], rows[4:]):
        sents, labels = zip(*(r.rsplit("\t", 1) for r in chunk))
        enc = minilm_tokenizer(list(sents), return_tensors="pt", padding=True, truncation=True, max_length=24)
        out.append((dict(enc), torch.tensor([int(y) for y in labels])))
    return out


def prepared(base, configs, name="default", noise=0.02):
    """A copy of ``base`` with ``configs`` attached; weights randomised so every parameter has a gradient."""
    model = copy.deepcopy(base)
    torch.manual_seed(0)
    attach(model, configs, name=name)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in trainable_parameters(model, name).values():
            p.add_(noise * torch.randn(p.shape, generator=gen))
    return model


def weights(model, name=None):
    return {k: v.detach().clone() for k, v in trainable_parameters(model, name).items()}


def train(model, engine, optim, data, steps, seed=0, loss=loss_fn, **opts):
    """Weights after ``steps`` micro-batches from the model's current weights (restored afterwards)."""
    init = weights(model)
    random.seed(seed)
    torch.manual_seed(seed)
    eng = make_engine(engine, model, optim, **opts)
    try:
        results = [eng.step(loss, data[i % len(data)]) for i in range(steps)]
    finally:
        eng.close()
    out = weights(model)
    copy_adapter_weights(model, init)
    return out, results


def rel(a, b):
    """max over tensors of max|a − b| / max|b|."""
    return max(float((a[k] - b[k]).abs().max() / b[k].abs().max().clamp_min(1e-30)) for k in b)


# -- equality with backprop ---------------------------------------------------------------------------
@pytest.mark.parametrize("family", families())
def test_every_family_equals_backprop(base, data, family):
    """3 AdamW steps, adapters in training mode (stochastic draws replayed from the server's seeds)."""
    model = prepared(base, family_configs(family, base))
    for ad in adapters(model).values():
        ad.train()
    bp, _ = train(model, "backprop", ADAMW, data, 3)
    gl, res = train(model, "gl", ADAMW, data, 3, sufficient_statistic="off")
    assert all(r.updated and not r.skipped for r in res)
    assert rel(gl, bp) <= 1e-5
    assert any(not torch.equal(bp[k], weights(model)[k]) for k in bp)  # training moved the weights


def test_lowrank_and_head_multistep_sgd_and_adamw(base, data):
    model = prepared(base, family_configs("lowrank", base) + family_configs("full", base))
    for optim in (SGD, ADAMW):
        bp, _ = train(model, "backprop", optim, data, 6)
        gl, _ = train(model, "gl", optim, data, 6)  # default wire: statistic where smaller
        assert rel(gl, bp) <= 1e-5


def test_dropout_seeds_are_replayed(base, data):
    model = prepared(base, make_config("lowrank", lora_dropout=0.3))
    model.train()
    bp, _ = train(model, "backprop", SGD, data, 3)
    gl, _ = train(model, "gl", SGD, data, 3)
    assert rel(gl, bp) == 0.0
    other, _ = train(model, "gl", SGD, data, 3, seed=1)  # other masks: a different trajectory
    assert rel(other, bp) > 1e-4


def test_placements_agree(base, data):
    model = prepared(base, family_configs("lowrank", base) + family_configs("full", base))
    ref, _ = train(model, "gl", ADAMW, data, 3, placement="inline", sufficient_statistic="off")
    for placement in ("thread", "process"):
        got, _ = train(model, "gl", ADAMW, data, 3, placement=placement, sufficient_statistic="off")
        assert rel(got, ref) == 0.0, placement
    bp, _ = train(model, "backprop", ADAMW, data, 3)
    assert rel(ref, bp) <= 1e-5


@pytest.mark.ray
def test_ray_placement_agrees(base, data, monkeypatch):
    ray = pytest.importorskip("ray")
    monkeypatch.setenv("RAY_worker_niceness", "0")  # as RayFitter does for the cluster it starts itself
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        model = prepared(base, family_configs("lowrank", base))
        ref, _ = train(model, "gl", SGD, data, 2, placement="inline")
        got, _ = train(model, "gl", SGD, data, 2, placement="ray")
        assert rel(got, ref) == 0.0
        # In float64 with AdamW and the default wire, the actor's adapter equals backprop's to 1e-10 of the update.
        model64 = model.double()
        init = weights(model64)
        bp, _ = train(model64, "backprop", ADAMW, data, 3)
        got, _ = train(model64, "gl", ADAMW, data, 3, placement="ray")
        assert max(float((got[k] - bp[k]).abs().max() / (bp[k] - init[k]).abs().max()) for k in bp) <= 1e-10
    finally:
        ray.shutdown()


def test_interval_is_the_mean_over_micro_batches(base, data):
    """I = 2 equals one SGD step on the mean of the two micro-batches' gradients, computed here by autograd."""
    model = prepared(base, family_configs("lowrank", base))
    init = weights(model)
    params = trainable_parameters(model)
    for b in data:
        loss_fn(model, b).backward()
    expected = {k: init[k] - SGD.lr * p.grad / 2 for k, p in params.items()}
    for p in params.values():
        p.grad = None
    gl, res = train(model, "gl", SGD, data, 2, interval=2)
    assert [r.updated for r in res] == [False, True]
    assert rel(gl, expected) <= 1e-6
    bp, _ = train(model, "backprop", ADAMW, data, 4, grad_accum=2)
    gl, _ = train(model, "gl", ADAMW, data, 4, interval=2, sufficient_statistic="off")
    assert rel(gl, bp) == 0.0


def test_merged_equals_unmerged_and_refreshes_without_drift(base, data):
    model = prepared(base, family_configs("lowrank", base))
    pristine = {p: s.base.weight.detach().clone() for p, s in sites(model).items()}
    unmerged, _ = train(model, "gl", SGD, data, 4)
    eng = GradientLearningEngine(model, SGD, merged=True)
    for i in range(4):
        eng.step(loss_fn, data[i % 2])
    for path, site in sites(model).items():  # the base holds W + s·B·A of the *current* adapter
        expected = pristine[path] + site.adapters["default"].delta_weight()
        assert torch.allclose(site.base.weight, expected, rtol=0, atol=1e-6)
    merged = weights(model)
    eng.close()
    for path, site in sites(model).items():  # close() unmerges bit for bit
        assert torch.equal(site.base.weight, pristine[path]) and site.merged is None
    assert rel(merged, unmerged) <= 1e-5


def test_merged_needs_a_mergeable_family(base):
    model = prepared(base, family_configs("mlp", base))
    with pytest.raises(CotuneError, match="merged=True.*not mergeable"):
        GradientLearningEngine(model, SGD, merged=True)
    assert all(p.requires_grad for p in trainable_parameters(model).values())
    assert all(s.merged is None and not s.taps for s in sites(model).values())


# -- the wire -----------------------------------------------------------------------------------------
def captured(model, batch):
    """The (u, δ) records of one forward/backward with the adapters frozen, as the engine captures them."""
    ads = adapters(model)
    for ad in ads.values():
        ad.requires_grad_(False)
    records = []
    cap = Capture(model, on_delta=records.append)
    cap.install()
    cap.begin()
    loss_fn(model, batch).backward()
    cap.end()
    cap.remove()
    for ad in ads.values():
        ad.requires_grad_(True)
    return records


def fitter_grads(model, records, wire):
    """The gradients a fitter accumulates from ``records`` sent through ``wire``."""
    ads = adapters(model)
    fitter = Fitter(private_copies(ads, "cpu"), SGD)
    for r in records:
        fitter.add(wire.pack(r, ads[r.path]))
    return {k: p.grad.clone() for k, p in fitter.named.items()}


def fp64_grads(model, records):
    """Reference: ``s·J_gᵀδ`` of every record in float64, straight from the adapter's own forward."""
    out = {}
    for r in records:
        ad = copy.deepcopy(adapters(model)[r.path]).double().requires_grad_(True)
        (ad.scaling * ad(r.u.double())).backward(r.delta.double())
        for k, p in ad.named_parameters():
            out[f"{r.path}.{k}"] = out.get(f"{r.path}.{k}", 0) + p.grad
    return out


def test_bf16_wire_halves_traffic_within_bf16_precision(base, data):
    model = prepared(base, family_configs("lowrank", base))
    records = captured(model, data[0])
    ref = fp64_grads(model, records)
    wire32, wire16 = Wire("fp32", mode="off"), Wire("bf16", mode="off")
    g32 = fitter_grads(model, records, wire32)
    g16 = fitter_grads(model, records, wire16)
    assert rel(g32, ref) < 1e-5
    assert 1e-4 < rel(g16, ref) < 2e-2  # bf16 rounding (8 mantissa bits), not garbage
    assert wire16.bytes * 2 == wire32.bytes == wire32.pair_bytes_fp32
    # End to end, bf16 training stays close to fp32 training.
    fp32, _ = train(model, "gl", SGD, data, 2, sufficient_statistic="off")
    bf16, r16 = train(model, "gl", SGD, data, 2, sufficient_statistic="off", wire_dtype="bf16")
    assert rel(bf16, fp32) < 1e-4 and r16[0].stats["wire_bytes"] > 0


def test_sufficient_statistic_equals_raw_pairs(base, data):
    model = prepared(base, family_configs("lowrank", base))
    assert all(affine_in_u(ad) for ad in adapters(model).values())
    assert not any(affine_in_u(ad) for ad in adapters(prepared(base, family_configs("mlp", base))).values())
    records = captured(model, data[0])
    ref = fp64_grads(model, records)
    statistic = {p: True for p in adapters(model)}
    pairs_wire, stat_wire = Wire(mode="off"), Wire(statistic=statistic, mode="always")
    assert rel(fitter_grads(model, records, pairs_wire), ref) < 1e-5
    assert rel(fitter_grads(model, records, stat_wire), ref) < 1e-5
    assert stat_wire.statistics == 12 and stat_wire.pairs == 0
    tokens = data[0][0]["input_ids"].numel()
    assert stat_wire.bytes == 12 * 4 * (384 * 384 + 384)
    assert pairs_wire.bytes == 12 * 4 * tokens * (384 + 384)
    # "auto" ships whichever is smaller: 4 rows x <= 24 tokens is smaller than a 384x384 statistic.
    _, ra = train(model, "gl", SGD, data, 1)
    assert ra[0].stats["pairs"] == 12 and ra[0].stats["statistics"] == 0
    stat, _ = train(model, "gl", SGD, data, 3, sufficient_statistic="always")
    pairs, _ = train(model, "gl", SGD, data, 3, sufficient_statistic="off")
    assert rel(stat, pairs) <= 1e-6


# -- failures -----------------------------------------------------------------------------------------
def test_killed_worker_is_reported_within_seconds(base, data):
    model = prepared(base, family_configs("lowrank", base))
    eng = GradientLearningEngine(model, SGD, placement="process", timeout_s=60)
    try:
        eng.step(loss_fn, data[0])  # the worker is up and working
        os.kill(eng.fitter.process.pid, signal.SIGKILL)
        eng.fitter.process.join(10)
        t0 = time.monotonic()
        with pytest.raises(CotuneError, match=r"fitter 'default' \(process\).*(died|not running).*signal"):
            eng.step(loss_fn, data[1])
        assert time.monotonic() - t0 < 10
    finally:
        eng.close()


def test_hung_fitter_times_out(base, data, monkeypatch):
    model = prepared(base, family_configs("lowrank", base))
    eng = GradientLearningEngine(model, SGD, placement="thread", timeout_s=1.0)
    monkeypatch.setattr(eng.fitter.fitter, "step", lambda: time.sleep(30))
    t0 = time.monotonic()
    with pytest.raises(CotuneError, match="did not answer 'step' within timeout_s=1"):
        eng.step(loss_fn, data[0])
    assert time.monotonic() - t0 < 5
    eng.close()


def test_nan_loss_and_nan_delta_are_skipped_then_stop(base, data, caplog):
    model = prepared(base, family_configs("lowrank", base))
    init = weights(model)

    def nan_loss(m, b):
        return loss_fn(m, b) * float("nan")

    def nan_delta(m, b):  # a finite loss whose gradient is NaN: 0 · d sqrt(x)/dx at x = 0
        out = m(**b[0], labels=b[1])
        return out.loss + 0.0 * torch.sqrt(out.logits - out.logits.detach()).sum()

    for engine in ("gl", "backprop"):
        eng = make_engine(engine, model, SGD, max_bad_steps=3)
        r1 = eng.step(nan_loss, data[0])
        r2 = eng.step(nan_delta, data[0])
        assert r1.skipped and r2.skipped and not r2.updated
        assert rel(weights(model), init) == 0.0
        assert eng.step(loss_fn, data[0]).updated  # a good step resets the count
        eng.step(nan_loss, data[0])
        eng.step(nan_delta, data[0])
        with pytest.raises(CotuneError, match="3 steps in a row had a non-finite"):
            eng.step(nan_loss, data[0])
        eng.close()
        copy_adapter_weights(model, init)
    assert "skipped a step" in caplog.text


def test_pair_of_wrong_shape_names_the_site(base):
    model = prepared(base, family_configs("lowrank", base))
    path = "bert.encoder.layer.0.attention.self.query"
    fitter = Fitter(private_copies(adapters(model), None), SGD)
    with pytest.raises(CotuneError, match=f"site '{path}'.*width 100.*reads width 384"):
        fitter.add(Pair(path, 0, torch.zeros(2, 5, 100), torch.zeros(2, 5, 384)))
    with pytest.raises(CotuneError, match=f"site '{path}'.*δ has shape"):
        fitter.add(Pair(path, 0, torch.zeros(2, 5, 384), torch.zeros(2, 4, 384)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_lowrank_closed_form_equals_autograd_bit_for_bit(base, dtype):
    """The fitter's closed-form low-rank VJP gives autograd's gradient bit for bit, and accumulates."""
    model = prepared(base, make_config("lowrank", r=4, lora_alpha=16), noise=0.1).to(dtype)
    path = "bert.encoder.layer.0.attention.self.query"
    fitter = Fitter(private_copies(adapters(model), None), SGD)
    ad = fitter.adapters[path]
    assert ad.lowrank_factors() is not None  # the closed form's condition: else this test proves nothing
    gen = torch.Generator().manual_seed(0)
    calls = [(torch.randn(2, 5, 384, generator=gen, dtype=dtype), torch.randn(2, 5, 384, generator=gen, dtype=dtype))
             for _ in range(2)]
    for u, d in calls:
        fitter.add(Pair(path, 0, u, d, training=True))
    closed = {k: p.grad.clone() for k, p in ad.named_parameters()}
    reference = copy.deepcopy(ad).requires_grad_(True)
    for p in reference.parameters():
        p.grad = None
    for u, d in calls:
        AdaptedModule.delta(reference, u).backward(d)
    for k, p in reference.named_parameters():
        assert p.grad.dtype == dtype and torch.equal(closed[k], p.grad), k


# -- a module called twice ----------------------------------------------------------------------------
class TwiceNet(nn.Module):
    """``y = W2·tanh(W1·tanh(W1·x))``: the tied ``shared`` layer runs twice per forward."""

    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Linear(8, 8)
        self.out = nn.Linear(8, 3)

    def forward(self, x, checkpoint=None):
        h = torch.tanh(self.shared(x))

        def second(t):
            return torch.tanh(self.shared(t))  # tanh saves its output: checkpointing must recompute it

        if checkpoint == "reentrant":
            h = torch.utils.checkpoint.checkpoint(second, h, use_reentrant=True)
        elif checkpoint == "recompute":
            h = torch.utils.checkpoint.checkpoint(second, h, use_reentrant=False)
        else:
            h = second(h)
        return self.out(h)


def twice_loss(model, batch):
    x, y, ckpt = batch
    return nn.functional.cross_entropy(model(x, ckpt), y)


def test_module_called_twice_is_paired_by_call():
    torch.manual_seed(0)
    model = TwiceNet()
    attach(model, "lowrank", target_modules=["shared"], r=2)
    with torch.no_grad():
        for p in trainable_parameters(model).values():
            p.normal_(0, 0.3)
    x, y = torch.randn(5, 7, 8), torch.randint(0, 3, (5,))
    batch = (x.mean(1), y, None)
    # The records: two calls of one site, each u the input of that call.
    records = []
    cap = Capture(model, on_delta=records.append)
    cap.install()
    cap.begin()
    twice_loss(model, batch).backward()
    cap.end()
    cap.remove()
    assert sorted(r.call for r in records) == [0, 1]
    first = next(r for r in records if r.call == 0)
    assert torch.equal(first.u, batch[0])
    # The update equals backprop's (which sums the two calls' gradients).
    init = weights(model)
    bp, _ = train(model, "backprop", SGD, [batch], 2, loss=twice_loss)
    gl, _ = train(model, "gl", SGD, [batch], 2, loss=twice_loss)
    assert rel(gl, bp) <= 1e-6 and rel(bp, init) > 1e-3


@pytest.mark.parametrize("mode", ["reentrant", "recompute"])
def test_activation_checkpointing_is_refused(mode):
    torch.manual_seed(0)
    model = TwiceNet()
    attach(model, "lowrank", target_modules=["shared"], r=2)
    eng = GradientLearningEngine(model, SGD, placement="inline")
    batch = (torch.randn(4, 8), torch.randint(0, 3, (4,)), mode)
    with pytest.raises(CotuneError, match="checkpointing"):
        eng.step(twice_loss, batch)
    eng.close()
