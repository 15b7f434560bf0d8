"""ColA's collaboration runs: K users' adapters trained on ONE base in one run, through the tenant bank.

A ColA run name with ``~`` between auxiliary models (``dolly-15k_gpt2_clm_cola-lowrank~linear-1_32``) or a
trailing ``_col`` describes several users collaborating on one frozen base, which the ColA repository runs as
one experiment (``test_cola_dist.py``). cotune runs it as a ``TrainConfig`` with ``users``: one entry per user,
naming that user's adapter family. What happens:

* the train rows (after ``train_limit`` / ``val_size``) are dealt round-robin into K disjoint shards, one per
  user (each user fine-tunes on its own data);
* every user is a tenant of one ``TenantBank`` (its adapters plus its own task head for classification) and
  ``MultiTenantTrainer`` trains them all from mixed batches: ``batch_size`` rows of every user per step, one
  base forward/backward for all K, each user's update computed from its own rows only (``engine: gl`` is ColA's
  gradient learning with a fitter per user; ``engine.options.merged: true``, which ``_col`` sets, is ColA's
  collaborative merged mode: every row runs through ``W + mean_k ΔW_k``);
* at the end each user's adapter is scored on the validation split and saved (PEFT format) under
  ``output_dir/users/<user>/adapter``; ``results.json`` and the printed summary give each user's metrics.

Every engine of the registry trains users this way, with the run's engine options (``interval``, ...).
Not supported here (an error says so): ``--resume``.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

from cotune.errors import CotuneError
from cotune.training.config import TrainConfig


def user_ids(cfg: TrainConfig) -> list[str]:
    """``user<k>-<family>`` for each entry of ``cfg.users``."""
    return [f"user{k}-{fam}" for k, fam in enumerate(cfg.users or [])]


def _check(cfg: TrainConfig) -> None:
    if not cfg.users or len(cfg.users) < 1:
        raise CotuneError("a collaboration needs users: one adapter family per user, e.g. users=[lowrank,linear]")
    if cfg.resume:
        raise CotuneError("a collaboration run cannot be resumed; start it again with --overwrite")


def _stream(task: Any, rows: list[Any], batch_size: int, seed: int) -> Iterator[dict]:
    """Collated batches of ``rows`` in a seeded order, epoch after epoch (the scheduler stops at max_steps)."""
    from cotune.tasks.order import epoch_order

    epoch = 0
    while True:
        order = epoch_order(len(rows), seed, epoch)
        for i in range(0, len(order), batch_size):  # the scheduler re-cuts to batch_size rows per step
            yield task.collate([rows[j] for j in order[i : i + batch_size]])
        epoch += 1


def train_collaboration(cfg: TrainConfig, verbose: bool = True) -> dict[str, Any]:
    """Train ``cfg.users`` together on one base (see the module docstring); returns the summary."""
    _check(cfg)
    from cotune.adapters import set_active
    from cotune.tasks import make_task
    from cotune.tasks.progress import progress
    from cotune.tenants import MixedBatchScheduler, MultiTenantTrainer, TenantBank
    from cotune.training.config import save_config
    from cotune.training.logging import JsonlLogger
    from cotune.training.reporting import make_reporters
    from cotune.training.trainer import (
        HEAD_TASKS,
        Trainer,
        adapter_configs,
        check_model_available,
        isolated_rng,
        seed_everything,
        split_rows,
    )

    t0 = time.perf_counter()
    check_model_available(cfg.model, cfg.task.kind)
    shell = Trainer(cfg)
    shell._prepare_output()  # the same output_dir rules as a single run (overwrite, foreign folders)
    out = shell.out
    log = JsonlLogger(out / "log.jsonl", make_reporters(cfg.report_to, out, cfg.to_dict()))
    seed_everything(cfg.seed)
    task = make_task(cfg.task.kind, cfg.task.data, model=cfg.model, **cfg.task_options())
    model = task.build_model(cfg.model).to(cfg.device_name()).train()
    bank = TenantBank(model)
    merged = bool(cfg.engine.options.get("merged", False))
    trainer = MultiTenantTrainer(bank, engine=cfg.engine.name, merged=merged,
                                 placement=str(cfg.engine.options.get("placement", "inline")))
    # every other engine option (interval, wire_dtype, eps, ...) goes to each user's engine as it is
    user_options = {k: v for k, v in cfg.engine.options.items() if k not in ("merged", "placement")}
    train_rows, held = split_rows(task.load("train").rows, cfg)
    ids = user_ids(cfg)
    shards = [train_rows[k :: len(ids)] for k in range(len(ids))]
    if min(len(s) for s in shards) < 1:
        raise CotuneError(f"{len(train_rows)} train rows cannot be shared by {len(ids)} users")
    steps = cfg.max_steps or math.ceil(cfg.epochs * max(len(s) for s in shards) / cfg.batch_size)
    optim = cfg.optim if cfg.optim.total_steps is not None else replace(cfg.optim, total_steps=steps)
    save_config(replace(cfg, optim=optim, overwrite=False), out / "config.yaml")
    head = getattr(task, "num_labels", None) if cfg.task.kind in HEAD_TASKS else None
    sched = MixedBatchScheduler()
    for k, (tid, family) in enumerate(zip(ids, cfg.users or [])):
        options = dict(cfg.method.options) if family == cfg.method.name else {}
        user_cfg = replace(cfg, method=replace(cfg.method, name=family, options=options, train_head=False))
        bank.add_tenant(tid, adapter_configs(model, user_cfg), head=head)
        trainer.add(tid, optim, **user_options)  # each user: its own engine, optimizer and schedule
        sched.join(tid, _stream(task, shards[k], cfg.batch_size, cfg.seed + k), rows_per_step=cfg.batch_size,
                   max_steps=steps)
    log.log({"type": "start", "step": 0, "users": dict(zip(ids, cfg.users or [])),
             "train_rows": {t: len(s) for t, s in zip(ids, shards)}, "total_steps": steps, "merged": merged})
    from tqdm.auto import tqdm

    losses: dict[str, list[float]] = {t: [] for t in ids}
    try:
        with tqdm(total=steps, desc="train (all users)", disable=not cfg.progress, dynamic_ncols=True) as bar:
            for step, batch in enumerate(sched, 1):
                for tid, r in trainer.step(batch).items():
                    losses[tid].append(r.loss)
                if cfg.log_every and (step % cfg.log_every == 0 or step == steps):
                    window = {t: v[-cfg.log_every :] for t, v in losses.items() if v}
                    log.log({"type": "train", "step": step, **{f"loss/{t}": sum(v) / len(v) for t, v in window.items()}})
                bar.update(1)
    except BaseException:
        log.close()  # report_to sinks (TensorBoard, W&B) end with the run
        raise
    finally:
        trainer.close()  # stops the users' fitters (threads, processes, Ray actors) even when a step failed
    val = held if held is not None else list(task.load(cfg.val_split).rows)
    users: dict[str, Any] = {}
    model.eval()
    for tid, family in zip(ids, cfg.users or []):
        set_active(model, tid)
        with isolated_rng(), progress(cfg.progress):
            metrics = {k: float(v) for k, v in task.evaluate(model, val, cfg.eval_batch_size, cfg.eval_limit).items()}
        folder = bank.save_tenant(tid, out / "users" / tid / "adapter")
        # The user's own run config beside its adapter: `cotune eval/export/chat --adapter` rebuild it from that.
        own = replace(cfg, users=None, optim=optim, overwrite=False, output_dir=str(out / "users" / tid),
                      method=replace(cfg.method, name=family,
                                     options=dict(cfg.method.options) if family == cfg.method.name else {}),
                      engine=replace(cfg.engine, options={k: v for k, v in cfg.engine.options.items() if k != "merged"}))
        save_config(own, out / "users" / tid / "config.yaml")
        users[tid] = {"family": family, "train_rows": len(shards[ids.index(tid)]), "steps": trainer.steps[tid],
                      "skipped": trainer.skipped[tid], "validation": metrics, "adapter": str(folder)}
        log.log({"type": "eval", "step": steps, "split": "validation", "user": tid, **metrics})
    summary = {"output_dir": str(out), "metric": task.metric, "steps": steps, "merged": merged,
               "engine": cfg.engine.name, "users": users, "seconds": round(time.perf_counter() - t0, 1)}
    (out / "results.json").write_text(json.dumps(summary, indent=1))
    log.log({"type": "end", "step": steps, "seconds": summary["seconds"]})
    log.close()
    if verbose:
        for tid, u in users.items():
            print(f"{tid:<24} {task.metric} {u['validation'].get(task.metric, float('nan')):.4f}  "
                  f"({u['train_rows']} train rows)", file=sys.stderr)
    return summary
