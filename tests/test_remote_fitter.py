"""ColA's split, library level: the remote fitter (frames out, weights back) against backprop and its own checks.

``placement="loopback"`` answers every capture frame with a ``RemoteWorker`` in this process through the same
safetensors bytes the service sends over HTTP, so the worker's math and the frame format are proven here, on a
two-layer MiniLM (real weights) with 4 x 64-token SST-2 batches. Through pairs, every family's worker is bit-exact
with the server-side fitter after 20 AdamW steps; through the statistic (the affine families), the adapters equal
backprop after 10 AdamW steps, to 1e-10 relative to the update in float64 and within 2x backprop's own rounding
envelope in fp32.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from cotune.adapters import adapters, families
from cotune.commands import verify
from cotune.engines import OptimConfig
from cotune.engines.gradient_learning import remote
from cotune.errors import CotuneError

SETTINGS = verify.Settings(micro_batches=10, interval=1, rows=4, max_length=64, layers=2, statistic=False,
                           placements=("loopback",))


@pytest.mark.slow
@pytest.mark.parametrize("family", ["lowrank", "linear", "cola", "loretta_rep"])
def test_the_remote_worker_equals_backprop_through_the_statistic(small, family):
    """The families affine in u, where the remote wire ships Σδuᵀ instead of the pairs (``auto``); every other
    family ships pairs, bit-exact with the server-side fitter (the test below)."""
    base, data = small
    results = [r for r in verify.verify_family(base, family, data, SETTINGS) if r.check == "loopback"]
    assert {r.dtype for r in results} == {"fp32", "float64"}
    for r in results:
        if r.dtype == "float64":
            assert r.rel_diff <= 1e-10, r
        else:
            assert r.envelope > 0 and r.rel_diff <= 2 * r.envelope, r


def _server_end(small) -> remote.RemoteFitter:
    base, _ = small
    model = verify.prepared(base, "lowrank")
    return remote.RemoteFitter(adapters(model, "verify"), OptimConfig(lr=1e-3))


def _frame(fitter: remote.RemoteFitter) -> tuple[remote.RemoteWorker, bytes]:
    """A worker built from the server's setup, and the capture frame of update 1 (one Statistic per site)."""
    worker = remote.RemoteWorker(copy.deepcopy(fitter.setup()), fitter.weights())
    frames: list[bytes] = []
    fitter.outbox = lambda update, frame: frames.append(frame)
    for path, ad in fitter.adapters.items():
        fitter.submit(remote.Statistic(path, 0, torch.randn(ad.d_out, ad.d_in) * 1e-2, torch.randn(ad.d_out) * 1e-2))
    fitter.step()
    return worker, frames[-1]


def test_a_worker_update_comes_back_and_bad_weights_are_refused(small):
    fitter = _server_end(small)
    before = {k: v.clone() for k, v in fitter.weights().items()}
    worker, frame = _frame(fitter)
    assert fitter.awaiting == 1
    good = worker.answer(frame)
    update, weights, stats = remote.decode_weights(good)
    assert update == 1 and stats["updated"] is True and math.isfinite(stats["grad_norm"])
    name = next(iter(weights))

    def forged(change) -> bytes:
        w = {k: v.clone() for k, v in weights.items()}
        change(w)
        return remote.encode_weights(1, w)

    bad = {
        "wrong shape": forged(lambda w: w.__setitem__(name, w[name][..., :1].clone())),
        "wrong dtype": forged(lambda w: w.__setitem__(name, w[name].double())),
        "NaN": forged(lambda w: w[name].view(-1).__setitem__(0, float("nan"))),
        "missing tensor": forged(lambda w: w.pop(name)),
        "wrong update": remote.encode_weights(2, weights),
        "not a frame": b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage",
    }
    for why, data in bad.items():
        with pytest.raises(CotuneError):
            fitter.deliver(data)
        for k, v in fitter.weights().items():  # refused: the adapter is unchanged
            assert torch.equal(v, before[k]), why
        assert fitter.awaiting == 1, why
    fitter.deliver(good)
    assert fitter.awaiting is None
    changed = [k for k, v in fitter.weights().items() if not torch.equal(v, before[k])]
    assert changed and all(torch.equal(fitter.weights()[k], weights[k]) for k in fitter.named)


def test_a_worker_refuses_a_capture_out_of_order_and_resumes_from_its_state(small):
    fitter = _server_end(small)
    worker, frame = _frame(fitter)
    saved = copy.deepcopy(worker.state_dict())
    first = worker.answer(frame)
    with pytest.raises(CotuneError, match="at update 1"):
        worker.answer(frame)  # the same update twice: refused, not applied twice
    again = remote.RemoteWorker(copy.deepcopy(fitter.setup()))
    again.load_state_dict(saved)  # a worker restarted from the state saved before the update
    (_, a, _), (_, b, _) = remote.decode_weights(again.answer(frame)), remote.decode_weights(first)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # recomputed bit for bit


@pytest.mark.parametrize("family", families())
def test_through_the_frames_the_worker_is_bit_exact_with_the_server_side_fitter(small, family):
    """Same pairs (fp32 wire, no statistic), same Fitter: 20 AdamW steps through safetensors frames change no bit."""
    base, data = small
    model = verify.prepared(base, family)
    init = verify.snapshot(model, "verify")
    opt = OptimConfig(optimizer="adamw", lr=1e-3)
    out = {}
    for placement in ("inline", "loopback"):
        out[placement], stats = verify.trajectory(model, "verify", init, "gl", opt, data, 20, placement=placement,
                                                  sufficient_statistic="off")
    assert verify.rel_update(out["loopback"], out["inline"], init) == 0.0
    assert any(not torch.equal(out["loopback"][k], init[k]) for k in init)  # it trained
