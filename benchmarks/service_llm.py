"""A real run through the service: SmolLM2-135M-Instruct fine-tuned on Alpaca by ``cotune serve`` over HTTP.

``python -m benchmarks service_llm [--steps 200 --lr 2e-4 ...] [--out DIR]`` splits the 999 real Alpaca items of
``../shared/data/instruct/alpaca_en_demo.json`` deterministically (the first 899 are the training file, the last
100 the evaluation file; both written as JSON to ``OUT/data/``), starts ``cotune serve --model smollm2`` as a
subprocess on a free loopback port, registers a tenant, uploads both files over HTTP and submits ONE job:
lowrank r=8 (lora_alpha 16), engine backprop, AdamW lr 2e-4 (constant), 200 steps of 8 rows, max_length 256,
seed 0, ``task_options`` {max_new_tokens: 64, val_fraction: 0, test_fraction: 0} (so all 899 rows train),
the server's default checkpointing (every 20 steps). The client polls until the job ends, then reads its metrics.

Measured:
* before: the base model (no adapter) on the 100 evaluation items, computed in this process, before the server
  starts, by the service's own code: ``cotune.service.workload.build_workload`` on the same spec and files (the
  job's task and evaluation rows), then ``Workload.evaluate`` = ``CausalLMTask.evaluate``, the call the server
  makes on the job's adapter when the job finishes. Metrics: loss (mean NLL per answer token), perplexity,
  rouge_l (greedy generation, at most max_new_tokens new tokens);
* after: the finished job's ``result["eval"]`` (the same metrics on the same rows, with the trained adapter);
* the loss curve: every step's training ``loss`` metric (mean NLL per answer token of that step's batch);
* time per step: the differences of consecutive ``loss`` metric timestamps (server clock; the steps that save a
  checkpoint are among them), their median; first step = job start to first loss (includes loading the data);
  train s = job start to the last step; job wall = job start to finish (includes the final evaluation);
* the server process's peak RSS (``VmHWM`` of ``/proc/<pid>/status`` just before it is stopped).

Writes ``results.json`` (config, ``machine()``, load average before/after, per-step losses and times,
before/after metrics, the job record), ``loss_curve.png``, ``server.log`` and the job's adapter (``adapter/``).
``--smoke``: 2 steps of 2 rows, max_length 64, evaluation on 4 held-out items with max_new_tokens 4.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks._common import DATA, line_plot, machine, machine_line, markdown_table, out_dir, set_offline, write_json

ALPACA = DATA / "instruct" / "alpaca_en_demo.json"
N_TRAIN = 899  # the first 899 items train, the rest (100) evaluate
METRICS = ("loss", "perplexity", "rouge_l")


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks service_llm", description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="2 steps of 2 rows, 64 tokens, 4 evaluation items")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--max-new-tokens", type=int, default=64, help="generation length of the rouge_l evaluation")
    p.add_argument("--eval-rows", type=int, default=100, help="held-out items evaluated (at most 100)")
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--lora-alpha", type=float, default=16.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads of the server and the base eval (0: torch's)")
    p.add_argument("--timeout", type=float, default=6 * 3600, help="seconds to wait for the job")
    p.add_argument("--out", default=None, help="output folder (default runs/bench/service_llm)")
    a = p.parse_args(argv)
    if a.smoke:
        a.steps, a.batch_size, a.max_length, a.max_new_tokens, a.eval_rows = 2, 2, 64, 4, 4
    if a.steps < 1 or a.batch_size < 1 or not 1 <= a.eval_rows <= 100:
        p.error("need steps >= 1, batch size >= 1 and 1..100 evaluation rows")
    return a


def split_alpaca(folder: Path, eval_rows: int) -> tuple[Path, Path]:
    """The first 899 items as the training file, the first ``eval_rows`` of the last 100 as the evaluation file."""
    items = json.loads(ALPACA.read_text())
    folder.mkdir(parents=True, exist_ok=True)
    train, ev = folder / "alpaca_train.json", folder / "alpaca_eval.json"
    train.write_text(json.dumps(items[:N_TRAIN], ensure_ascii=False, indent=1))
    ev.write_text(json.dumps(items[N_TRAIN:][:eval_rows], ensure_ascii=False, indent=1))
    return train, ev


def job_spec(a: argparse.Namespace, train_id: str, eval_id: str) -> dict[str, Any]:
    return {
        "task": "causal_lm", "train": {"file_id": train_id}, "eval": {"file_id": eval_id},
        "method": "lowrank", "adapter": {"r": a.r, "lora_alpha": a.lora_alpha}, "engine": "backprop",
        "optim": {"optimizer": "adamw", "lr": a.lr}, "steps": a.steps, "batch_size": a.batch_size,
        "max_length": a.max_length, "seed": a.seed,
        "task_options": {"max_new_tokens": a.max_new_tokens, "val_fraction": 0.0, "test_fraction": 0.0},
    }


def evaluate_base(spec: dict[str, Any], train: Path, ev: Path, threads: int) -> tuple[dict[str, float], str, float]:
    """The base model's metrics on the evaluation rows, by the code the server runs at the end of a job."""
    import torch

    from cotune.models import load_model, load_tokenizer
    from cotune.service.workload import build_workload, model_task_for

    if threads:
        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    model_task = model_task_for("smollm2")
    torch.manual_seed(0)
    model = load_model("smollm2", model_task)  # as the server's runner loads its base (``Runner._load_base``)
    tok = load_tokenizer("smollm2")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tok.pad_token_id
    model.eval()
    data = {"train": {"path": str(train)}, "eval": {"path": str(ev)}}  # what the server makes of the uploads
    with tempfile.TemporaryDirectory(prefix="cotune-base-eval-") as job_dir:
        wl = build_workload(spec, data, tok, model, model_task, Path(job_dir))
        metrics = wl.evaluate(model)
    by = f"{type(wl).__module__}.{type(wl).__qualname__}.evaluate -> {type(wl.task).__module__}." \
         f"{type(wl.task).evaluate.__qualname__}"
    del model, wl
    return metrics, by, time.perf_counter() - t0


