"""Quality: trainable parameters and dev scores per method and engine (GLUE/FPB with MiniLM; SmolLM2 on GSM8K,
the Alpaca demo and MMLU), in the style of the AdaKron/LoRETTA result tables.

    python -m benchmarks quality                       # the budgeted subset (about 30-40 min on 2 shared cores)
    python -m benchmarks quality --preset full --suite all   # every cell (hours on a CPU)
    python -m benchmarks quality --tasks sst2,rte --methods lowrank --engines backprop,gl,zo
    python -m benchmarks quality --smoke               # RTE, lowrank x 3 engines, 2 steps (< 30 s)
    python -m benchmarks quality --smoke --suite llm   # SmolLM2 on GSM8K, 2 steps, 2 rows generated, 4 MMLU rows
    python -m benchmarks quality --suite llm --llm-tasks alpaca   # one SmolLM2 data set
    python -m benchmarks quality --suite llm --preset cola --device cuda --llm-steps 300 --llm-batch-size 16 \
        --llm-eval 747 --mmlu 1404 --eval-batch 128   # CoLA's claim on SmolLM2 (LoRA, HydraLoRA, CoLA 2|3), a GPU
    python -m benchmarks quality --jobs 2 ...          # two cells at once (one per core, 1 thread each)
    python -m benchmarks quality --report --merge runs/bench/other   # one table from several output folders
    python -m benchmarks quality --report --preset cola_aux --tasks stsb --out DIR --merge ...   # one claim's cells
    python -m benchmarks quality --report ... --merge SEED0 SEED1 SEED2   # + each seed, mean ± sd, paired gap to LoRA

Every cell is one ``cotune.training.train`` run (the same loop as ``cotune train``) with FIXED budgets: seed 0,
``--steps`` optimizer steps (default 300) of batch 16, max_length 128, evaluation on the validation split
every ``--steps/3`` steps; the reported score is the best validation score (selection on dev only; the test
splits are never read). Datasets without a published dev split (FPB, the Alpaca demo, GSM8K, MMLU) use the
task's deterministic seeded carve of the train file (10%). Each cell runs in a fresh subprocess, so one
cell's state (threads, RNG, memory) cannot leak into the next.

Methods (``METHODS``): lowrank (LoRA r 8, alpha 8, query/value), cola (CoLA r 8, alpha 16, M|N 2|3, all
linear layers, PiSSA init), hydra (HydraLoRA, r 8, 3 B's), kron (AdaKron r 48), kron_mix / kron_full (partial /
full MAdaKron, 2 experts), loretta_adp / loretta_rep (LoRETTA TT rank 5, tensorized head), bottleneck (Houlsby,
64), pfeiffer (48) and houlsby (24) at the AdaKron seed's budget, linear / mlp (ColA's full-rank linear and MLP
auxiliary models on query/value), full (every parameter); each at its family's ``default_lr`` (full: 5e-5), or
every cell at ``--lr``.
``--preset adakron|loretta|cola_aux`` runs one seed's claim on ``--tasks`` (``CLAIMS``): LoRA, Pfeiffer, Houlsby,
AdaKron, partial and full MAdaKron and full fine-tuning; LoRA, bottleneck, LoRETTA adp and rep and full
fine-tuning; ColA's low-rank, linear and MLP auxiliary models with backprop, gl and gl4 (interval I = 4).
Classification heads are trained with every method (a ``full`` head, or the method's own tensorized head).
SmolLM2 cells (``--suite llm``): ``LLM_METHODS`` at one rate (``LLM_LR``), trained on GSM8K or the Alpaca demo and
scored on the carved dev rows (GSM8K exact match by greedy generation, Alpaca ROUGE-L) and on MMLU's carved rows in
both scorings (cloze and letter), after training and, in each data set's first cell, before it. ``--device cuda``
runs every cell on a GPU.
Engines: backprop, gl (ColA gradient learning, fitter in a thread, interval 1; the same trajectory as backprop
up to float rounding), gl4 (the same with interval I = 4: one update per 4 micro-batches on their mean,
``--steps`` counting micro-batches), zo (MeZO, ZO-SGD, eps 1e-3, one direction; the same number of steps — far
too few for MeZO, which papers run for 10^4-10^5 steps; stated, not hidden).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from benchmarks._common import (
    DATA,
    fmt,
    line_plot,
    machine,
    markdown_table,
    out_dir,
    run_isolated,
    set_offline,
    write_json,
)
from cotune.adapters.families.cola import COLA_DEFAULT_TARGETS

#: task -> (data folder under the shared data root, primary metric key, table column)
GLUE_TASKS: dict[str, tuple[str, str, str]] = {
    "sst2": ("glue/SST-2", "accuracy", "SST-2 (acc)"),
    "cola": ("glue/CoLA", "mcc", "CoLA (MCC)"),
    "mrpc": ("glue/MRPC", "f1", "MRPC (F1)"),
    "rte": ("glue/RTE", "accuracy", "RTE (acc)"),
    "stsb": ("glue/STS-B", "pearson", "STS-B (Pearson)"),
    "fpb": ("fpb", "accuracy", "FPB (acc)"),
}
#: method -> (cotune method name, options, backprop/gl learning rate, optimizer). A rate of None is the method's
#: ``default_lr`` (its family's rate from benchmarks/lr_sweep.across, what ``cotune train`` uses when ``optim.lr``
#: is left out); the grid in docs/RESULTS.md's "Quality" section ran before the sweep, at the rates it states.
METHODS: dict[str, tuple[str, dict[str, Any], float | None, str]] = {
    "lowrank": ("lowrank", {"r": 8, "lora_alpha": 8}, None, "adamw"),
    "cola": ("cola", {"r": 8, "lora_alpha": 16, "num_A": 2, "num_B": 3}, None, "adamw"),
    "hydra": ("hydra", {"r": 8, "lora_alpha": 16, "num_B": 3}, None, "adamw"),
    "kron": ("kron", {"r": 48}, None, "adamw"),
    "kron_mix": ("kron", {"r": 48, "mixture": "partial", "num_experts": 2}, None, "adamw"),
    "kron_full": ("kron", {"r": 48, "mixture": "full", "num_experts": 2}, None, "adamw"),
    "loretta_adp": ("loretta_adp", {}, None, "adam"),
    "loretta_rep": ("loretta_rep", {}, None, "adam"),
    "bottleneck": ("bottleneck", {"bottleneck_size": 64}, None, "adamw"),
    # the AdaKron seed's baselines at its parameter budget (0.9 M each on BERT-base): one adapter of 48 per
    # layer after the feed-forward (Pfeiffer), or two of 24 after attention and feed-forward (Houlsby)
    "pfeiffer": ("pfeiffer", {"bottleneck_size": 48}, None, "adamw"),
    "houlsby": ("houlsby", {"bottleneck_size": 24}, None, "adamw"),
    "linear": ("linear", {}, None, "adamw"),
    "mlp": ("mlp", {}, None, "adamw"),
    "full": ("full", {"target_modules": "all"}, 5e-5, "adamw"),
}
#: ``--preset`` name -> (methods, engines): each seed's claim as its own table.
CLAIMS: dict[str, tuple[list[str], list[str]]] = {
    "adakron": (["lowrank", "pfeiffer", "houlsby", "kron", "kron_mix", "kron_full", "full"], ["backprop"]),
    "loretta": (["lowrank", "bottleneck", "loretta_adp", "loretta_rep", "full"], ["backprop"]),
    "cola_aux": (["lowrank", "linear", "mlp"], ["backprop", "gl", "gl4"]),
}
ENGINES = ("backprop", "gl", "gl4", "zo")
#: gradient-learning engines by their update interval I (ColA: one adapter update per I micro-batches, on their mean)
GL_INTERVAL = {"gl": 1, "gl4": 4}
ZO = {"lr": 1e-4, "eps": 1e-3, "full_lr": 1e-6}
#: Engines a SmolLM2 cell trains with (MeZO on SmolLM2 is benchmarks/mezo_prompt; gl4 is a GLUE-cell variant).
LLM_ENGINES = ("backprop", "gl")
#: Which engines run a method in the full preset (gl needs adapters with a site; full FT trains every weight).
ENGINES_OF = {m: ENGINES for m in METHODS} | {"full": ("backprop", "zo")}
#: The budgeted subset actually run for docs/RESULTS.md: (task, method, engine).
BUDGET = [
    ("sst2", "lowrank", "backprop"), ("sst2", "lowrank", "gl"), ("sst2", "lowrank", "zo"),
    ("sst2", "kron", "backprop"), ("sst2", "loretta_adp", "backprop"), ("sst2", "full", "backprop"),
    ("mrpc", "lowrank", "backprop"), ("mrpc", "lowrank", "gl"), ("mrpc", "lowrank", "zo"),
    ("rte", "lowrank", "backprop"),
]
#: SmolLM2 cells: data set -> (data path, primary metric, max_length, max_new_tokens)
LLM_TASKS: dict[str, tuple[str, str, int, int]] = {
    "gsm8k": ("gsm8k", "exact_match", 384, 256),
    "alpaca": ("instruct/alpaca_en_demo.json", "rouge_l", 384, 64),
}
#: SmolLM2 methods: (cotune method, options), all at ``LLM_LR``. lowrank is LoRA on q/v (the family's default
#: placement); the CoLA seed's comparison puts LoRA, HydraLoRA and CoLA on every linear layer of the decoder, which
#: is HydraLoRA's and CoLA's own default placement, so lowrank_all takes that placement.
LLM_METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    "lowrank": ("lowrank", {"r": 8, "lora_alpha": 16}),
    "lowrank_all": ("lowrank", {"r": 8, "lora_alpha": 16, "target_modules": COLA_DEFAULT_TARGETS["llama"]}),
    "hydra": ("hydra", {"r": 8, "lora_alpha": 16, "num_B": 3}),
    "cola": ("cola", {"r": 8, "lora_alpha": 16, "num_A": 2, "num_B": 3}),
}
#: One rate for every SmolLM2 method, so that the comparison is of the adapters (the CoLA seed also trains all of
#: its methods at one rate, 5e-5 for 3-8 B models; 2e-4 is the usual LoRA SFT rate at this size).
LLM_LR = 2e-4
#: ``--preset`` name -> SmolLM2 methods (``--suite llm``): CoLA 2|3 against LoRA and HydraLoRA.
LLM_CLAIMS: dict[str, list[str]] = {"cola": ["lowrank_all", "hydra", "cola"]}


def method_lr(method: str) -> float:
    """The backprop/gl learning rate of ``METHODS[method]``: its own, or its cotune method's ``default_lr``."""
    from cotune.adapters.methods import default_lr

    name, _, lr, _ = METHODS[method]
    return default_lr(name) if lr is None else lr


