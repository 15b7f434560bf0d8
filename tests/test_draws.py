"""Dropout masks are a function of (seed, stream, index) only: the same bits on any device (adapters/draws.py)."""

import pytest
import torch

from cotune.adapters.draws import dropout, keep_mask, mix32

M = 2**32


def lowbias32(x: int) -> int:
    """The hash as published (C, uint32 arithmetic), written with explicit wrap-around: the reference."""
    x ^= x >> 16
    x = (x * 0x21F0AAAD) % M
    x ^= x >> 15
    x = (x * 0x735A2D97) % M
    return x ^ (x >> 15)


def reference_keep(seed: int, stream: int, index: int, p: float) -> bool:
    k1 = lowbias32(lowbias32((seed % M) ^ lowbias32(stream % M)) ^ (seed >> 32) % M)
    k2 = lowbias32(k1 ^ 0x9E3779B9)
    return lowbias32(lowbias32((index + k1) % M) ^ k2) >= round(p * M)


def test_mix32_is_lowbias32_with_uint32_wraparound():
    values = [0, 1, 2, 0x7FFFFFFF, 0x80000000, M - 1, *torch.randint(0, M, (200,), dtype=torch.int64).tolist()]
    got = mix32(torch.tensor(values, dtype=torch.int64)).tolist()
    assert got == [lowbias32(v) for v in values]
    assert mix32(values[-1]) == lowbias32(values[-1])  # the Python-int path the keys use


@pytest.mark.parametrize("seed, stream", [(7, 0), (2**62 - 1, 3), (123456789012345, 5)])
def test_mask_is_the_integer_hash_elementwise_whatever_the_torch_rng(seed, stream):
    like = torch.empty(3, 40, 7, dtype=torch.float64)
    torch.manual_seed(0)
    a = keep_mask(like, 0.3, seed, stream)
    torch.manual_seed(1)
    b = keep_mask(like, 0.3, seed, stream)
    assert a.dtype == torch.float64 and a.shape == like.shape
    assert torch.equal(a, b)  # reads no generator state: nothing but the integers decides
    ref = [reference_keep(seed, stream, i, 0.3) for i in range(like.numel())]
    assert a.flatten().bool().tolist() == ref


def test_keep_rate_and_independence_across_seeds_and_streams():
    like = torch.empty(1_000_000)
    p = 0.25
    m = keep_mask(like, p, seed=11)
    # Binomial standard error at n = 1e6 is 4.3e-4: 0.003 is seven of them.
    assert abs(m.mean().item() - (1 - p)) < 3e-3
    agree = (p**2 + (1 - p) ** 2)  # two independent masks agree on this fraction of elements
    for other in (keep_mask(like, p, seed=12), keep_mask(like, p, seed=11, stream=1), keep_mask(like, p, seed=11 + M)):
        assert abs((m == other).float().mean().item() - agree) < 3e-3


def test_dropout_is_inverted_and_unseeded_calls_use_torch_rng():
    x = torch.randn(50, 64, dtype=torch.float64)
    y = dropout(x, 0.5, seed=3)
    kept = y != 0
    torch.testing.assert_close(y[kept], 2 * x[kept], rtol=0, atol=0)
    assert dropout(x, 0.0, seed=3) is x
    torch.manual_seed(5)
    u1 = dropout(x, 0.5, None)
    torch.manual_seed(5)
    torch.testing.assert_close(dropout(x, 0.5, None), u1, rtol=0, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_mask_equals_cpu_mask():
    like = torch.empty(4, 128, 576)
    for seed, stream in ((1, 0), (2**61 + 17, 2)):
        cpu = keep_mask(like, 0.1, seed, stream)
        gpu = keep_mask(like.cuda(), 0.1, seed, stream).cpu()
        assert torch.equal(cpu, gpu)


def test_adapter_generator_is_a_cpu_generator_replaying_its_seed():
    from cotune.adapters.base import Adapter

    assert Adapter.generator(None) is None  # unseeded calls use the global CPU RNG
    g1, g2 = Adapter.generator(2**40 + 3), Adapter.generator(2**40 + 3)
    assert g1.device == torch.device("cpu")
    assert torch.equal(torch.randint(7, (50,), generator=g1), torch.randint(7, (50,), generator=g2))
