"""Many tenants on one base: routing, gathered matmul, mixed training == training alone.

References are independent of the bank: a plain cotune model per tenant (``attach`` + its own head width)
trained with an ordinary torch optimizer loop, and direct formulas for the gathered low-rank product.
Real MiniLM, real rows of SST-2, RTE, MRPC, CoLA and the Financial PhraseBank (3 labels).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

from cotune.adapters import attach, make_config, save_adapter, set_active
from cotune.adapters.attach import copy_adapter_weights, sites, trainable_parameters
from cotune.engines.base import OptimConfig, make_optimizer
from cotune.errors import CotuneError
from cotune.models import load_model
from cotune.tasks.losses import output_loss
from cotune.tenants import MixedBatchScheduler, MultiTenantTrainer, RowGroups, TenantBank, gathered_lowrank

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._glue import encode, task_rows  # noqa: E402

TASKS = {"sst2": 2, "rte": 2, "mrpc": 2, "fpb": 3}
ROWS, STEPS, MAXLEN = 4, 3, 32


def lora(targets=("query", "value"), r=8, alpha=16.0):
    return make_config("lowrank", r=r, lora_alpha=alpha, target_modules=list(targets))


def tenant_configs(task):
    """Mixed families: two plain LoRA tenants, one kron (sequential) + LoRA on output.dense (parallel)."""
    if task == "mrpc":
        return [make_config("kron", r=16, target_modules=["output.dense"])]
    if task == "fpb":
        return [lora(("query", "output.dense"), r=4, alpha=8.0)]
    return [lora()]


@pytest.fixture(scope="module")
def data(minilm_tokenizer, shared_data):
    """Per task, STEPS batches of ROWS real rows (fixed length, so every batch has one shape)."""
    out = {}
    for task in TASKS:
        texts, labels, _ = task_rows(shared_data, task, ROWS * STEPS)
        enc = encode(minilm_tokenizer, texts, labels, MAXLEN)
        out[task] = [{k: v[i * ROWS : (i + 1) * ROWS] for k, v in enc.items()} for i in range(STEPS)]
    return out


def fresh_model(num_labels=2):
    torch.manual_seed(0)
    return load_model("minilm", "seq_cls", num_labels=num_labels).eval()  # eval: no base dropout draws


def make_bank(tasks=TASKS, gather=True):
    bank = TenantBank(fresh_model(), gather=gather)
    for t in tasks:
        torch.manual_seed(100 + list(TASKS).index(t))  # a task's initial weights are the same in every bank
        bank.add_tenant(t, tenant_configs(t), head=TASKS[t])
        with torch.no_grad():  # non-zero B so that every path carries signal from step 0
            for k, p in bank.parameters(t).items():
                if "lora_B" in k:
                    p.normal_(0, 0.02)
    return bank


_REFERENCES: dict = {}


def reference_trajectory(task, init, data, optim, steps=STEPS):
    """The tenant trained ALONE: its own plain cotune model, ordinary autograd, a torch optimizer.

    Cached per (task, optimizer, initial weights): several tests compare against the same trajectory.
    """
    key = (task, repr(optim), tuple(sorted((k, float(v.double().sum())) for k, v in init.items())))
    if key not in _REFERENCES or len(_REFERENCES[key]) < steps:
        _REFERENCES[key] = _reference(task, init, data, optim, max(steps, STEPS))
    return _REFERENCES[key][:steps]


def _reference(task, init, data, optim, steps):
    model = fresh_model(TASKS[task])
    attach(model, [*tenant_configs(task), make_config("full", target_modules=["classifier"])], name="solo")
    copy_adapter_weights(model, init, "solo")
    params = trainable_parameters(model, "solo")
    opt = make_optimizer(list(params.items()), optim)
    traj = []
    for s in range(steps):
        b = data[task][s]
        out = model(**{k: v for k, v in b.items() if k != "labels"})
        loss = torch.nn.functional.cross_entropy(out.logits, b["labels"])
        opt.zero_grad()
        loss.backward()
        opt.step()
        traj.append({k: v.detach().clone() for k, v in params.items()})
    return traj


def mixed_batch(bank_tasks, data, step):
    sched = MixedBatchScheduler()
    for t in bank_tasks:
        sched.join(t, [data[t][step]], rows_per_step=ROWS)
    return sched.next_batch()


def assert_close_rel(a: dict, b: dict, rel=1e-5):
    """``‖a − b‖ / ‖b‖`` over the tenant's whole parameter vector (and exact equality when ``rel == 0``)."""
    assert a.keys() == b.keys()
    if rel == 0:
        for k in a:
            assert torch.equal(a[k], b[k]), k
        return
    va, vb = (torch.cat([d[k].flatten() for k in sorted(d)]) for d in (a, b))
    err = float((va - vb).norm() / vb.norm())
    assert err <= rel, f"relative error {err:.2e}"