# -- one cell (runs inside a fresh subprocess) ------------------------------------------------------------------
def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _split(recs: list[dict]) -> tuple[list[dict], list[dict]]:
    """A log's eval records and its train records."""
    return [r for r in recs if r.get("type") == "eval"], [r for r in recs if r.get("type") == "train"]


def _read_log(path: Path) -> tuple[list[dict], list[dict]]:
    return _split(_records(path))


def _curves(evals: list[dict], trains: list[dict], metric: str) -> dict[str, Any]:
    """A cell's final dev score and its curves (dev metric, training loss, dev loss per step) from its log."""
    return {
        "final": evals[-1].get(metric) if evals else None,
        "curve": [(e["step"], e.get(metric)) for e in evals], "loss": [(r["step"], r["loss"]) for r in trains],
        "dev_loss": [(e["step"], e.get("loss")) for e in evals],
    }


def glue_config(task: str, method: str, engine: str, steps: int, batch: int, max_len: int, seed: int,
                out: str, eval_every: int, train_limit: int | None = None, eval_limit: int | None = None,
                pooling: str = "auto", lr: float | None = None, device: str = "cpu") -> Any:
    """The ``TrainConfig`` of one GLUE/FPB cell (``lr``: instead of the method's, e.g. for a sweep)."""
    from cotune.training.config import config_from_dict

    data, _, _ = GLUE_TASKS[task]
    name, options, _, opt = METHODS[method]
    engine_opts: dict[str, Any] = {}
    interval = GL_INTERVAL.get(engine, 1)  # the schedule counts updates: steps / I of them
    optim: dict[str, Any] = {"optimizer": opt, "lr": method_lr(method) if lr is None else lr, "scheduler": "linear",
                             "warmup_steps": max(1, steps // 10 // interval)}
    if engine in GL_INTERVAL:
        engine_opts = {"placement": "thread", "interval": interval}
    elif engine == "zo":
        engine_opts = {"eps": ZO["eps"], "zo_optimizer": "sgd"}
        zo_lr = ZO["full_lr"] if method == "full" else ZO["lr"]
        optim = {"optimizer": "sgd", "lr": zo_lr if lr is None else lr, "scheduler": "constant"}
    return config_from_dict({
        "model": "minilm",
        "task": {"kind": "seq_cls", "data": str(DATA / data), "options": {"max_length": max_len, "pooling": pooling}},
        "method": {"name": name, "options": dict(options)},
        "engine": {"name": "gl" if engine in GL_INTERVAL else engine, "options": engine_opts},
        "optim": optim, "seed": seed, "batch_size": batch, "eval_batch_size": 64, "max_steps": steps,
        "train_limit": train_limit, "eval_every": eval_every, "eval_limit": eval_limit, "save_every": 0,
        "keep_checkpoints": 1, "overwrite": True, "progress": False, "output_dir": out, "device": device,
    })


def run_cell(task: str, method: str, engine: str, steps: int, batch: int, max_len: int, seed: int, out: str,
             eval_every: int, threads: int = 1, train_limit: int | None = None,
             eval_limit: int | None = None, pooling: str = "auto", lr: float | None = None,
             device: str = "cpu") -> dict[str, Any]:
    """Train one GLUE/FPB cell and return its scores, curve and cost."""
    import torch

    from cotune.training.trainer import train

    set_offline()
    torch.set_num_threads(threads)
    cfg = glue_config(task, method, engine, steps, batch, max_len, seed, out, eval_every, train_limit, eval_limit,
                      pooling, lr, device)
    t0 = time.perf_counter()
    res = train(cfg, verbose=False)
    evals, trains = _read_log(Path(out) / "log.jsonl")
    metric = GLUE_TASKS[task][1]
    return {
        "suite": "glue", "task": task, "method": method, "engine": engine, "metric": metric, "pooling": pooling,
        "lr": cfg.optim.lr, "device": device, "best": res.validation.get(metric), "best_step": res.best_step,
        "validation": res.validation,
        "trainable_params": res.trainable_parameters, "train_seconds": res.train_seconds,
        "seconds": time.perf_counter() - t0, "steps": res.steps, **_curves(evals, trains, metric),
        "config": cfg.to_dict(),
    }


def cell_from_log(run: Path) -> dict[str, Any] | None:
    """A GLUE cell's result rebuilt from its run folder's ``log.jsonl`` (None unless the run ended).

    What ``--report`` uses for a cell that finished while its parent process did not record it (the parent
    was stopped, or died): its best validation score (the first best, as the trainer selects), curve and cost.
    """
    log = run / "log.jsonl"
    task, _, rest = run.name.partition("_")
    method, _, engine = rest.rpartition("_")
    if not log.exists() or task not in GLUE_TASKS or method not in METHODS or engine not in ENGINES:
        return None
    recs = _records(log)
    start = next((r for r in recs if r["type"] == "start"), None)
    end = next((r for r in recs if r["type"] == "end"), None)
    evals, trains = _split(recs)
    metric = GLUE_TASKS[task][1]
    scored = [e for e in evals if e.get(metric) is not None]
    if start is None or end is None or not scored:
        return None
    best = max(scored, key=lambda e: e[metric])  # max() keeps the first of equal scores, as the trainer does
    config = yaml.safe_load((run / "config.yaml").read_text()) if (run / "config.yaml").exists() else {}
    return {
        "suite": "glue", "task": task, "method": method, "engine": engine, "metric": metric,
        "best": best[metric], "best_step": best["step"],
        "validation": {k: v for k, v in best.items() if k not in ("type", "step", "split")},
        "trainable_params": start["trainable_parameters"], "train_seconds": end["seconds"], "steps": end["step"],
        **_curves(evals, trains, metric), "config": config, "recovered_from": str(log),
    }


def run_llm_cell(data: str, steps: int, batch: int, seed: int, out: str, eval_limit: int, mmlu_limit: int,
                 threads: int = 1, engine: str = "backprop", train_limit: int | None = None,
                 max_length: int | None = None, max_new_tokens: int | None = None, method: str = "lowrank",
                 device: str = "cpu", before: bool = True, eval_batch: int = 8) -> dict[str, Any]:
    """SmolLM2 + ``LLM_METHODS[method]`` on GSM8K or the Alpaca demo; MMLU accuracy (cloze and letter) after, and
    before when ``before`` (the base model: one cell per data set is enough, the base is the same for all).

    ``train_limit``, ``max_length`` and ``max_new_tokens`` (default: ``LLM_TASKS``) only shrink the smoke run;
    ``eval_batch`` is the rows scored or generated at once (a GPU's speed; the loss pass keeps 8)."""
    import torch

    from cotune.tasks import make_task
    from cotune.training.config import config_from_dict
    from cotune.training.trainer import Trainer

    set_offline()
    torch.set_num_threads(threads)
    path, metric, max_len, new_tokens = LLM_TASKS[data]
    max_len, new_tokens = max_length or max_len, max_new_tokens or new_tokens
    name, options = LLM_METHODS[method]
    cfg = config_from_dict({
        "model": "smollm2",
        "task": {"kind": "causal_lm", "data": str(DATA / path),
                 "options": {"max_length": max_len, "max_new_tokens": new_tokens}},
        "method": {"name": name, "options": dict(options)},
        "engine": {"name": engine, "options": {"placement": "thread"} if engine == "gl" else {}},
        "optim": {"optimizer": "adamw", "lr": LLM_LR, "scheduler": "linear", "warmup_steps": max(1, steps // 10)},
        "seed": seed, "batch_size": batch, "eval_batch_size": eval_batch, "max_steps": steps, "eval_every": 0,
        "train_limit": train_limit, "eval_limit": eval_limit, "save_every": 0, "keep_checkpoints": 1,
        "overwrite": True, "progress": False, "output_dir": out, "device": device,
    })
    task = make_task("causal_lm", str(DATA / path), model="smollm2", max_length=max_len, max_new_tokens=new_tokens)
    mmlu = {s: make_task("multiple_choice", str(DATA / "mmlu"), model="smollm2", scoring=s)
            for s in ("cloze", "letter")}
    mmlu_rows = mmlu["cloze"].load("validation").rows[:mmlu_limit]

    def score_mmlu(model: torch.nn.Module) -> dict[str, float]:
        return {s: t.evaluate(model, mmlu_rows, eval_batch)["accuracy"] for s, t in mmlu.items()}

    scores: dict[str, Any] = {"before": None, "mmlu_before": None, "mmlu_letter_before": None}
    if before:  # the base model (every method starts as the identity: zero B, or CoLA's PiSSA split of W)
        base = task.build_model("smollm2").to(cfg.device_name())
        with torch.no_grad():
            scores["before"] = task.evaluate(base, task.load("validation").rows, eval_batch, eval_limit).get(metric)
            mm = score_mmlu(base)
        scores |= {"mmlu_before": mm["cloze"], "mmlu_letter_before": mm["letter"]}
        del base
    tr = Trainer(cfg, verbose=False)
    res = tr.train()
    tr.load_best()
    with torch.no_grad():
        mm = score_mmlu(tr.model)
    _, trains = _read_log(Path(out) / "log.jsonl")
    return {
        "suite": "llm", "task": data, "method": method, "engine": engine, "metric": metric, "device": device,
        **scores, "best": res.validation.get(metric), "validation": res.validation,
        "mmlu_after": mm["cloze"], "mmlu_letter_after": mm["letter"],
        "mmlu_rows": len(mmlu_rows), "eval_rows": eval_limit, "trainable_params": res.trainable_parameters,
        "train_seconds": res.train_seconds, "steps": res.steps, "loss": [(r["step"], r["loss"]) for r in trains],
        "config": cfg.to_dict(),
    }


# -- tables and plots --------------------------------------------------------------------------------------------
def seed_of(r: dict[str, Any]) -> int:
    """The seed a cell trained with (its recorded config; a failed cell records it beside its error)."""
    return r.get("config", {}).get("seed", r.get("seed", 0))


def rate_of(r: dict[str, Any]) -> str:
    """A cell's learning rate as its config ran it, written the way the docs write rates (``3e-3``)."""
    lr = r.get("config", {}).get("optim", {}).get("lr", r.get("lr"))
    return "—" if lr is None else np.format_float_scientific(lr, trim="-", exp_digits=1)


def cell_key(r: dict[str, Any]) -> tuple:
    """What makes two cells the same run: a later cell of the same key is a rerun and replaces the earlier one;
    cells of another seed, rate or budget are kept beside it."""
    return r["suite"], r["task"], r.get("method"), r.get("engine"), seed_of(r), rate_of(r), r.get("steps")


def row_order(method: str, engine: str, *config: str | int | None) -> tuple:
    """Where a table puts a row: by method and engine in the order METHODS and ENGINES list them, then by rate
    and steps as numbers (``3e-4`` before ``1e-3``; a cell that recorded neither first)."""
    return (list(METHODS).index(method), ENGINES.index(engine),
            *(-1.0 if v is None or v == "—" else float(v) for v in config))


def glue_table(results: list[dict[str, Any]]) -> str:
    """Rows: method (engine), and its rate and budget where some method ran several; columns: trainable
    parameters, each task's best dev score ×100 (the mean over seeds where a method ran several; ``seeds_table``
    gives each), average."""
    tasks = [t for t in GLUE_TASKS if any(r["task"] == t for r in results)]
    configs = {(r["task"], r["method"], r["engine"], rate_of(r), r.get("steps")) for r in results}
    by_config = len(configs) > len({c[:3] for c in configs})  # a method ran several rates or budgets on one task

    def row_key(r: dict[str, Any]) -> tuple:
        return (r["method"], r["engine"], *((rate_of(r), r.get("steps")) if by_config else ()))

    by_row: dict[tuple, list[dict[str, Any]]] = {}
    for r in results:
        by_row.setdefault(row_key(r), []).append(r)
    several = len({seed_of(r) for r in results}) > 1
    headers = ["method", "engine", *(["lr", "steps"] if by_config else []), "# params (K)",
               *(GLUE_TASKS[t][2] for t in tasks), "Avg.", "train s/cell", *(["seeds"] if several else [])]
    rows = []
    for key in sorted(by_row, key=lambda k: row_order(*k)):
        cells = by_row[key]
        scores = []
        for t in tasks:
            best = [r["best"] for r in cells if r["task"] == t and r["best"] is not None]
            scores.append(100 * sum(best) / len(best) if best else None)
        got = [s for s in scores if s is not None]
        params = max(r["trainable_params"] for r in cells) / 1000  # heads differ per task (STS-B: 1)
        secs = sum(r["train_seconds"] for r in cells) / len(cells)
        rows.append([*key, params, *scores, sum(got) / len(got) if len(got) == len(tasks) else None, secs,
                     *([len({seed_of(r) for r in cells})] if several else [])])
    return markdown_table(headers, rows, digits=1)


def seeds_table(results: list[dict[str, Any]], baseline: str = "lowrank") -> str:
    """Per task, one row per method, engine, rate and budget: each seed's best dev score ×100, the mean ± sample
    sd, and the gap to ``baseline`` (its backprop row) seed by seed (baseline minus row: positive is behind), the
    mean gap and the two-sided paired t-test's p over the seeds both ran (``scipy.stats.ttest_rel``). A row pairs
    with the baseline's cells of its own budget (steps), never across budgets."""
    from scipy.stats import ttest_rel

    text = []
    for task in [t for t in GLUE_TASKS if any(r["task"] == t for r in results)]:
        rs = [r for r in results if r["task"] == task and r["best"] is not None]
        seeds = sorted({seed_of(r) for r in rs})
        groups: dict[tuple, dict[int, float]] = {}
        for r in rs:
            groups.setdefault((r["method"], r["engine"], rate_of(r), r.get("steps")), {})[seed_of(r)] = 100 * r["best"]
        groups = dict(sorted(groups.items(), key=lambda kv: row_order(*kv[0])))  # rows in glue_table's order
        rows = []
        for (m, e, lr, steps), by_seed in groups.items():
            base = max((g for k, g in groups.items() if k[:2] == (baseline, "backprop") and k[3] == steps),
                       key=len, default={})
            vals = list(by_seed.values())
            sd = f" ± {statistics.stdev(vals):.1f}" if len(vals) > 1 else ""
            paired = [] if by_seed is base else [s for s in seeds if s in by_seed and s in base]
            gaps = [base[s] - by_seed[s] for s in paired]
            p = None
            if len(paired) > 1 and len(set(gaps)) > 1:
                p = f"{ttest_rel([base[s] for s in paired], [by_seed[s] for s in paired]).pvalue:.2f}"
            rows.append([m, e, lr, steps, *(by_seed.get(s) for s in seeds), f"{statistics.mean(vals):.1f}{sd}",
                         " / ".join(fmt(g, 1) for g in gaps) or None, statistics.mean(gaps) if gaps else None, p])
        headers = ["method", "engine", "lr", "steps", *(f"seed {s}" for s in seeds), "mean ± sd",
                   f"gap to {baseline}, per seed", "mean gap", "p (paired t)"]
        text.append(f"{GLUE_TASKS[task][2]}, best dev score per seed\n\n" + markdown_table(headers, rows, digits=1))
    return "\n\n".join(text)


def llm_table(results: list[dict[str, Any]]) -> str:
    """Rows: the base model per data set (where a cell scored it), then each method; scores ×100."""
    headers = ["data", "method", "engine", "# params (K)", "metric", "dev score", "MMLU cloze", "MMLU letter",
               "steps", "train s", "device"]
    rows: list[list[Any]] = []

    def pct(x: float | None) -> float | None:
        return None if x is None else 100 * x

    for data in dict.fromkeys(r["task"] for r in results):
        rs = [r for r in results if r["task"] == data]
        base = next((r for r in rs if r.get("before") is not None), None)
        if base is not None:
            rows.append([data, "base model", "", 0, base["metric"], pct(base["before"]), pct(base["mmlu_before"]),
                         pct(base.get("mmlu_letter_before")), 0, None, base.get("device", "cpu")])
        rows += [[data, r.get("method", "lowrank"), r["engine"], r["trainable_params"] / 1000, r["metric"],
                  pct(r["best"]), pct(r["mmlu_after"]), pct(r.get("mmlu_letter_after")), r["steps"],
                  r["train_seconds"], r.get("device", "cpu")] for r in rs]
    return markdown_table(headers, rows, digits=1)


def curve_by_update(r: dict[str, Any], series: str = "curve") -> tuple[list[float], list[float]]:
    """A cell's dev curve (or, with ``series="loss"``, its training loss) against optimizer updates: its steps
    count micro-batches, ``I`` of them per update for ``gl4`` (``GL_INTERVAL``), so cells of different intervals
    line up where their schedules do (and ``gl4`` lines up with backprop at ``I`` times its batch)."""
    interval = GL_INTERVAL.get(r["engine"], 1)
    return [step / interval for step, _ in r[series]], [value for _, value in r[series]]


def plot_curves(results: list[dict[str, Any]], out: Path) -> list[Path]:
    """Per task: dev metric vs optimizer update, one line per method/engine; per method: training loss vs update.
    A line names its rows per update where the cells of a plot differ in them (``gl4`` steps once per ``I``
    micro-batches), its seed where they differ in seeds, and its rate and steps where two lines would share a
    name (one method at two budgets)."""
    def rows(r: dict[str, Any]) -> int | None:
        batch = r.get("config", {}).get("batch_size")
        return batch and batch * GL_INTERVAL.get(r["engine"], 1)

    def label(r: dict[str, Any], name: str, rs: list[dict[str, Any]]) -> str:
        if len({rows(c) for c in rs}) > 1:
            name += f", {rows(r)} rows/update"
        return name + f", seed {seed_of(r)}" if len({seed_of(c) for c in rs}) > 1 else name

    def named(pairs: list[tuple[str, dict[str, Any]]], series: str) -> dict[str, tuple[list[float], list[float]]]:
        counts = Counter(name for name, _ in pairs)
        return {name + (f", lr {rate_of(r)}, {r.get('steps')} steps" if counts[name] > 1 else ""):
                curve_by_update(r, series) for name, r in pairs}

    paths = []
    for task in sorted({r["task"] for r in results if r["suite"] == "glue"}):
        rs = [r for r in results if r["task"] == task and r["suite"] == "glue" and r["curve"]]
        curves = named([(label(r, f"{r['method']} {r['engine']}", rs), r) for r in rs], "curve")
        paths.append(line_plot(out / f"curve_{task}.png", curves, "optimizer update", GLUE_TASKS[task][1],
                               f"{task}: validation {GLUE_TASKS[task][1]} (MiniLM)"))
        if len({seed_of(r) for r in rs}) > 1:  # one line per method across seeds: the pairing shows
            by_method: dict[str, list[tuple[int, float]]] = {}
            budgets = len({r.get("steps") for r in rs}) > 1
            for r in sorted(rs, key=seed_of):
                steps = f", {r['steps']} steps" if budgets else ""
                by_method.setdefault(f"{r['method']} {r['engine']} {rate_of(r)}{steps}", []).append(
                    (seed_of(r), r["best"]))
            paths.append(line_plot(out / f"seeds_{task}.png", {k: tuple(zip(*v)) for k, v in by_method.items()},
                                   "seed", f"best {GLUE_TASKS[task][1]}", f"{task}: best validation score per seed",
                                   clip_far_out=True))  # a lost seed (0.1 beside 0.85) would flatten the rest
    for method in sorted({r["method"] for r in results}):
        rs = [r for r in results if r["method"] == method and r["loss"]]
        curves = named([(label(r, f"{r['task']} {r['engine']}", rs), r) for r in rs], "loss")
        paths.append(line_plot(out / f"loss_{method}.png", curves, "optimizer update",
                               "training loss (mean over log window)", f"{method}: training loss"))
    return paths


# -- the suite ----------------------------------------------------------------------------------------------------
def glue_cells(args: argparse.Namespace) -> list[tuple[str, str, str]]:
    if args.preset == "budget" and not (args.tasks or args.methods or args.engines):
        return list(BUDGET)
    tasks = args.tasks.split(",") if args.tasks else list(GLUE_TASKS)
    claim_methods, claim_engines = CLAIMS.get(args.preset, (list(METHODS), list(ENGINES)))
    methods = args.methods.split(",") if args.methods else claim_methods
    engines = args.engines.split(",") if args.engines else claim_engines
    return [(t, m, e) for t in tasks for m in methods for e in engines if e in ENGINES_OF[m]]


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks quality", description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true",
                   help="glue: RTE, lowrank x backprop/gl/zo, 2 steps (< 30 s); llm: GSM8K, 2 steps, 2 rows scored")
    p.add_argument("--suite", default="glue", choices=["glue", "llm", "all"])
    p.add_argument("--llm-tasks", default=None, help="comma list of: " + ", ".join(LLM_TASKS))
    p.add_argument("--preset", default="budget", choices=["budget", "full", *CLAIMS, *LLM_CLAIMS],
                   help="budget: the subset in docs/RESULTS.md; full: every task x method x engine; "
                        "adakron | loretta | cola_aux: one seed's claim (CLAIMS: its methods and engines) on --tasks; "
                        "cola (--suite llm): LoRA, HydraLoRA and CoLA on SmolLM2 (LLM_CLAIMS)")
    p.add_argument("--tasks", default=None, help="comma list of: " + ", ".join(GLUE_TASKS))
    p.add_argument("--methods", default=None, help="comma list of: " + ", ".join(METHODS))
    p.add_argument("--engines", default=None, help="comma list of: " + ", ".join(ENGINES))
    p.add_argument("--steps", type=int, default=300, help="optimizer steps per GLUE cell")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=None,
                   help="every GLUE cell's learning rate instead of its family's default (a claim at another rate)")
    p.add_argument("--pooling", default="auto", choices=["auto", "model", "mean", "cls", "max"],
                   help="what the GLUE head reads (auto: MiniLM's own mean pooling; model: BERT's pooler)")
    p.add_argument("--llm-methods", default=None, help="comma list of: " + ", ".join(LLM_METHODS))
    p.add_argument("--llm-steps", type=int, default=100)
    p.add_argument("--llm-batch-size", type=int, default=4)
    p.add_argument("--llm-eval", type=int, default=40, help="validation rows scored by generation per LLM cell")
    p.add_argument("--mmlu", type=int, default=200, help="MMLU rows (carved validation) scored before/after")
    p.add_argument("--eval-batch", type=int, default=8, help="LLM rows scored or generated at once (GPU: 128+)")
    p.add_argument("--device", default="cpu", help="cpu | cuda | auto: where every cell trains and scores")
    p.add_argument("--threads", type=int, default=1, help="torch threads per cell")
    p.add_argument("--jobs", type=int, default=1, help="cells run at once (each in its own process)")
    p.add_argument("--cell-timeout", type=float, default=6 * 3600,
                   help="seconds one cell may run before it is recorded as failed (the others go on)")
    p.add_argument("--out", default=None, help="output folder (default runs/bench/quality)")
    p.add_argument("--report", action="store_true", help="only rebuild table.md and the plots from results.json")
    p.add_argument("--merge", nargs="+", default=[], metavar="DIR",
                   help="with --report: also take the cells of these output folders (a later cell replaces an "
                        "earlier one with the same task, method, engine, seed, rate and steps, e.g. a rerun of a "
                        "failed cell; cells of several seeds add a table of each seed, mean, sd and the paired "
                        "gap to --baseline); --preset/--tasks/--methods/--engines then choose which GLUE cells are kept")
    p.add_argument("--baseline", default="lowrank", choices=list(METHODS),
                   help="with several seeds: the method (backprop, same steps) each row's per-seed gap and "
                        "paired t-test use")
    return p.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse(argv)
    set_offline()
    for name, valid in (("tasks", GLUE_TASKS), ("methods", METHODS), ("engines", ENGINES), ("llm_tasks", LLM_TASKS),
                        ("llm_methods", LLM_METHODS)):
        bad = [x for x in (getattr(args, name) or "").split(",") if x and x not in valid]
        if bad:
            print(f"unknown {name} {bad}; valid: {', '.join(valid)}")
            return 2
    off = [e for e in (args.engines or "").split(",") if e and e not in LLM_ENGINES]
    if args.suite == "llm" and off:  # an llm run that would silently train nothing
        print(f"--suite llm trains with {' or '.join(LLM_ENGINES)}, not {off} (MeZO on SmolLM2: "
              "python -m benchmarks mezo_prompt)")
        return 2
    if args.suite == "all" and off:
        print(f"the SmolLM2 cells skip engines {off} (they train with {' or '.join(LLM_ENGINES)})")
    if args.merge and not args.report:  # merging only rebuilds tables; it must not silently start a new run
        print("--merge only works with --report (it merges existing results.json files)")
        return 2
    out = out_dir("quality", args.smoke, args.out)
    if args.report:
        merged: dict[tuple, dict[str, Any]] = {}
        note = None  # the folder's own hand-written provenance line, kept when results.json is rewritten
        for folder in [out, *map(Path, args.merge)]:
            path = folder / "results.json"
            saved = json.loads(path.read_text()) if path.exists() else {"results": []}
            if folder == out:
                note = saved.get("note")
            for r in saved["results"]:
                if saved.get("machine") and "measured_on" not in r:  # the top-level stamp is the report's
                    r["measured_on"] = saved["machine"]
                merged[cell_key(r)] = r
            # cells that ended but were never recorded (their parent stopped first) come back from their logs
            for run in sorted((folder / "runs").glob("*")) if (folder / "runs").is_dir() else []:
                r = cell_from_log(run)
                if r is None:
                    continue
                key = cell_key(r)
                if key not in merged or "error" in merged[key]:
                    merged[key] = r
                    print(f"recovered {run.name} from its log")
        if args.preset != "budget" or args.tasks or args.methods or args.engines:  # one claim's table from many runs
            wanted = set(glue_cells(args))
            merged = {k: r for k, r in merged.items() if k[0] != "glue" or k[1:4] in wanted}
        if args.merge or any("recovered_from" in r for r in merged.values()):
            write_json(out / "results.json", {"machine": machine(), **({"note": note} if note else {}),
                                              "merged_from": [str(out), *args.merge], "results": list(merged.values())})
        return report(list(merged.values()), out, args.baseline)
    results: list[dict[str, Any]] = []
    started = time.perf_counter()

    def save() -> None:
        write_json(out / "results.json", {"machine": machine(), "args": vars(args), "results": results,
                                          "wall_seconds": time.perf_counter() - started})

    if args.suite in ("glue", "all"):
        cells = [("rte", "lowrank", e) for e in ("backprop", "gl", "zo")] if args.smoke else glue_cells(args)

        def one(cell: tuple[str, str, str]) -> dict[str, Any]:
            task, method, engine = cell
            kw: dict[str, Any] = {
                "task": task, "method": method, "engine": engine, "steps": 2 if args.smoke else args.steps,
                "batch": 4 if args.smoke else args.batch_size, "max_len": 32 if args.smoke else args.max_length,
                "seed": args.seed, "out": str(out / "runs" / f"{task}_{method}_{engine}"),
                "eval_every": 1 if args.smoke else max(1, args.steps // 3), "threads": args.threads,
                "pooling": args.pooling, "device": args.device, "lr": args.lr,
            }
            if args.smoke:
                kw.update(train_limit=16, eval_limit=8)
            t0 = time.perf_counter()
            try:
                r = (run_cell(**kw) if args.smoke
                     else run_isolated("benchmarks.quality:run_cell", kw, timeout=args.cell_timeout))
            except (RuntimeError, subprocess.TimeoutExpired) as e:  # a failed cell must not lose the others
                print(f"  {task:5} {method:12} {engine:8} FAILED: {str(e).splitlines()[-1]}", flush=True)
                return {"suite": "glue", "task": task, "method": method, "engine": engine, "seed": args.seed,
                        "error": str(e)[-2000:]}
            print(f"  {task:5} {method:12} {engine:8} best {r['metric']} {r['best']:.4f} (step {r['best_step']}) "
                  f"params {r['trainable_params']}  {time.perf_counter() - t0:.0f} s", flush=True)
            return r

        # cells are independent subprocesses: --jobs N runs N at once (each with --threads torch threads); each
        # result is saved as soon as its cell ends, so a stopped run keeps every finished cell
        with ThreadPoolExecutor(max_workers=1 if args.smoke else max(1, args.jobs)) as pool:
            for future in as_completed([pool.submit(one, c) for c in cells]):
                results.append(future.result())
                save()
    if args.suite in ("llm", "all"):
        llm_tasks = args.llm_tasks.split(",") if args.llm_tasks else ["gsm8k"] if args.smoke else list(LLM_TASKS)
        llm_methods = (args.llm_methods.split(",") if args.llm_methods
                       else LLM_CLAIMS.get(args.preset, ["lowrank"]))
        llm_engines = [e for e in (args.engines or "backprop").split(",") if e in LLM_ENGINES]
        for data in llm_tasks:
            for i, (method, engine) in enumerate((m, e) for m in llm_methods for e in llm_engines):
                kw = {"data": data, "steps": args.llm_steps, "batch": args.llm_batch_size, "seed": args.seed,
                      "out": str(out / "runs" / f"smollm2_{data}_{method}_{engine}"), "eval_limit": args.llm_eval,
                      "mmlu_limit": args.mmlu, "threads": args.threads, "method": method, "engine": engine,
                      "device": args.device, "before": i == 0, "eval_batch": args.eval_batch}
                if args.smoke:
                    kw.update(steps=2, batch=2, eval_limit=2, mmlu_limit=4, train_limit=8, max_length=96,
                              max_new_tokens=8)
                try:
                    r = run_isolated("benchmarks.quality:run_llm_cell", kw, timeout=args.cell_timeout)
                except (RuntimeError, subprocess.TimeoutExpired) as e:
                    print(f"  smollm2 {data} {method} {engine} FAILED: {str(e).splitlines()[-1]}", flush=True)
                    results.append({"suite": "llm", "task": data, "method": method, "engine": engine,
                                    "error": str(e)[-2000:]})
                    save()
                    continue
                results.append(r)
                print(f"  smollm2 {data} {method} {engine}: {r['metric']} {r['best']:.4f}; "
                      f"MMLU cloze {r['mmlu_after']:.4f}, letter {r['mmlu_letter_after']:.4f}  "
                      f"({r['train_seconds']:.0f} s training)", flush=True)
                save()
    report(results, out)
    save()
    failed = [r for r in results if "error" in r]
    print(f"({time.perf_counter() - started:.0f} s)")
    return 1 if failed else 0


def report(results: list[dict[str, Any]], out: Path, baseline: str = "lowrank") -> int:
    """Print and write the tables and plots of ``results`` (failed cells are listed, not scored); cells of
    several seeds add ``seeds_table`` with its gaps to ``baseline``."""
    ok = [r for r in results if "error" not in r]
    glue = [r for r in ok if r["suite"] == "glue"]
    text = []
    if glue:
        text.append(glue_table(glue))
    if len({seed_of(r) for r in glue}) > 1:
        text.append(seeds_table(glue, baseline))
    if any(r["suite"] == "llm" for r in ok):
        text.append(llm_table([r for r in ok if r["suite"] == "llm"]))
    print()
    print("\n\n".join(text))
    (out / "table.md").write_text("\n\n".join(text) + "\n")
    plot_curves(ok, out)
    failed = [r for r in results if "error" in r]
    for r in failed:
        print(f"FAILED {r['task']} {r.get('method', '')} {r.get('engine', '')}")
    print(f"\n{len(ok)} cells, {len(failed)} failed; wrote {out}/results.json, table.md, curve_*.png, loss_*.png")
    return 0