def peak_rss_of(pid: int) -> int | None:
    """``VmHWM`` (peak resident set) of a live process, in bytes; None where /proc cannot tell."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def wait_job(client: Any, job_id: str, steps: int, timeout: float) -> dict[str, Any]:
    """Poll the job until it ends, printing progress about every tenth of the steps."""
    every = max(1, steps // 10)
    shown, end = 0, time.monotonic() + timeout
    while True:
        st = client.status(job_id)
        if st["status"] in ("succeeded", "failed", "cancelled"):
            return st
        if st["step"] >= shown + every:
            shown = st["step"] - st["step"] % every
            print(f"  step {st['step']}/{steps} ({st['status']})", flush=True)
        if time.monotonic() > end:
            raise TimeoutError(f"job {job_id} still {st['status']} at step {st['step']} after {timeout:.0f} s")
        time.sleep(1.0 if steps > 10 else 0.3)


def step_times(losses: list[dict[str, Any]], started: float) -> tuple[float, list[float]]:
    """(job start to the first loss, seconds between consecutive losses) from the metrics' timestamps."""
    times = [m["time"] for m in losses]
    return times[0] - started, [b - a for a, b in zip(times, times[1:])]


def report(res: dict[str, Any]) -> str:
    before, after = res["before"], res["after"]
    rows = [["before (base model)", *(before.get(k) for k in METRICS)],
            ["after (service job)", *(after.get(k) for k in METRICS)],
            ["change", *((after[k] - before[k]) if k in after and k in before else None for k in METRICS)]]
    quality = markdown_table([f"{res['config']['eval_rows']} held-out Alpaca items", *METRICS], rows, digits=4)
    t = res["timing"]
    rss = res["server_peak_rss_gib"]
    run = markdown_table(
        ["steps", "rows/step", "max_length", "median s/step", "first step s", "train s", "job wall s",
         "base eval s", "server peak RSS GiB", "total s"],
        [[res["config"]["steps"], res["config"]["batch_size"], res["config"]["max_length"], t["median_step_s"],
          t["first_step_s"], t["train_s"], t["job_wall_s"], t["base_eval_s"], rss, t["total_s"]]], digits=2)
    return quality + "\n\n" + run


def plot(path: Path, res: dict[str, Any], window: int = 10) -> Path:
    """Every step's training loss, its running mean over ``window`` steps, and the held-out loss before/after."""
    steps, losses = res["loss_steps"], res["losses"]
    curves: dict[str, tuple[list[float], list[float]]] = {"train loss (each step's batch)": (steps, losses)}
    if len(losses) >= 2 * window:
        mean = [sum(losses[i - window : i]) / window for i in range(window, len(losses) + 1)]
        curves[f"train loss, mean of {window} steps"] = (steps[window - 1 :], mean)
    for side in ("before", "after"):
        if "loss" in res[side]:
            curves[f"held-out loss, {side}"] = ([0.0, float(steps[-1])], [res[side]["loss"]] * 2)
    c = res["config"]
    return line_plot(path, curves, "step", "loss (mean NLL per answer token)",
                     f"SmolLM2-135M-Instruct, lowrank r={c['r']}, {c['steps']} steps x {c['batch_size']} rows "
                     "via cotune serve")


