"""The adapter contract, checked for every registered family (a new family gets these tests for free).

On a two-layer MiniLM (its real first layers) in float64, with real SST-2 sentences, each family must:

* attach, change the output, save in PEFT's format, load into a fresh model with the same output, and
  detach back to the base model's output;
* merge (and unmerge bit for bit) where it says it is mergeable, and refuse with a clear error otherwise;
* give every row of a mixed batch exactly its output alone (routed, gathered or not);
* train inside a mixed batch, under every engine at once (backprop, gl and zo tenants in one batch), to
  the same weights as the plain single-job engine on a plain model;
* take the MeZO step of its formula: ``θ − lr·(L(θ+εz) − L(θ−εz))/2ε·z``.

References are independent of the tenant bank: plain ``attach`` models and their own engines, and the
MeZO formula computed here from two losses.
"""

from __future__ import annotations

import copy
import random

import pytest
import torch

from cotune.adapters import (
    adapters,
    attach,
    detach,
    families,
    load_adapter,
    make_config,
    merge,
    save_adapter,
    set_active,
    trainable_parameters,
    unmerge,
)
from cotune.adapters.attach import adapter_sets, copy_adapter_weights, plan_adapters
from cotune.commands import verify
from cotune.engines import OptimConfig, make_engine
from cotune.engines.zeroth_order import zo_direction
from cotune.errors import CotuneError
from cotune.tasks.losses import output_loss
from cotune.tenants import MixedBatchScheduler, MultiTenantTrainer, TenantBank

ROWS, LENGTH = 4, 32
HEAD = "classifier"


@pytest.fixture(scope="module")
def base():
    from cotune.models import load_model

    torch.manual_seed(0)
    return verify.keep_layers(load_model("minilm", "seq_cls", num_labels=2), 2).double().eval()


@pytest.fixture(scope="module")
def data():
    """Three batches of 4 SST-2 sentences padded to 32 tokens: ``(inputs, labels)``."""
    from cotune.models import load_tokenizer

    return verify.batches(load_tokenizer("minilm"), ROWS, LENGTH, count=3)


def configs(family: str, model: torch.nn.Module, own: list | None = None) -> list:
    """The family at its default places plus a trainable head (the family itself when it is ``full``)."""
    own = [c for c in verify.family_configs(family, model) if c.family != "full"] if own is None else own
    return [*own, make_config("full", target_modules=[HEAD])]


