"""BackpropEngine against update formulas written out here, on MiniLM with real SST-2 sentences."""

from __future__ import annotations

import pytest
import torch

from cotune.adapters import attach, make_config, trainable_parameters
from cotune.engines import OptimConfig, make_engine
from cotune.errors import CotuneError


def loss_fn(model, batch):
    return model(**batch[0], labels=batch[1]).loss


@pytest.fixture
def model(minilm_cls):
    attach(minilm_cls, [make_config("lowrank", target_modules=["query"]), make_config("full")])
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # B = 0 at init would give A no gradient; randomise so every tensor moves
        for p in trainable_parameters(minilm_cls).values():
            p.add_(0.02 * torch.randn(p.shape, generator=gen))
    return minilm_cls


def grads(model, batches):
    """Plain autograd: the gradient of each batch's loss, then cleared."""
    params = trainable_parameters(model)
    out = []
    for b in batches:
        loss_fn(model, b).backward()
        out.append({k: p.grad.clone() for k, p in params.items()})
        for p in params.values():
            p.grad = None
    return out


def snapshot(model):
    return {k: v.detach().clone() for k, v in trainable_parameters(model).items()}


def test_sgd_step_with_clipping_is_the_formula(model, sst2_batch):
    theta0, (g,) = snapshot(model), grads(model, [sst2_batch])
    norm = torch.sqrt(sum((v.double() ** 2).sum() for v in g.values()))
    clip = 1e-3
    assert norm > clip  # the clipping is active
    eng = make_engine("backprop", model, OptimConfig(optimizer="sgd", lr=0.5, max_grad_norm=clip))
    res = eng.step(loss_fn, sst2_batch)
    assert res.updated and res.stats["grad_norm"] == pytest.approx(float(norm), rel=1e-5)
    for k, p in trainable_parameters(model).items():
        expected = theta0[k].double() - 0.5 * g[k].double() * clip / norm
        assert torch.allclose(p.double(), expected, rtol=0, atol=1e-7), k


def test_adamw_first_step_decays_weights_but_not_biases(model, sst2_batch):
    """Adam's first step is ``lr·g/(|g|+eps)``; AdamW also shrinks weights by ``lr·wd`` — not biases/norms."""
    theta0, (g,) = snapshot(model), grads(model, [sst2_batch])
    lr, wd, eps = 1e-2, 0.1, 1e-8
    eng = make_engine("backprop", model, OptimConfig(optimizer="adamw", lr=lr, weight_decay=wd, eps=eps))
    eng.step(loss_fn, sst2_batch)
    for k, p in trainable_parameters(model).items():
        decay = 0.0 if k.endswith("bias") else wd
        expected = theta0[k].double() * (1 - lr * decay) - lr * g[k].double() / (g[k].double().abs() + eps)
        assert torch.allclose(p.double(), expected, rtol=0, atol=1e-6), k
    assert "classifier.bias" in trainable_parameters(model)


def test_gradient_accumulation_steps_on_the_mean(model, sst2_batch):
    enc, y = sst2_batch
    halves = [({k: v[:4] for k, v in enc.items()}, y[:4]), ({k: v[4:] for k, v in enc.items()}, y[4:])]
    theta0, (g1, g2) = snapshot(model), grads(model, halves)
    eng = make_engine("backprop", model, OptimConfig(optimizer="sgd", lr=0.1), grad_accum=2)
    assert not eng.step(loss_fn, halves[0]).updated
    assert eng.step(loss_fn, halves[1]).updated
    for k, p in trainable_parameters(model).items():
        assert torch.allclose(p, theta0[k] - 0.1 * (g1[k] + g2[k]) / 2, rtol=0, atol=1e-7), k


def test_state_dict_resumes_the_same_trajectory(model, sst2_batch):
    cfg = OptimConfig(optimizer="adamw", lr=1e-3, scheduler="linear", total_steps=4)
    theta0 = snapshot(model)
    eng = make_engine("backprop", model, cfg)
    for _ in range(4):
        eng.step(loss_fn, sst2_batch)
    straight = snapshot(model)
    with torch.no_grad():
        for k, p in trainable_parameters(model).items():
            p.copy_(theta0[k])
    first = make_engine("backprop", model, cfg)
    for _ in range(2):
        first.step(loss_fn, sst2_batch)
    resumed = make_engine("backprop", model, cfg)
    resumed.load_state_dict(first.state_dict())
    for _ in range(2):
        res = resumed.step(loss_fn, sst2_batch)
    assert res.stats["lr"] == 0.0  # the linear schedule resumed at step 2 of 4
    for k, v in snapshot(model).items():
        assert torch.equal(v, straight[k]), k


def test_no_adapter_is_a_clear_error(minilm_cls):
    with pytest.raises(CotuneError, match="no adapter set to train"):
        make_engine("backprop", minilm_cls, OptimConfig())
    with pytest.raises(CotuneError, match="grad_accum must be >= 1"):
        make_engine("backprop", minilm_cls, OptimConfig(), grad_accum=0)
