"""AdaKron's own flags: sharing_up / sharing_down, inference_level, and the consistency loss from a config."""

from __future__ import annotations

import itertools
import json
import random

import pytest
import torch
import torch.nn.functional as F
import yaml
from test_kron import kron_ref
from user_cli import REPO, TINY, cotune

from cotune.adapters import make_config
from cotune.adapters.families.kron import Kron, consistency_loss
from cotune.errors import CotuneError
from cotune.training.config import load_config
from cotune.training.trainer import Trainer


def _kron(d=16, **kw) -> Kron:
    torch.manual_seed(0)
    ad = Kron(make_config("kron", **kw), d, d)
    with torch.no_grad():
        for p in ad.parameters():
            p.normal_(0, 0.5)
    return ad


def test_sharing_down_is_the_width_of_the_expert_factor():
    ad = _kron(r=24, sharing_down=8).eval()
    assert ad.down_a.stacked()[0].shape == (1, 8, 16) and ad.down_v.stacked()[0].shape == (1, 3, 16)
    u = torch.randn(2, 3, 16)
    want = kron_ref(u, ad.down_a.weight[0], ad.down_a.bias[0], ad.down_v.weight[0], ad.down_v.bias[0],
                    ad.up.weight, ad.up.bias)
    torch.testing.assert_close(ad(u).double(), want, rtol=1e-5, atol=1e-6)
    assert make_config("kron", sharing_down=0).sharing_down == 4  # the README's command passes 0; its text says 4
    with pytest.raises(CotuneError, match="multiple of 5"):
        make_config("kron", r=48, sharing_down=5)


def test_sharing_up_chooses_which_down_factors_hold_experts():
    full = _kron(r=8, num_experts=3, sharing_up=1)  # ints, as run_glue.py's flags are typed
    assert full.config.mixture == "full" and len(full.down_a) == 3 and len(full.down_v) == 3
    partial = _kron(r=8, num_experts=3, sharing_up=0)
    assert partial.config.mixture == "partial" and len(partial.down_a) == 3 and len(partial.down_v) == 1
    with pytest.raises(CotuneError, match="num_experts=2"):
        make_config("kron", sharing_up=True)
    with pytest.raises(CotuneError, match="means mixture=full"):
        make_config("kron", num_experts=2, mixture="partial", sharing_up=True)


def _combos(ad: Kron, u: torch.Tensor) -> torch.Tensor:
    """g(u) for every (expert of down_a, expert of down_v): shape (E_a·E_v, ..., d)."""
    outs = []
    for ia, iv in itertools.product(range(len(ad.down_a)), range(len(ad.down_v))):
        a = F.linear(u, ad.down_a.weight[ia], ad.down_a.bias[ia])
        v = F.linear(u, ad.down_v.weight[iv], ad.down_v.bias[iv])
        outs.append(ad.up(F.gelu((a.unsqueeze(-1) * v.unsqueeze(-2)).flatten(-2))))
    return torch.stack(outs)


@pytest.mark.parametrize("level", [0, 1])
def test_inference_level_routes_each_token_or_sequence_to_one_expert(level):
    ad = _kron(r=8, num_experts=2, sharing_up=True, inference_level=level).eval()
    u = torch.randn(6, 5, 16)
    with torch.no_grad():
        out, combos = ad(u, seed=7), _combos(ad, u)
    # Which combination each token used: exactly one matches.
    match = (out.unsqueeze(0) - combos).abs().amax(-1) < 1e-5  # (combos, 6, 5)
    assert bool((match.sum(0) >= 1).all())
    used = match.float().argmax(0)  # (6, 5)
    if level == 1:
        assert bool((used == used[:, :1]).all())  # a sequence keeps its experts for every token
        assert used[:, 0].unique().numel() > 1
    else:
        assert bool((used != used[:, :1]).any())  # tokens of one sequence differ
    # Level 3 (the default) is the weight average: deterministic, one adapter.
    avg = _kron(r=8, num_experts=2, sharing_up=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(avg(u), avg(u))
    with pytest.raises(CotuneError, match="inference_level"):
        make_config("kron", num_experts=2, mixture="partial", inference_level=2)


def test_consistency_loss_from_config_is_the_training_objective(shared_data, monkeypatch, tmp_path):
    monkeypatch.chdir(REPO)
    cfg = load_config(REPO / "examples" / "madakron_minilm_mrpc.yaml",
                      ["method.options.consistency_loss=0.5", "train_limit=8", "batch_size=4",
                       f"output_dir={tmp_path / 'run'}", "progress=false"])
    tr = Trainer(cfg)
    tr.setup()
    batch = tr.task.collate(tr.train_rows[:4])
    random.seed(3), torch.manual_seed(3)
    got = tr.loss_fn(tr.model.train(), batch)
    random.seed(3), torch.manual_seed(3)  # the sites' seeds (Python's RNG) and dropout's: the same two forwards
    l1, l2 = tr.task.logits(tr.model, batch).float(), tr.task.logits(tr.model, batch).float()
    assert not torch.allclose(l1, l2)  # different expert draws
    want = F.cross_entropy(l1, batch["labels"]) + 0.5 * consistency_loss(l1, l2)
    torch.testing.assert_close(got, want)
    tr.engine.close()


def test_adakron_flags_train_from_the_command_line(tmp_path, shared_data):
    cfg = yaml.safe_load((REPO / "examples" / "madakron_minilm_mrpc.yaml").read_text())
    cfg["task"]["data"] = str(shared_data / "glue" / "MRPC")
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(cfg))
    out = cotune("train", "m.yaml", "method.options.consistency_loss=1", "method.options.inference_level=1",
                 "method.options.sharing_up=1", *TINY, "--quiet", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    saved = json.loads((tmp_path / "runs" / "madakron_minilm_mrpc" / "adapter" / "adapter_config.json").read_text())
    kron = next(c for c in saved["cotune_components"] if c["cotune_family"] == "kron")
    assert kron["inference_level"] == 1 and kron["consistency_loss"] == 1.0 and kron["mixture"] == "full"


def test_a_family_option_at_the_top_level_names_its_place():
    with pytest.raises(CotuneError, match=r"set method.options.inference_level"):
        load_config(None, ["task.data=x", "method.name=kron", "inference_level=3"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("level", [0, 1])
def test_seeded_draws_are_the_same_on_cuda_as_on_cpu(level):
    """Training draws (replayed by a CPU fitter) and eval routing come from a CPU generator on any device."""
    ad = _kron(r=8, num_experts=2, sharing_up=True, inference_level=level)
    u = torch.randn(6, 5, 16)
    with torch.no_grad():
        cpu_train, cpu_eval = ad.train()(u, seed=11), ad.eval()(u, seed=11)
        ad.cuda()
        gpu_train, gpu_eval = ad.train()(u.cuda(), seed=11).cpu(), ad.eval()(u.cuda(), seed=11).cpu()
    torch.testing.assert_close(gpu_train, cpu_train, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gpu_eval, cpu_eval, rtol=1e-4, atol=1e-5)
