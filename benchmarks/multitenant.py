"""Many tenants on one base: the step throughput of cotune's mixed batches vs Hugging Face PEFT on a CPU.

K = 1, 2, 4, 8 tenants on MiniLM, each a different real task from ``../shared/data`` (SST-2, RTE, MRPC,
CoLA, FPB (3 labels), QNLI, WNLI, STS-B (regression)), each a LoRA r=8 / alpha=16 on query+value with its
own head and AdamW (lr 1e-3, weight decay 0.01), each ``--steps`` steps (default 20) of 4 rows x ``--seq``
tokens (default 64). Every job runs in a fresh process (``run_isolated``), one after another, with
glibc's default malloc (``fixed_mmap=False``: the fixed mmap threshold that the memory suites use makes
every large tensor page-fault afresh, which doubled a 32-row PEFT step here):

* ``cotune-<engine>``: ONE process training all K tenants from mixed batches of 4K rows
  (``MultiTenantTrainer(bank, engine=...)``: one routed base forward/backward per step for all K);
  engines ``backprop`` and ``gl`` (gradient learning, fitters inline: the trainer's default).
* ``peft-1job``: the anchor, ONE PEFT job (``get_peft_model``; ``model(**b).loss``, ``backward``,
  ``step``) on 4K rows of SST-2 per step: the same rows per step as the mixed batch, one task. On a CPU
  this is the physical limit: the cost of a step is about proportional to its rows (a 4-row and a 32-row
  step cost about the same per row), so K mixed tenants can at best match one PEFT job of the same rows.
  At K=1 it is the same job as peft-seq's SST-2 job and is run once.
* ``peft-seq``: K PEFT jobs of 4 rows each, one after another (one process per task; a task's job does
  not depend on K, so each runs once and K tenants' figures are the sums over the first K tasks).

Measured per run: every step's time (``time.perf_counter`` around ``trainer.step`` / the PEFT step; the
batches are built before the loop); the MEDIAN step after warm-up (the first 3 steps are dropped; with
fewer than 4 steps all but the last are); rows/s = rows per step / median step; setup = process start to
the first step (interpreter, imports, model load, tokenisation; measured from the parent's launch); loop
= the sum of all step times; wall = process launch to exit. For peft-seq the median step is the sum of
the K jobs' medians (one step of every tenant), setup, loop and wall are sums over the K processes.
A second measurement takes the ratio the goal is about without the machine's drift between processes
(identical PEFT jobs differed by 40 % from one fresh process to the next here): ``interleaved_job`` builds
every cotune engine and the one-PEFT-job anchor in ONE fresh process and takes their steps in turn (the
order rotated every step); its table (printed first, and plotted) gives each run's median step, rows/s and
rows/s ÷ the anchor's. The end-to-end table gives, per K and run: setup s, median step s, rows/s, rows/s / peft-1job rows/s at that K (the
target: >= 0.95 for cotune backprop and gl), loop s, wall s, and peft-seq wall / this wall.
``results.json`` keeps every per-step time list, each process's peak RSS, the machine (``machine()``)
and the load average before and after; ``throughput.png`` plots rows/s against K.

The old ``--par-ks`` (K concurrent PEFT processes) and the peak-RSS table/plot are gone: this suite is
about step throughput (peak RSS is still recorded per process in results.json, under glibc's default
malloc, so not comparable with the memory suites' figures).

``python -m benchmarks multitenant [--ks 1,2,4,8] [--steps 20] [--seq 64] [--engines backprop,gl] [--out DIR]``
``--smoke``: a tiny in-process run for CI (K=2, 2 steps, 16 tokens, cotune gl only).
Run the real measurement on a quiet machine (the load average is recorded to judge it).
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks._common import (
    DATA,
    line_plot,
    machine,
    machine_line,
    markdown_table,
    out_dir,
    peak_rss_bytes,
    run_isolated,
    run_suite,
    set_offline,
    write_json,
)

TASK_ORDER = ["sst2", "rte", "mrpc", "cola", "fpb", "qnli", "wnli", "stsb"]
#: the task of the one-PEFT-job anchor (67k training rows: enough for 4K rows x any sensible step count)
ANCHOR_TASK = "sst2"
ROWS, SEQ, R, ALPHA, LR, WEIGHT_DECAY = 4, 64, 8, 16.0, 1e-3, 0.01
STEPS, WARMUP = 20, 3
LIMIT = "one PEFT job with the same rows per step (4K rows of SST-2)"


def warmup_steps(steps: int) -> int:
    """Steps dropped before the median: ``WARMUP``, but always keeping at least one."""
    return max(0, min(WARMUP, steps - 1))


def _batches(tokenizer, task: str, steps: int, seq: int, rows: int = ROWS) -> list[dict]:
    from benchmarks._glue import encode, task_rows

    texts, labels, _ = task_rows(DATA, task, steps * rows)
    if len(texts) < steps * rows:
        raise ValueError(f"{task} has {len(texts)} rows; {steps} steps x {rows} rows need {steps * rows}")
    enc = encode(tokenizer, texts, labels, seq)
    return [{k: v[i * rows : (i + 1) * rows] for k, v in enc.items()} for i in range(steps)]


def _timings(step_s: list[float], rows: int, first_step_at: float) -> dict[str, Any]:
    warm = warmup_steps(len(step_s))
    med = statistics.median(step_s[warm:])
    return {
        "step_s": step_s,
        "warmup": warm,
        "median_step_s": med,
        "rows_per_step": rows,
        "rows_per_s": rows / med,
        "loop_s": sum(step_s),
        "first_step_at": first_step_at,
        "peak_rss_mb": peak_rss_bytes() / 2**20,
    }


def _timed_steps(step, steps: int) -> list[float]:
    """``step(i)`` for every step, each timed on its own."""
    out = []
    for i in range(steps):
        t0 = time.perf_counter()
        step(i)
        out.append(time.perf_counter() - t0)
    return out


def _cotune(tasks: list[str], steps: int, seq: int, engine: str, micro_rows: int | None = None):
    """The bank, trainer and prebuilt mixed batches of ``tasks``; ``step(i)`` trains on batch ``i``."""
    set_offline()
    import torch

    from benchmarks._glue import TASKS
    from cotune.adapters import make_config
    from cotune.engines.base import OptimConfig
    from cotune.models import load_model, load_tokenizer
    from cotune.tenants import MixedBatchScheduler, MultiTenantTrainer, TenantBank

    torch.manual_seed(0)
    tok = load_tokenizer("minilm")
    model = load_model("minilm", "seq_cls", num_labels=2).train()
    bank = TenantBank(model)
    trainer = MultiTenantTrainer(bank, engine=engine, micro_rows=micro_rows)
    sched = MixedBatchScheduler()
    for t in tasks:
        bank.add_tenant(
            t, make_config("lowrank", r=R, lora_alpha=ALPHA, target_modules=["query", "value"]), head=TASKS[t][1]
        )
        trainer.add(t, OptimConfig(lr=LR, weight_decay=WEIGHT_DECAY))
        sched.join(t, _batches(tok, t, steps, seq), rows_per_step=ROWS)
    batches = list(sched)  # built before the loop, as PEFT's are
    losses: dict[str, list[float]] = {t: [] for t in tasks}

    def step(i: int) -> None:
        for t, r in trainer.step(batches[i]).items():
            losses[t].append(r.loss)

    return step, trainer, losses


def cotune_job(
    tasks: list[str], steps: int, seq: int = SEQ, engine: str = "backprop", micro_rows: int | None = None
) -> dict[str, Any]:
    """All ``tasks`` as tenants of one bank, trained from mixed batches of ``ROWS`` rows each; step times.

    ``micro_rows``: cap the rows of one server pass (whole tenants per chunk, see ``MultiTenantTrainer``).
    """
    import torch

    step, trainer, losses = _cotune(tasks, steps, seq, engine, micro_rows)
    first_step_at = time.time()
    step_s = _timed_steps(step, steps)
    trainer.close()
    return {
        **_timings(step_s, ROWS * len(tasks), first_step_at),
        "engine": engine,
        "micro_rows": micro_rows,
        "torch_threads": torch.get_num_threads(),
        "skipped": dict(trainer.skipped),
        "first_loss": {t: v[0] for t, v in losses.items()},
        "last_loss": {t: v[-1] for t, v in losses.items()},
    }


def _peft(task: str, steps: int, seq: int, rows: int):
    """A Hugging Face PEFT LoRA job (the usual recipe); ``step(i)`` trains on its batch ``i``."""
    set_offline()
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from benchmarks._glue import TASKS
    from cotune.models import minilm_path

    torch.manual_seed(0)
    path = str(minilm_path())
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=TASKS[task][1], dtype=torch.float32)
    cfg = LoraConfig(task_type="SEQ_CLS", r=R, lora_alpha=ALPHA, target_modules=["query", "value"])
    model = get_peft_model(model, cfg).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, weight_decay=WEIGHT_DECAY)
    batches = _batches(tok, task, steps, seq, rows)
    losses: list[float] = []

    def step(i: int) -> None:
        loss = model(**batches[i]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))

    return step, losses


def peft_job(task: str, steps: int, seq: int = SEQ, rows: int = ROWS) -> dict[str, Any]:
    """One Hugging Face PEFT LoRA job on ``rows`` rows of ``task`` per step; step times."""
    import torch

    step, losses = _peft(task, steps, seq, rows)
    first_step_at = time.time()
    step_s = _timed_steps(step, steps)
    return {
        **_timings(step_s, rows, first_step_at),
        "task": task,
        "torch_threads": torch.get_num_threads(),
        "first_loss": losses[0],
        "last_loss": losses[-1],
    }


def interleaved_job(tasks: list[str], steps: int, seq: int = SEQ, engines: list[str] | None = None) -> dict[str, Any]:
    """Every cotune engine and the one-PEFT-job anchor in ONE process, their steps taken in turn.

    The machine's speed drifts between processes (CPU frequency, neighbours: identical PEFT jobs differed by
    40 % from one process to the next here); stepping all runs in turn, the order rotated every step, exposes
    them to the same drift, so their ratio is the code's and not the machine's.
    """
    runs = {f"cotune-{e}": _cotune(tasks, steps, seq, e)[0] for e in engines or ["backprop", "gl"]}
    runs["peft-1job"] = _peft(ANCHOR_TASK, steps, seq, ROWS * len(tasks))[0]
    names = list(runs)
    times: dict[str, list[float]] = {n: [] for n in names}
    for i in range(steps):
        for n in names[i % len(names) :] + names[: i % len(names)]:
            t0 = time.perf_counter()
            runs[n](i)
            times[n].append(time.perf_counter() - t0)
    return {n: _timings(t, ROWS * len(tasks), 0.0) for n, t in times.items()}


def _run(target: str, kwargs: dict[str, Any], smoke: bool) -> dict[str, Any]:
    """``target(**kwargs)`` in a fresh process (in this one for ``smoke``), with setup and wall time."""
    launched, t0 = time.time(), time.perf_counter()
    if smoke:
        mod, _, fn = target.partition(":")
        r = getattr(importlib.import_module(mod), fn)(**kwargs)
    else:
        r = run_isolated(target, kwargs, fixed_mmap=False)
    wall = time.perf_counter() - t0
    return {**r, "setup_s": r["first_step_at"] - launched, "wall_s": wall}


def measure(ks: list[int], steps: int, seq: int, smoke: bool, engines: list[str]) -> list[dict[str, Any]]:
    """Every run of every K, each in a fresh process (in-process for ``smoke``); rows of ``report``."""
    peft: dict[tuple[str, int], dict] = {}  # (task, rows per step) -> job: a job does not depend on K

    def peft_run(task: str, rows: int) -> dict:
        if (task, rows) not in peft:
            kw = {"task": task, "steps": steps, "seq": seq, "rows": rows}
            peft[task, rows] = _run("benchmarks.multitenant:peft_job", kw, smoke)
            r = peft[task, rows]
            print(
                f"  peft {task} x {rows} rows: setup {r['setup_s']:.1f}s, median step {r['median_step_s']:.3f}s,"
                f" {r['rows_per_s']:.1f} rows/s",
                flush=True,
            )
        return peft[task, rows]

    out = []
    for k in ks:
        tasks = TASK_ORDER[:k]
        runs: dict[str, dict] = {}
        for spec in engines:
            eng, _, micro = spec.partition(":")
            kw = {
                "tasks": tasks,
                "steps": steps,
                "seq": seq,
                "engine": eng,
                "micro_rows": int(micro) if micro else None,
            }
            r = runs[f"cotune-{spec}"] = _run("benchmarks.multitenant:cotune_job", kw, smoke)
            print(
                f"K={k} cotune {spec}: setup {r['setup_s']:.1f}s, median step {r['median_step_s']:.3f}s,"
                f" {r['rows_per_s']:.1f} rows/s, wall {r['wall_s']:.1f}s",
                flush=True,
            )
        runs["peft-1job"] = peft_run(ANCHOR_TASK, ROWS * k)
        jobs = [peft_run(t, ROWS) for t in tasks]
        med = sum(j["median_step_s"] for j in jobs)
        runs["peft-seq"] = {
            "setup_s": sum(j["setup_s"] for j in jobs),
            "median_step_s": med,
            "rows_per_step": ROWS * k,
            "rows_per_s": ROWS * k / med,
            "loop_s": sum(j["loop_s"] for j in jobs),
            "wall_s": sum(j["wall_s"] for j in jobs),
            "jobs": jobs,
        }
        kw = {"tasks": tasks, "steps": steps, "seq": seq, "engines": [e.partition(":")[0] for e in engines]}
        if smoke:
            inter = interleaved_job(**kw)
        else:
            inter = run_isolated("benchmarks.multitenant:interleaved_job", kw, fixed_mmap=False)
        limit = inter["peft-1job"]["rows_per_s"]
        for r in inter.values():
            r["vs_one_peft"] = r["rows_per_s"] / limit
        print(
            f"K={k} interleaved: "
            + ", ".join(f"{n} {r['rows_per_s']:.1f} rows/s ({r['vs_one_peft']:.2f}x)" for n, r in inter.items()),
            flush=True,
        )
        out.append({"K": k, "tasks": tasks, "runs": runs, "interleaved": inter})
        print(f"K={k} done", flush=True)
    return out


def report(rows: list[dict], out: Path) -> str:
    """The markdown table (and ``throughput.png``): per K and run, setup, median step, rows/s and ratios."""
    headers = [
        "K",
        "run",
        "setup s",
        "median step s",
        "rows/s",
        "rows/s ÷ 1 PEFT job",
        "loop s",
        "wall s",
        "peft-seq wall ÷ wall",
    ]
    table = []
    for row in rows:
        k, runs = row["K"], row["runs"]
        limit, seq_wall = runs["peft-1job"]["rows_per_s"], runs["peft-seq"]["wall_s"]
        for name, r in runs.items():
            r["vs_one_peft"] = r["rows_per_s"] / limit
            r["peft_seq_wall_ratio"] = seq_wall / r["wall_s"]
            table.append(
                [
                    k,
                    name,
                    r["setup_s"],
                    r["median_step_s"],
                    r["rows_per_s"],
                    r["vs_one_peft"],
                    r["loop_s"],
                    r["wall_s"],
                    r["peft_seq_wall_ratio"],
                ]
            )
    inter_table = []
    curves: dict[str, tuple[list[float], list[float]]] = {}
    for row in rows:
        for name, r in row["interleaved"].items():
            inter_table.append([row["K"], name, r["median_step_s"], r["rows_per_s"], r["vs_one_peft"]])
            label = f"{name} (limit: 1 job, 4K rows/step)" if name == "peft-1job" else name
            xs, ys = curves.setdefault(label, ([], []))
            xs.append(row["K"])
            ys.append(r["rows_per_s"])
    line_plot(
        out / "throughput.png",
        curves,
        "tenants K (4 rows each per step)",
        "rows/s (median step after warm-up, steps in turn)",
        "MiniLM LoRA training on CPU: mixed batches vs PEFT",
    )
    steps_table = markdown_table(
        ["K", "run", "median step s", "rows/s", "rows/s ÷ 1 PEFT job"], inter_table, digits=3
    )
    return (
        "Step throughput, every run in ONE process, steps taken in turn (the ratio is the goal's):\n\n"
        + steps_table
        + "\n\nEnd to end, each run in its own fresh process (setup = launch to first step):\n\n"
        + markdown_table(headers, table, digits=3)
    )


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks multitenant", description=__doc__.split("\n")[0])
    p.add_argument("--ks", default="1,2,4,8", help="numbers of tenants (comma separated, at most 8)")
    p.add_argument("--steps", type=int, default=STEPS, help=f"training steps of every job (first {WARMUP} dropped)")
    p.add_argument("--seq", type=int, default=SEQ, help="tokens per row")
    p.add_argument(
        "--engines",
        default="backprop,gl",
        help="cotune configurations: engine (backprop, gl), optionally :MICRO_ROWS (rows per server pass)",
    )
    p.add_argument("--smoke", action="store_true", help="tiny in-process run (K=2, 2 steps, 16 tokens, gl only)")
    p.add_argument("--out", default=None, help="output folder (default runs/bench/multitenant)")
    a = p.parse_args(argv)
    ks = [int(x) for x in a.ks.split(",")]
    if any(k < 1 or k > len(TASK_ORDER) for k in ks):
        print(f"--ks must be between 1 and {len(TASK_ORDER)}", file=sys.stderr)
        return 2
    if a.steps < 1:
        print("--steps must be >= 1", file=sys.stderr)
        return 2
    engines = [e for e in a.engines.split(",") if e]
    steps, seq = a.steps, a.seq
    if a.smoke:
        ks, steps, seq, engines = [2], 2, 16, ["gl"]
    out = out_dir("multitenant", a.smoke, a.out)
    info = machine()
    rows, run = run_suite(lambda: measure(ks, steps, seq, a.smoke, engines))
    text = report(rows, out)
    notes = (
        f"MiniLM, LoRA r={R} alpha={ALPHA:g} on query+value, AdamW; {ROWS} rows x {seq} tokens per tenant per step,"
        f" {steps} steps, median step after dropping the first {warmup_steps(steps)}.\n"
        f"Physical limit on a CPU: {LIMIT}; the goal is rows/s ÷ 1 PEFT job >= 0.95 for cotune.\n"
        "peft-seq: K 4-row PEFT jobs one after another (median step = sum of the K jobs' medians;"
        " setup, loop, wall = sums over the K processes)."
    )
    write_json(
        out / "results.json",
        {
            "machine": info,
            **run,
            "steps": steps,
            "warmup": warmup_steps(steps),
            "seq": seq,
            "rows_per_tenant": ROWS,
            "anchor_task": ANCHOR_TASK,
            "limit": LIMIT,
            "engines": engines,
            "smoke": a.smoke,
            "rows": rows,
            "notes": notes,
            "table": text,
        },
    )
    print(notes)
    print(text)
    print(machine_line(info, info["torch_threads"], run, out))
    return 0
