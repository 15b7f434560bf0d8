"""MeZO (ZerothOrderEngine) against the update formula computed here, on MiniLM and real SST-2 sentences.

The reference builds ``θ ± εz`` out of place from a saved copy of ``θ`` (the engine perturbs in place
and never stores ``θ`` or ``z``), evaluates the two losses with plain forwards, and applies
``θ ← θ − lr·((1/n)Σ g_k z_k + wd·θ)`` with no decay on biases.
"""

from __future__ import annotations

import math
import random

import pytest
import torch

from cotune.adapters import attach, make_config, trainable_parameters
from cotune.engines import OptimConfig, make_engine
from cotune.engines.base import no_decay
from cotune.engines.zeroth_order import zo_direction
from cotune.errors import CotuneError

EPS = 1e-3


def loss_fn(model, batch):
    assert torch.is_inference_mode_enabled()  # MeZO's forwards keep no activations for backward
    return model(**batch[0], labels=batch[1]).loss


@pytest.fixture
def model(minilm_cls):
    attach(minilm_cls, [make_config("lowrank", target_modules=["query"]), make_config("full")])
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in trainable_parameters(minilm_cls).values():
            p.add_(0.02 * torch.randn(p.shape, generator=gen))
    return minilm_cls


def set_params(model, values):
    with torch.no_grad():
        for k, p in trainable_parameters(model).items():
            p.copy_(values[k])


def reference_step(model, batch, seeds, lr, wd):
    """The MeZO update for direction seeds ``seeds``, computed out of place in float64 where it matters."""
    params = trainable_parameters(model)
    theta = {k: p.detach().clone() for k, p in params.items()}
    zs = [{k: zo_direction(s, i, p) for i, (k, p) in enumerate(params.items())} for s in seeds]
    gs = []
    for z in zs:
        losses = []
        for sign in (1, -1):
            set_params(model, {k: theta[k] + sign * EPS * z[k] for k in theta})
            with torch.no_grad():
                losses.append(float(model(**batch[0], labels=batch[1]).loss))
        gs.append((losses[0] - losses[1]) / (2 * EPS))
    set_params(model, theta)
    new = {}
    for k, p in params.items():
        decay = 0.0 if no_decay(k, p) else wd
        step = sum(g * z[k].double() for g, z in zip(gs, zs)) / len(zs) + decay * theta[k].double()
        new[k] = theta[k].double() - lr * step
    return new, gs


@pytest.mark.parametrize("n", [1, 2])
def test_mezo_update_is_the_formula(model, sst2_batch, n):
    lr, wd = 1e-2, 0.1
    rng = random.Random(7)  # the engine's seed stream for seed=7
    seeds = [rng.getrandbits(62) for _ in range(n)]
    theta0 = {k: v.detach().clone().double() for k, v in trainable_parameters(model).items()}
    expected, gs = reference_step(model, sst2_batch, seeds, lr, wd)
    eng = make_engine("zo", model, OptimConfig(lr=lr, weight_decay=wd), eps=EPS, n_directions=n, seed=7)
    res = eng.step(loss_fn, sst2_batch)
    assert res.updated
    for k in range(n):
        assert res.stats[f"projected_grad_{k}"] == pytest.approx(gs[k], rel=1e-3, abs=1e-4)
    for k, p in trainable_parameters(model).items():
        # fp32 in-place perturb/restore rounds θ by ~1 ulp; the update itself (~lr·g·z) is far larger.
        assert torch.allclose(p.detach().double(), expected[k], rtol=0, atol=2e-6), k
    assert max(float((expected[k] - theta0[k]).abs().max()) for k in theta0) > 1e-4


def test_zero_lr_restores_the_weights(model, sst2_batch):
    before = {k: v.detach().clone() for k, v in trainable_parameters(model).items()}
    eng = make_engine("zo", model, OptimConfig(lr=0.0), eps=1e-2)
    eng.step(loss_fn, sst2_batch)
    for k, p in trainable_parameters(model).items():
        assert torch.allclose(p, before[k], rtol=0, atol=1e-6), k


def test_zo_adam_writes_g_z_into_grad(model, sst2_batch):
    """zo_optimizer='adam': AdamW on ``.grad = g·z``; its first step is ``lr·sign-like(g·z)`` plus decay."""
    lr, wd, eps_adam = 1e-3, 0.01, 1e-8
    seed = random.Random(3).getrandbits(62)
    params = trainable_parameters(model)
    theta = {k: p.detach().clone() for k, p in params.items()}
    _, (g,) = reference_step(model, sst2_batch, [seed], 0.0, 0.0)
    eng = make_engine("zo", model, OptimConfig(lr=lr, weight_decay=wd), eps=EPS, zo_optimizer="adam", seed=3)
    eng.step(loss_fn, sst2_batch)
    for i, (k, p) in enumerate(params.items()):
        grad = g * zo_direction(seed, i, p).double()
        decay = 0.0 if no_decay(k, p) else wd
        expected = theta[k].double() * (1 - lr * decay) - lr * grad / (grad.abs() + eps_adam)
        assert torch.allclose(p.double(), expected, rtol=0, atol=5e-6), k


def test_directions_are_reproducible_per_tensor():
    p = torch.empty(3, 5)
    assert torch.equal(zo_direction(11, 2, p), zo_direction(11, 2, p))
    assert not torch.equal(zo_direction(11, 2, p), zo_direction(11, 3, p))
    assert not torch.equal(zo_direction(11, 2, p), zo_direction(12, 2, p))
    z = zo_direction(5, 0, torch.empty(20000))
    assert abs(float(z.mean())) < 0.03 and abs(float(z.std()) - 1) < 0.03


def test_nan_loss_is_skipped_then_stops(model, sst2_batch):
    before = {k: v.detach().clone() for k, v in trainable_parameters(model).items()}
    eng = make_engine("zo", model, OptimConfig(lr=1e-2), max_bad_steps=2)
    res = eng.step(lambda m, b: loss_fn(m, b) * math.nan, sst2_batch)
    assert res.skipped and not res.updated
    for k, p in trainable_parameters(model).items():
        assert torch.allclose(p, before[k], rtol=0, atol=1e-6)
    with pytest.raises(CotuneError, match="2 steps in a row"):
        eng.step(lambda m, b: loss_fn(m, b) * math.inf, sst2_batch)


def test_bad_options_are_clear_errors(model):
    with pytest.raises(CotuneError, match="zo_optimizer"):
        make_engine("zo", model, OptimConfig(), zo_optimizer="lbfgs")
    with pytest.raises(CotuneError, match="eps must be > 0"):
        make_engine("zo", model, OptimConfig(), eps=0)