# -- routing ------------------------------------------------------------------------------------------


def test_gathered_lowrank_is_the_per_row_formula():
    torch.manual_seed(0)
    from cotune.adapters.families.lowrank import LowRank

    tenants = [LowRank(lora(r=4, alpha=4.0 * (k + 1)), 12, 10) for k in range(3)]
    for ad in tenants:
        torch.nn.init.normal_(ad.lora_B.weight)
    x = torch.randn(5, 7, 12)
    row_tenant = torch.tensor([2, 0, 0, 1, 2])
    got = gathered_lowrank(x, row_tenant, tenants)
    for i, k in enumerate(row_tenant.tolist()):
        ad = tenants[k]
        want = ad.scaling * x[i] @ ad.lora_A.weight.T @ ad.lora_B.weight.T
        torch.testing.assert_close(got[i], want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("order", ["grouped", "interleaved"])
def test_mixed_forward_equals_each_tenant_alone(data, order):
    """Each row's logits equal its tenant's set run alone (mixed families, heads of 2 and 3 labels)."""
    bank = make_bank()
    batches = {t: data[t][0] for t in TASKS}
    ids = [t for t in TASKS for _ in range(ROWS)]
    inputs = {k: torch.cat([batches[t][k] for t in TASKS]) for k in ("input_ids", "attention_mask", "token_type_ids")}
    if order == "interleaved":  # rows of one tenant not contiguous: index-tensor path
        perm = torch.tensor([i * ROWS + j for j in range(ROWS) for i in range(len(TASKS))])
        ids = [ids[i] for i in perm.tolist()]
        inputs = {k: v[perm] for k, v in inputs.items()}
    groups = RowGroups.from_ids(ids)
    outs = {}
    with torch.no_grad():
        for gather in (True, False):
            bank.gather = gather
            outs[gather] = bank.forward(groups, **inputs)
        # the gathered matmul equals the per-tenant loop
        torch.testing.assert_close(outs[True].logits, outs[False].logits, rtol=1e-5, atol=1e-6)
        for t in TASKS:
            set_active(bank.model, t)
            rows = groups.rows_of(t)
            alone = bank.model(**{k: v[rows] for k, v in inputs.items()}).logits
            assert alone.shape[-1] == TASKS[t]
            torch.testing.assert_close(bank.logits(outs[True], groups, t), alone, rtol=1e-5, atol=1e-6)
        set_active(bank.model, None)


def test_add_remove_tenant_and_mixed_site_kinds():
    bank = make_bank()
    path = "bert.encoder.layer.0.output.dense"
    site = sites(bank.model)[path]
    assert {t: site.adapters[t].site for t in site.adapters} == {"mrpc": "sequential", "fpb": "parallel"}
    assert bank.tenant("fpb").num_labels == 3 and bank.parameters("fpb")["classifier.weight"].shape == (3, 384)
    before = bank.state_dict("sst2")
    bank.remove_tenant("rte")
    assert bank.tenants == ["sst2", "mrpc", "fpb"]
    with pytest.raises(CotuneError, match="unknown tenant"):
        bank.tenant("rte")
    with pytest.raises(CotuneError, match="already exists"):
        bank.add_tenant("sst2", [lora()])
    assert_close_rel(bank.state_dict("sst2"), before, rel=0.0)
    assert all(p.requires_grad for p in bank.parameters("sst2").values())  # untouched by later attaches
    bank.remove_tenant("mrpc")
    assert all(type(m).__name__ != "AdaptedModule" or m.adapters for m in bank.model.modules())
    with pytest.raises(CotuneError, match="unknown tenant"):
        bank.forward(["sst2", "nobody"], input_ids=torch.ones(2, 4, dtype=torch.long))


def test_saved_tenant_round_trip_and_wrong_base_refused(tmp_path, data):
    bank = make_bank({"sst2": 2, "fpb": 3})
    bank.save_tenant("fpb", tmp_path / "fpb")
    bank.add_tenant("fpb-copy", tmp_path / "fpb")  # head width (3) comes back from the saved tensors
    assert bank.tenant("fpb-copy").num_labels == 3
    assert_close_rel({k: v for k, v in bank.state_dict("fpb-copy").items()}, bank.state_dict("fpb"), rel=0.0)
    b = data["fpb"][0]
    inputs = {k: torch.cat([b[k], b[k]]) for k in ("input_ids", "attention_mask", "token_type_ids")}
    groups = RowGroups.from_ids(["fpb"] * ROWS + ["fpb-copy"] * ROWS)
    with torch.no_grad():
        out = bank.forward(groups, **inputs)
    torch.testing.assert_close(bank.logits(out, groups, "fpb"), bank.logits(out, groups, "fpb-copy"))

    # An adapter saved for another base (BERT with hidden 64) is refused, naming the tensors; no change.
    from transformers import BertConfig, BertForSequenceClassification

    other = BertForSequenceClassification(
        BertConfig(hidden_size=64, num_hidden_layers=6, num_attention_heads=4, intermediate_size=128, vocab_size=30522)
    )
    attach(other, [lora(), make_config("full", target_modules=["classifier"])], name="x")
    save_adapter(other, tmp_path / "other", name="x")
    tenants_before = bank.tenants
    n_sites = len(sites(bank.model))
    with pytest.raises(
        CotuneError, match=r"shape mismatch.*query\.lora_A\.weight: saved \(8, 64\) vs model \(8, 384\)"
    ):
        bank.add_tenant("intruder", tmp_path / "other")
    assert bank.tenants == tenants_before and len(sites(bank.model)) == n_sites
    assert "intruder" not in bank.model._cotune_sets
    with pytest.raises(CotuneError, match="does not exist"):
        bank.add_tenant("ghost", tmp_path / "nowhere")


# -- training -----------------------------------------------------------------------------------------


OPTIMS = {
    # SGD sees the gradient's scale: a wrong loss normalisation (mean over the whole mixed batch) fails it.
    "sgd": OptimConfig(optimizer="sgd", lr=0.5, momentum=0.9),
    # AdamW checks per-tenant optimizer state. eps=1e-6 (BERT's own): Adam's g/(|g|+eps) turns the fp32
    # rounding noise (~1e-6 relative, a 16-row batch is summed in another order than a 4-row one) of
    # near-zero gradient entries into lr-sized steps when eps is tiny; 1e-6 keeps that below 1e-5.
    "adamw": OptimConfig(optimizer="adamw", lr=5e-3, weight_decay=0.01, eps=1e-6),
}


@pytest.mark.parametrize("opt", ["sgd", "adamw"])
@pytest.mark.parametrize("engine", ["backprop", "gl"])
def test_mixed_trajectory_equals_alone(data, engine, opt):
    """Each tenant's parameters after every mixed step equal its parameters trained alone (fp32, 1e-5)."""
    optim = OPTIMS[opt]
    bank = make_bank()
    init = {t: bank.state_dict(t) for t in TASKS}
    trainer = MultiTenantTrainer(bank, engine=engine, placement="thread" if engine == "gl" else "inline")
    for t in TASKS:
        trainer.add(t, optim, output_loss)
    if engine == "gl":  # the server holds read-only weights only
        assert not any(p.requires_grad for t in TASKS for p in bank.parameters(t).values())
    mixed = {t: [] for t in TASKS}
    for s in range(STEPS):
        res = trainer.step(mixed_batch(TASKS, data, s))
        assert all(r.updated and not r.skipped for r in res.values())
        for t in TASKS:
            mixed[t].append(bank.state_dict(t))
    if engine == "gl":
        assert all(p.grad is None for t in TASKS for p in bank.parameters(t).values())
        assert res["sst2"].stats["wire_bytes"] > 0
    trainer.close()
    for t in TASKS:
        ref = reference_trajectory(t, init[t], data, optim)
        for s in range(STEPS):
            assert_close_rel(mixed[t][s], ref[s])
            moved = max((mixed[t][s][k] - init[t][k]).abs().max() for k in init[t])
            assert moved > 1e-4  # the check compares real updates, not untouched weights


@pytest.mark.parametrize("engine", ["backprop", "gl"])
def test_nan_in_one_tenant_leaves_the_others_unchanged(data, engine):
    optim = OptimConfig(optimizer="adamw", lr=5e-3)
    tasks = {"sst2": 2, "rte": 2}
    runs = {}
    for poison in (False, True):
        bank = make_bank(tasks)
        trainer = MultiTenantTrainer(bank, engine=engine)
        for t in tasks:
            trainer.add(t, optim, output_loss)
        for s in range(2):
            if poison and s == 1:
                with torch.no_grad():
                    bank.parameters("rte")["bert.encoder.layer.3.attention.self.value.lora_B.weight"][0, 0] = math.nan
            res = trainer.step(mixed_batch(tasks, data, s))
        runs[poison] = {t: bank.state_dict(t) for t in tasks}
        if poison:
            assert res["rte"].skipped and not res["rte"].updated and trainer.skipped["rte"] == 1
            assert not res["sst2"].skipped
    for t in ("sst2",):
        assert_close_rel(runs[True][t], runs[False][t], rel=0.0)  # bit for bit: rows never mix


def test_failing_tenant_loss_is_skipped(data):
    bank = make_bank({"sst2": 2, "rte": 2})
    trainer = MultiTenantTrainer(bank, engine="gl")
    trainer.add("sst2", OptimConfig(lr=1e-3), output_loss)

    def broken(logits, targets):
        raise RuntimeError("bad labels")

    trainer.add("rte", OptimConfig(lr=1e-3), broken)
    before = bank.state_dict("rte")
    res = trainer.step(mixed_batch({"sst2": 2, "rte": 2}, data, 0))
    assert res["sst2"].updated and res["rte"].skipped and "bad labels" in res["rte"].reason
    assert_close_rel(bank.state_dict("rte"), before, rel=0.0)


def test_scheduler_fair_share_join_and_leave(data):
    """Each tenant gives its own rows per step, in stream order; joins/leaves apply from the next step."""
    sched = MixedBatchScheduler()
    rows = {t: {k: torch.cat([b[k] for b in data[t]]) for k in data[t][0]} for t in ("sst2", "rte", "mrpc")}
    sched.join("sst2", [rows["sst2"]], rows_per_step=4)
    sched.join("rte", [rows["rte"]], rows_per_step=2, max_steps=3)
    b0 = sched.next_batch()
    assert b0.tenant_ids == ["sst2"] * 4 + ["rte"] * 2 and b0.inputs["input_ids"].shape[0] == 6
    assert torch.equal(b0.targets["rte"]["labels"], rows["rte"]["labels"][:2])
    sched.join("mrpc", [rows["mrpc"]], rows_per_step=3)  # joins between steps
    b1 = sched.next_batch()
    assert b1.tenants == ["sst2", "rte", "mrpc"]
    assert torch.equal(b1.tenant_inputs("sst2")["input_ids"], rows["sst2"]["input_ids"][4:8])
    assert torch.equal(b1.tenant_inputs("mrpc")["input_ids"], rows["mrpc"]["input_ids"][:3])
    sched.leave("sst2")
    b2 = sched.next_batch()
    assert b2.tenants == ["rte", "mrpc"] and sched.finished == {"sst2": "left"}
    b3 = sched.next_batch()
    assert b3.tenants == ["mrpc"] and sched.finished["rte"] == "max_steps"
    rest = []
    while (b := sched.next_batch()) is not None:
        rest.append(b)
    assert sched.finished["mrpc"] == "exhausted"
    # mrpc's 12 rows: 3 in each of b1..b3, the last 3 in one more batch, in stream order
    assert [len(b.tenant_ids) for b in rest] == [3]
    assert torch.equal(rest[0].inputs["input_ids"], rows["mrpc"]["input_ids"][9:12])


def test_trainer_join_and_leave_keep_trajectories(data):
    """A tenant joining at step 1 trains exactly as alone from its first step; one that left stays put."""
    optim = OPTIMS["adamw"]
    bank = make_bank({"sst2": 2, "rte": 2})
    init = {t: bank.state_dict(t) for t in ("sst2", "rte")}
    trainer = MultiTenantTrainer(bank, engine="gl")
    trainer.add("sst2", optim, output_loss)
    sched = MixedBatchScheduler()
    sched.join("sst2", data["sst2"], rows_per_step=ROWS)
    trainer.step(sched.next_batch())
    trainer.add("rte", optim, output_loss)
    sched.join("rte", data["rte"][:2], rows_per_step=ROWS)
    trainer.step(sched.next_batch())
    sched.leave("sst2")
    trainer.remove("sst2")
    after_leave = bank.state_dict("sst2")
    trainer.step(sched.next_batch())
    assert sched.next_batch() is None and sched.finished == {"sst2": "left", "rte": "exhausted"}
    assert_close_rel(bank.state_dict("sst2"), after_leave, rel=0.0)
    assert_close_rel(after_leave, reference_trajectory("sst2", init["sst2"], data, optim, steps=2)[-1])
    assert_close_rel(bank.state_dict("rte"), reference_trajectory("rte", init["rte"], data, optim, steps=2)[-1])


def test_collaborative_merged_mode_forward(data):
    """Merged mode runs every row through W + mean_k ΔW_k (checked against weights merged by hand)."""
    tasks = {"sst2": 2, "rte": 2}
    bank = make_bank(tasks)
    trainer = MultiTenantTrainer(bank, engine="gl", merged=True)
    for t in tasks:
        trainer.add(t, OptimConfig(lr=1e-3), output_loss)
    batch = mixed_batch(tasks, data, 0)
    deltas, covered = trainer._merged_deltas(batch)
    assert covered["bert.encoder.layer.0.attention.self.query"] == {"sst2", "rte"}
    with torch.no_grad(), bank.route(batch.groups, merged=deltas) as r:
        r.merged_tenants = covered
        got = bank.model(**batch.inputs).logits
    # reference: a plain model whose query/value weights are W + mean of the two tenants' s·B·A
    ref = fresh_model()
    ads = {t: bank.adapters(t) for t in tasks}
    with torch.no_grad():
        for path, ad in ads["sst2"].items():
            if "classifier" in path:
                continue
            mean = (ad.delta_weight() + ads["rte"][path].delta_weight()) / 2
            ref.get_submodule(path).weight += mean
        for t in tasks:
            rows = batch.groups.rows_of(t)
            ref.classifier.load_state_dict({k: v for k, v in ads[t]["classifier"].state_dict().items()})
            want = ref(**{k: v[rows] for k, v in batch.inputs.items()}).logits
            torch.testing.assert_close(got[rows][:, : tasks[t]], want, rtol=1e-5, atol=1e-5)
    res = trainer.step(batch)
    assert all(r.updated for r in res.values())
    with pytest.raises(CotuneError, match="gradient-learning option"):
        MultiTenantTrainer(bank, engine="backprop", merged=True)


def test_micro_rows_chunks_whole_tenants_and_keeps_trajectories(data):
    """Capping the rows of one server pass (memory) cuts between tenants and changes no trajectory."""
    tasks = {"sst2": 2, "rte": 2, "fpb": 3}
    batch = mixed_batch(tasks, data, 0)
    parts = batch.split(8)
    assert [p.tenants for p in parts] == [["sst2", "rte"], ["fpb"]]
    assert torch.equal(parts[1].inputs["input_ids"], batch.tenant_inputs("fpb")["input_ids"])
    assert batch.split(100) == [batch]
    optim = OPTIMS["sgd"]
    for engine, steps in (("backprop", 1), ("gl", 2)):
        bank = make_bank(tasks)
        init = {t: bank.state_dict(t) for t in tasks}
        trainer = MultiTenantTrainer(bank, engine=engine, micro_rows=4)
        for t in tasks:
            trainer.add(t, optim, output_loss)
        for s in range(steps):
            res = trainer.step(mixed_batch(tasks, data, s))
            assert all(r.updated for r in res.values())
        for t in tasks:
            assert_close_rel(bank.state_dict(t), reference_trajectory(t, init[t], data, optim, steps=steps)[-1])


BAD_SPECS = [
    (lambda: [make_config("lowrank", r=-3)], "r >= 1"),
    (lambda: [make_config("lowrank", target_modules=["nosuchmodule"])], "nosuchmodule"),
    (lambda: [make_config("cola", target_modules=["query"])], "rewrite the shared base"),
    (lambda: ["no_such_family"], "unknown adapter family"),
    (lambda: [make_config("lowrank", target_modules=["query"])], "head"),  # head=0
]


@pytest.mark.parametrize("engine", ["backprop", "gl"])
def test_a_bad_tenant_spec_leaves_a_training_tenant_alone(data, engine):
    """While A trains, every bad spec for B is refused; A ends bit for bit where it would have undisturbed."""
    optim = OptimConfig(optimizer="adamw", lr=5e-3)
    runs = {}
    for disturbed in (False, True):
        bank = make_bank({"sst2": 2})
        trainer = MultiTenantTrainer(bank, engine=engine)
        trainer.add("sst2", optim, output_loss)
        for s in range(2):
            trainer.step(mixed_batch({"sst2": 2}, data, s))
            if disturbed:
                for spec, message in BAD_SPECS:
                    with pytest.raises(CotuneError, match=message):
                        bank.add_tenant("b", spec(), head=0 if message == "head" else 2)
                    assert "b" not in bank
        runs[disturbed] = bank.state_dict("sst2")
        assert all(p.requires_grad == (engine == "backprop") for p in bank.parameters("sst2").values())
    assert_close_rel(runs[True], runs[False], rel=0.0)