def main(argv: list[str]) -> int:
    from cotune.service.client import Client
    from cotune.service.launch import ServerProcess

    a = parse(argv)
    set_offline()
    out = out_dir("service_llm", a.smoke, a.out)
    train, ev = split_alpaca(out / "data", a.eval_rows)
    info = machine()
    load_before = list(os.getloadavg())
    t_all = time.perf_counter()
    spec = job_spec(a, "train", "eval")  # file ids filled in after the upload
    print(f"base model on {a.eval_rows} held-out items (in this process, the server's evaluation code)...", flush=True)
    before, evaluated_by, base_eval_s = evaluate_base(spec, train, ev, a.threads)
    print(f"  before: {before} ({base_eval_s:.1f} s)", flush=True)

    args = ["--threads", str(a.threads)] if a.threads else []
    with tempfile.TemporaryDirectory(prefix="cotune-service-llm-") as tmp:
        srv = ServerProcess(Path(tmp) / "root", args, model="smollm2")
        t_start = time.perf_counter()
        try:
            with srv, Client(srv.url, timeout=300) as c:
                server_start_s = time.perf_counter() - t_start
                c.register("service-llm-bench")
                spec["train"]["file_id"] = c.upload(train)["id"]
                spec["eval"]["file_id"] = c.upload(ev)["id"]
                job = c.submit(spec)
                print(f"job {job['id']}: {a.steps} steps of {a.batch_size} rows on {srv.url}...", flush=True)
                st = wait_job(c, job["id"], a.steps, a.timeout)
                metrics = c.metrics(job["id"])
                # the server is two processes (the API and the trainer, which holds the model): both peaks, added
                peaks = [peak_rss_of(pid) for pid in (srv.pid, srv.trainer_pid()) if pid is not None]
                peak_rss = sum(p for p in peaks if p is not None) or None
                if st["status"] == "succeeded":
                    c.download(job["id"], out / "adapter")
        finally:
            if srv.log_path.is_file():
                shutil.copyfile(srv.log_path, out / "server.log")
    total_s = time.perf_counter() - t_all
    load_after = list(os.getloadavg())
    if st["status"] != "succeeded":
        print(f"job {st['id']} {st['status']}: {st['error']}\n{(out / 'server.log').read_text()[-3000:]}",
              file=sys.stderr)
        return 1

    losses = sorted((m for m in metrics if m["name"] == "loss"), key=lambda m: m["step"])
    first_s, deltas = step_times(losses, st["started"])
    after = {k: float(v) for k, v in (st["result"].get("eval") or {}).items()}
    res: dict[str, Any] = {
        "config": {"model": "smollm2", "data": str(ALPACA.relative_to(DATA.parent.parent)), "train_rows": N_TRAIN,
                   "eval_rows": a.eval_rows, "eval_items": f"items {N_TRAIN}..{N_TRAIN + a.eval_rows - 1}",
                   "steps": a.steps, "batch_size": a.batch_size, "max_length": a.max_length,
                   "max_new_tokens": a.max_new_tokens, "lr": a.lr, "r": a.r, "lora_alpha": a.lora_alpha,
                   "seed": a.seed, "threads": a.threads or None, "smoke": a.smoke,
                   "job_spec": {**spec, "train": {"file": train.name}, "eval": {"file": ev.name}}},
        "machine": info,
        "load_average": {"before": load_before, "after": load_after},
        "before": before,
        "after": after,
        "before_evaluated_by": evaluated_by,
        "train_loss": st["result"].get("train_loss"),
        "skipped_steps": st["result"].get("skipped_steps"),
        "losses": [m["value"] for m in losses],
        "loss_steps": [m["step"] for m in losses],
        "step_s": deltas,
        "timing": {"median_step_s": statistics.median(deltas) if deltas else first_s, "first_step_s": first_s,
                   "train_s": losses[-1]["time"] - st["started"], "job_wall_s": st["finished"] - st["started"],
                   "final_eval_s": st["finished"] - losses[-1]["time"], "base_eval_s": base_eval_s,
                   "server_start_s": server_start_s, "total_s": total_s},
        "server_peak_rss_bytes": peak_rss,
        "server_peak_rss_gib": round(peak_rss / 2**30, 2) if peak_rss else None,
        "job": {k: st[k] for k in ("id", "status", "step", "total_steps", "error", "result")},
    }
    res["table"] = report(res)
    write_json(out / "results.json", res)
    plot(out / "loss_curve.png", res)
    print(f"SmolLM2-135M-Instruct on Alpaca through cotune serve: lowrank r={a.r} alpha={a.lora_alpha:g}, backprop, "
          f"AdamW lr {a.lr:g}, {a.steps} steps x {a.batch_size} rows, max_length {a.max_length}; "
          f"evaluation: {a.eval_rows} held-out items, max_new_tokens {a.max_new_tokens}")
    print(res["table"])
    run = {"load_average": res["load_average"], "total_s": total_s}
    print(machine_line(info, a.threads or info["torch_threads"], run, out))
    return 0
