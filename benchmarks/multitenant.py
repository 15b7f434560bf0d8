"""Many tenants on one base (DESIGN §4): cotune's mixed batches vs K separate Hugging Face PEFT LoRA runs.

K = 1, 2, 4, 8 tenants on MiniLM, each a different real task from ``../shared/data`` (SST-2, RTE, MRPC,
CoLA, FPB (3 labels), QNLI, WNLI, STS-B (regression)), each a LoRA r=8 / alpha=16 on query+value with its
own head, each job ``steps`` steps of 4 rows x 64 tokens. Compared, in fresh subprocesses:

* ``cotune``: ONE process, one mixed batch of 4K rows per step (one base forward/backward for all K);
  engine ``backprop`` and ``gl`` (gradient learning, fitters inline);
* ``peft-seq``: K PEFT processes one after another (each loads the model and trains its job);
* ``peft-par``: K PEFT processes at the same time (``torch.set_num_threads(max(1, cores // K))`` each),
  at the K values of ``--par-ks`` (default 8).

Reported: wall time to finish all K jobs end to end (process start, model load, tokenisation, training),
the training-loop time alone, and the server's peak RSS (``ru_maxrss`` of each fresh process; for
``peft-par`` the sum over the K concurrent processes, for ``peft-seq`` the largest single run).
Targets (CPU): cotune wall <= peft-seq wall / 0.95; cotune RSS at K=8 <= 1.15 x one PEFT run.

``python -m benchmarks multitenant [--steps N] [--ks 1,2,4,8] [--smoke]``
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

from benchmarks._common import (
    DATA,
    line_plot,
    machine,
    markdown_table,
    out_dir,
    peak_rss_bytes,
    run_isolated,
    set_offline,
    write_json,
)

TASK_ORDER = ["sst2", "rte", "mrpc", "cola", "fpb", "qnli", "wnli", "stsb"]
ROWS, SEQ, R, ALPHA = 4, 64, 8, 16.0


def _batches(tokenizer, task: str, steps: int, seq: int) -> list[dict]:
    from benchmarks._glue import encode, task_rows

    texts, labels, _ = task_rows(DATA, task, steps * ROWS)
    enc = encode(tokenizer, texts, labels, seq)
    return [{k: v[i * ROWS : (i + 1) * ROWS] for k, v in enc.items()} for i in range(steps)]


def cotune_job(
    tasks: list[str], steps: int, seq: int = SEQ, engine: str = "backprop", micro_rows: int | None = None
) -> dict[str, Any]:
    """All ``tasks`` as tenants of one bank, trained from mixed batches; timings and peak RSS.

    ``micro_rows``: cap the rows of one server pass (whole tenants per chunk, see ``MultiTenantTrainer``).
    """
    t_start = time.perf_counter()
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
        trainer.add(t, OptimConfig(lr=1e-3))
        sched.join(t, _batches(tok, t, steps, seq), rows_per_step=ROWS)
    t_loop = time.perf_counter()
    losses = {t: [] for t in tasks}
    for batch in sched:
        for t, r in trainer.step(batch).items():
            losses[t].append(r.loss)
    loop_s = time.perf_counter() - t_loop
    trainer.close()
    return {
        "loop_s": loop_s,
        "job_s": time.perf_counter() - t_start,
        "peak_rss_mb": peak_rss_bytes() / 2**20,
        "first_loss": {t: v[0] for t, v in losses.items()},
        "last_loss": {t: v[-1] for t, v in losses.items()},
    }


def peft_job(task: str, steps: int, seq: int = SEQ, threads: int | None = None) -> dict[str, Any]:
    """One Hugging Face PEFT LoRA job (the usual recipe) on one task; timings and peak RSS."""
    t_start = time.perf_counter()
    set_offline()
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from benchmarks._glue import TASKS
    from cotune.models import minilm_path

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    path = str(minilm_path())
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=TASKS[task][1], dtype=torch.float32)
    cfg = LoraConfig(task_type="SEQ_CLS", r=R, lora_alpha=ALPHA, target_modules=["query", "value"])
    model = get_peft_model(model, cfg).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    batches = _batches(tok, task, steps, seq)
    t_loop = time.perf_counter()
    losses = []
    for b in batches:
        loss = model(**b).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    loop_s = time.perf_counter() - t_loop
    return {
        "loop_s": loop_s,
        "job_s": time.perf_counter() - t_start,
        "peak_rss_mb": peak_rss_bytes() / 2**20,
        "first_loss": losses[0],
        "last_loss": losses[-1],
    }


def _timed(fn, *args, **kwargs) -> tuple[dict, float]:
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0


def _concurrent(tasks: list[str], steps: int, seq: int) -> tuple[list[dict], float]:
    threads = max(1, (os.cpu_count() or 1) // len(tasks))
    results: list[Any] = [None] * len(tasks)

    def go(i: int, t: str) -> None:
        results[i] = run_isolated(
            "benchmarks.multitenant:peft_job",
            {"task": t, "steps": steps, "seq": seq, "threads": threads},
            threads=threads,
        )

    t0 = time.perf_counter()
    workers = [threading.Thread(target=go, args=(i, t)) for i, t in enumerate(tasks)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    if any(r is None for r in results):
        raise RuntimeError("a concurrent PEFT job failed (see its error above)")
    return results, time.perf_counter() - t0


def measure(
    ks: list[int], steps: int, seq: int, smoke: bool, engines: list[str], par_ks: list[int]
) -> list[dict[str, Any]]:
    """Every configuration in a fresh process (in-process for ``smoke``).

    A task's PEFT job does not depend on K, so each is run once and ``peft-seq`` for K tenants is the sum
    of the first K jobs (wall = their back-to-back wall times).
    """
    singles: dict[str, dict] = {}

    def peft_single(t: str) -> dict:
        if t not in singles:
            if smoke:
                r, wall = _timed(peft_job, t, steps, seq)
            else:
                r, wall = _timed(
                    run_isolated, "benchmarks.multitenant:peft_job", {"task": t, "steps": steps, "seq": seq}
                )
            singles[t] = {**r, "wall_s": wall}
        return singles[t]

    rows = []
    for k in ks:
        tasks = TASK_ORDER[:k]
        row: dict[str, Any] = {"K": k, "tasks": tasks}
        for spec in engines:
            eng, _, micro = spec.partition(":")
            kw = {
                "tasks": tasks,
                "steps": steps,
                "seq": seq,
                "engine": eng,
                "micro_rows": int(micro) if micro else None,
            }
            if smoke:  # in-process: a smoke run only checks that the pieces run
                r, wall = _timed(cotune_job, **kw)
            else:
                r, wall = _timed(run_isolated, "benchmarks.multitenant:cotune_job", kw)
            row[f"cotune_{spec}"] = {**r, "wall_s": wall}
            print(f"K={k} cotune {spec}: wall {wall:.1f}s", flush=True)
        seq_runs = [peft_single(t) for t in tasks]
        row["peft_seq"] = {
            "wall_s": sum(r["wall_s"] for r in seq_runs),
            "loop_s": sum(r["loop_s"] for r in seq_runs),
            "peak_rss_mb": max(r["peak_rss_mb"] for r in seq_runs),
            "runs": seq_runs,
        }
        if not smoke and k > 1 and k in par_ks:  # K=1 concurrent is the sequential run
            par, wall = _concurrent(tasks, steps, seq)
            row["peft_par"] = {
                "wall_s": wall,
                "loop_s": max(r["loop_s"] for r in par),
                "peak_rss_mb": sum(r["peak_rss_mb"] for r in par),
                "runs": par,
            }
        rows.append(row)
        print(f"K={k} done", flush=True)
    return rows


def report(rows: list[dict], engines: list[str], steps: int, out: Path) -> str:
    one_peft = rows[0]["peft_seq"]["runs"][0]["peak_rss_mb"]
    headers = [
        "K",
        "run",
        "wall s",
        "loop s",
        "job steps/s",
        "peak RSS MB",
        "peft-seq/wall",
        "peft-seq/loop",
        "RSS / 1 PEFT",
    ]
    table = []
    for row in rows:
        k = row["K"]
        ref, ref_loop = row["peft_seq"]["wall_s"], row["peft_seq"]["loop_s"]
        for name in [f"cotune_{e}" for e in engines] + ["peft_seq", "peft_par"]:
            if name not in row:
                continue
            r = row[name]
            table.append(
                [
                    k,
                    name.replace("_", "-"),
                    r["wall_s"],
                    r["loop_s"],
                    k * steps / r["wall_s"],
                    r["peak_rss_mb"],
                    ref / r["wall_s"],
                    ref_loop / r["loop_s"],
                    r["peak_rss_mb"] / one_peft,
                ]
            )
    text = markdown_table(headers, table, digits=2)
    xs = [row["K"] for row in rows]
    curves = {}
    for name in [f"cotune_{e}" for e in engines] + ["peft_seq", "peft_par"]:
        have = [row for row in rows if name in row]
        if have:
            curves[name.replace("_", "-")] = (
                [r["K"] for r in have],
                [r["K"] * steps / r[name]["wall_s"] for r in have],
            )
    del xs
    line_plot(
        out / "throughput.png",
        curves,
        "tenants K",
        "job steps per second (end to end)",
        "MiniLM, 4 x 64 tokens per tenant per step",
    )
    _memory_bars(out / "memory.png", rows, engines)
    return text


def _memory_bars(path: Path, rows: list[dict], engines: list[str]) -> None:
    from benchmarks._common import _plt

    plt = _plt()
    names = [f"cotune_{e}" for e in engines] + ["peft_seq", "peft_par"]
    names = [n for n in names if any(n in r for r in rows)]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    width = 0.8 / max(1, len(names))
    for i, n in enumerate(names):
        label = "1 PEFT run (largest)" if n == "peft_seq" else n.replace("_", "-")
        ax.bar(
            [j + i * width for j in range(len(rows))],
            [r[n]["peak_rss_mb"] if n in r else 0.0 for r in rows],
            width,
            label=label,
        )
    ax.set_xticks([j + width * (len(names) - 1) / 2 for j in range(len(rows))], [f"K={r['K']}" for r in rows])
    ax.set_ylabel("peak RSS (MB)")
    ax.set_title("server memory: one cotune process vs PEFT processes")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks multitenant", description=__doc__.split("\n")[0])
    p.add_argument("--ks", default="1,2,4,8", help="numbers of tenants (comma separated, at most 8)")
    p.add_argument("--steps", type=int, default=6, help="training steps of every job")
    p.add_argument("--seq", type=int, default=SEQ, help="tokens per row")
    p.add_argument(
        "--engines",
        default="backprop,backprop:8,gl",
        help="cotune configurations: engine (backprop, gl), optionally :MICRO_ROWS (rows per server pass)",
    )
    p.add_argument("--par-ks", default="8", help="K values at which K PEFT processes also run concurrently")
    p.add_argument(
        "--smoke", action="store_true", help="tiny in-process run (K=2, gl with 2-row passes, 1 step, 16 tokens)"
    )
    p.add_argument("--out", default=None, help="output folder (default runs/bench/multitenant)")
    a = p.parse_args(argv)
    ks = [int(x) for x in a.ks.split(",")]
    if any(k < 1 or k > len(TASK_ORDER) for k in ks):
        print(f"--ks must be between 1 and {len(TASK_ORDER)}", file=sys.stderr)
        return 2
    engines = a.engines.split(",")
    steps, seq = a.steps, a.seq
    if a.smoke:
        ks, steps, seq, engines = [2], 1, 16, ["gl:2"]
    out = out_dir("multitenant", a.smoke, a.out)
    rows = measure(ks, steps, seq, a.smoke, engines, [int(x) for x in a.par_ks.split(",") if x])
    text = report(rows, engines, steps, out)
    info = machine()
    write_json(
        out / "results.json",
        {"machine": info, "steps": steps, "seq": seq, "rows_per_tenant": ROWS, "rows": rows, "table": text},
    )
    print(text)
    print(f"machine: {info['cpu_count']} cores, load {info['load_average_1m']:.1f}; results in {out}")
    return 0