def randomise(params: dict[str, torch.Tensor], seed: int) -> None:
    """Every parameter moved (LoRA's zero B would hide A, a zero head would hide everything)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params.values():
            p.add_(0.05 * torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p))


def logits(model: torch.nn.Module, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def plain(
    base: torch.nn.Module, family: str, init: dict[str, torch.Tensor] | None = None, own: list | None = None
) -> torch.nn.Module:
    model = copy.deepcopy(base)
    attach(model, configs(family, model, own), name="solo")
    if init is not None:
        copy_adapter_weights(model, init, "solo")
    return model.eval()


@pytest.mark.parametrize("family", families())
def test_planned_adapters_count_what_attach_builds(base, family):
    model = copy.deepcopy(base)
    cfgs = configs(family, model)
    planned = {ad.path: ad.parameters for ad in plan_adapters(model, cfgs)}  # on the meta device: model untouched
    assert not adapter_sets(model)
    attach(model, cfgs, name="x")
    built = trainable_parameters(model, "x")
    assert sum(planned.values()) == sum(p.numel() for p in built.values()) > 0
    for path, n in planned.items():  # site by site
        assert n == sum(p.numel() for k, p in built.items() if k.startswith(path + ".")), path


@pytest.mark.parametrize("family", families())
def test_attach_save_load_detach(base, data, family, tmp_path):
    inputs = data[0][0]
    model = copy.deepcopy(base)
    before = logits(model, inputs)
    attach(model, configs(family, model), name="x")
    randomise(trainable_parameters(model, "x"), 1)
    model.eval()
    adapted = logits(model, inputs)
    assert (adapted - before).abs().max() > 1e-3
    folder = save_adapter(model, tmp_path / "a", name="x")
    assert (folder / "adapter_config.json").is_file() and (folder / "adapter_model.safetensors").is_file()
    fresh = copy.deepcopy(base)
    load_adapter(fresh, folder, name="x")
    torch.testing.assert_close(logits(fresh.eval(), inputs), adapted, rtol=0, atol=1e-12)
    detach(model, "x")
    torch.testing.assert_close(logits(model, inputs), before, rtol=0, atol=1e-12)


@pytest.mark.parametrize("family", families())
def test_merge_where_mergeable(base, data, family):
    inputs = data[0][0]
    model = plain(base, family)
    randomise(trainable_parameters(model, "solo"), 2)
    unmerged = logits(model, inputs)
    weights = {k: v.clone() for k, v in model.state_dict().items() if not k.endswith("_pristine")}
    if not all(ad.mergeable for ad in adapters(model, "solo").values()):
        with pytest.raises(CotuneError, match="not mergeable"):
            merge(model, "solo")
        return
    merge(model, "solo")
    torch.testing.assert_close(logits(model, inputs), unmerged, rtol=0, atol=1e-10)
    unmerge(model)
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in weights.items())  # bit for bit


def tenant_configs(family: str, model: torch.nn.Module) -> list:
    """The family's configs for a tenant: a default that rewrites the shared base (PiSSA) is refused, and the
    refusal names the init to use instead."""
    own = [c for c in verify.family_configs(family, model) if c.family != "full"]
    probe = TenantBank(copy.deepcopy(model))
    try:
        probe.add_tenant("probe", own, head=2)
    except CotuneError as e:
        assert "rewrite the shared base" in str(e) and "init='lora'" in str(e)
        own = [make_config(c, init="lora") for c in own]
    return own


def bank_of(base: torch.nn.Module, family: str, names: list[str], gather: bool = True) -> TenantBank:
    bank = TenantBank(copy.deepcopy(base), gather=gather)
    for k, t in enumerate(names):
        fam = "lowrank" if t.startswith("lora") else family
        bank.add_tenant(t, tenant_configs(fam, bank.model), head=2)
        randomise(bank.parameters(t), 10 + k)
    bank.model.eval()
    return bank


def mixed(names: list[str], data: list, step: int = 0):
    sched = MixedBatchScheduler()
    for k, t in enumerate(names):
        inputs, labels = data[(k + step) % len(data)]
        sched.join(t, [{**inputs, "labels": labels}], rows_per_step=ROWS)
    return sched.next_batch()


@pytest.mark.parametrize("family", families())
def test_routed_in_a_mixed_batch_equals_alone(base, data, family):
    names = ["a", "lora", "c"]  # two tenants of the family (other weights) and a LoRA one between them
    for gather in (True, False):
        bank = bank_of(base, family, names, gather)
        batch = mixed(names, data)
        with torch.no_grad():
            out = bank.forward(batch.groups, **batch.inputs).logits
        for t in names:
            set_active(bank.model, t)
            alone = logits(bank.model, batch.tenant_inputs(t))
            set_active(bank.model, None)
            torch.testing.assert_close(out[batch.groups.rows_of(t)], alone, rtol=0, atol=1e-10)


ENGINES = {"bp": "backprop", "gl": "gl", "zo": "zo"}
OPTIM = OptimConfig(optimizer="adamw", lr=1e-2)


@pytest.mark.parametrize("family", families())
def test_every_engine_inside_a_mixed_batch_equals_it_alone(base, data, family):
    """backprop, gl and zo tenants of the family in ONE mixed batch; each ends where its own engine does."""
    names = list(ENGINES)
    bank = bank_of(base, family, names)
    init = {t: bank.state_dict(t) for t in names}
    trainer = MultiTenantTrainer(bank)
    for t, engine in ENGINES.items():
        trainer.add(t, OPTIM, engine=engine, **({"seed": 7} if engine == "zo" else {}))
    for step in range(2):
        res = trainer.step(mixed(names, data, step))
        assert all(r.updated for r in res.values()), res
    trainer.close()
    for k, (t, engine) in enumerate(ENGINES.items()):
        model = plain(base, family, init[t], tenant_configs(family, base))
        alone = make_engine(engine, model, OPTIM, **({"seed": 7} if engine == "zo" else {}))
        for step in range(2):
            inputs, labels = data[(k + step) % len(data)]
            alone.step(lambda m, b: output_loss(m(**b[0]).logits, {"labels": b[1]}), (inputs, labels))
        alone.close()
        want = {k2: v.detach() for k2, v in trainable_parameters(model, "solo").items()}
        got = bank.state_dict(t)
        assert got.keys() == want.keys()
        moved = max(float((want[p] - init[t][p]).abs().max()) for p in want)
        diff = max(float((got[p] - want[p]).abs().max()) for p in want)
        assert moved > 1e-6 and diff <= 1e-9 * moved, (t, diff, moved)


@pytest.mark.parametrize("family", families())
def test_mezo_step_is_its_formula(base, data, family):
    eps, lr, seed = 1e-3, 1e-2, 5
    model = plain(base, family)
    randomise(trainable_parameters(model, "solo"), 3)
    params = trainable_parameters(model, "solo")
    theta = {k: v.detach().clone() for k, v in params.items()}
    inputs, labels = data[0]

    def loss_at(shift: float, direction: int) -> float:
        with torch.no_grad():
            for i, p in enumerate(params.values()):
                p.copy_(theta[list(theta)[i]] + shift * zo_direction(direction, i, p))
            value = float(output_loss(model(**inputs).logits, {"labels": labels}))
            for k, p in params.items():
                p.copy_(theta[k])
        return value

    direction = random.Random(seed).getrandbits(62)  # the engine's first draw from its own seeded stream
    g = (loss_at(eps, direction) - loss_at(-eps, direction)) / (2 * eps)
    engine = make_engine("zo", model, OptimConfig(optimizer="sgd", lr=lr), eps=eps, seed=seed)
    engine.step(lambda m, b: output_loss(m(**b[0]).logits, {"labels": b[1]}), (inputs, labels))
    assert abs(g) > 0
    for i, (k, p) in enumerate(params.items()):
        want = theta[k] - lr * g * zo_direction(direction, i, p)
        torch.testing.assert_close(p.detach(), want, rtol=0, atol=1e-12 + 1e-9 * float((want - theta[k]).abs().max()))
