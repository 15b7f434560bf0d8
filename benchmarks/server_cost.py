"""Server cost per training step: cotune gradient learning (offloaded fitter, unmerged and merged) vs cotune
backprop vs Hugging Face PEFT LoRA, for the lowrank, linear and mlp families, in one run, as ratios to PEFT.

    python -m benchmarks server_cost                      # MiniLM and SmolLM2, 6 timed steps each
    python -m benchmarks server_cost --models minilm --steps 10
    python -m benchmarks server_cost --smoke              # MiniLM, tiny batch, 2 steps (< 30 s)

Workloads (real rows, padded/truncated to a fixed length so every step has the same shape):

* MiniLM (BERT, 6 layers, hidden 384) sequence classification, batch 32 x 128 tokens of SST-2 train rows;
* SmolLM2-135M causal LM, batch 4 x 256 tokens of GSM8K train rows (chat template, loss on answer tokens).

Every configuration adapts the same targets (query/value; q_proj/v_proj) with rank 8 (lowrank and PEFT LoRA,
alpha 8, no dropout) and is trained with AdamW (lr 1e-4); the classification head stays frozen in every
configuration (this is a cost benchmark, and PEFT's ``modules_to_save`` would add the same dense head to all).
PEFT has only LoRA, so every cotune row is compared with PEFT LoRA.

Each configuration runs in its own fresh subprocess (``_common.run_isolated``): build, ``--warmup`` untimed
steps, then ``--steps`` timed steps; the step time is their median wall time, and the server CPU time the median CPU
seconds of the server process alone (``time.process_time``: the fitter's worker process is not counted; on a
CPU shared with other jobs this is the steadier number). Server memory: the peak RSS during the
timed steps (after resetting the kernel's high-water mark), split into

* runtime — the interpreter with torch/transformers imported, before the model;
* weights — the base model's parameters and buffers (analytic), plus merged mode's pristine weight copies;
* adapter state on the server — adapter parameters + gradients + optimizer state (analytic; gradient
  learning keeps only read-only parameters on the server, gradients and AdamW moments live in the fitter);
* activations — the measured step peak above the pre-step RSS, minus the gradients; for gradient learning
  this includes whatever the capture keeps alive (see ``activations``);
* captured pairs — the fp32 ``u`` and ``δ`` bytes that pass through the capture per step (engine counters;
  they overlap the activations: ``u`` is a reference to a tensor autograd keeps, ``δ`` leaves site by site).

Bytes shipped per step: what went to the fitter (``wire_bytes``: the sufficient statistic ``Σ δ uᵀ`` for
affine families when smaller, else the pairs) and what raw fp32 pairs would have cost.
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from pathlib import Path
from typing import Any

from benchmarks._common import (
    DATA,
    markdown_table,
    median,
    optimizer_state_bytes,
    out_dir,
    peak_rss_bytes,
    reset_peak_rss,
    rss_bytes,
    run_isolated,
    set_offline,
    stacked_bars,
    tensor_bytes,
    trim_heap,
    write_json,
)

MiB = 2**20
#: model -> (task kind, data, batch, tokens, PEFT/cotune targets)
WORKLOADS: dict[str, dict[str, Any]] = {
    "minilm": {"task": "seq_cls", "data": "glue/SST-2", "batch": 32, "seq": 128, "targets": ["query", "value"]},
    "smollm2": {"task": "causal_lm", "data": "gsm8k", "batch": 4, "seq": 256, "targets": ["q_proj", "v_proj"]},
}
FAMILIES = ("lowrank", "linear", "mlp")
MERGEABLE = ("lowrank", "linear")
LR = 1e-4


# -- one configuration (runs inside a fresh subprocess) ---------------------------------------------------------
@functools.lru_cache(maxsize=4)
def _batch(model_name: str, batch: int, seq: int) -> dict[str, Any]:
    """``batch`` real train rows padded/truncated to exactly ``seq`` tokens (labels -100 on prompt/padding)."""
    import torch

    from cotune.tasks import make_task

    w = WORKLOADS[model_name]
    task = make_task(w["task"], str(DATA / w["data"]), model=model_name, max_length=seq)
    rows = task.load("train").rows[:batch]
    tok = task.tokenizer
    if w["task"] == "seq_cls":
        texts = [r["text"] for r in rows]
        pairs = [r["text_pair"] for r in rows] if rows[0].get("text_pair") is not None else None
        enc = tok(texts, pairs, padding="max_length", truncation=True, max_length=seq, return_tensors="pt")
        return {**dict(enc), "labels": torch.tensor([r["label"] for r in rows])}
    task._ensure_pad(tok)
    ids = torch.full((batch, seq), tok.pad_token_id, dtype=torch.long)
    labels = torch.full((batch, seq), -100, dtype=torch.long)
    att = torch.zeros((batch, seq), dtype=torch.long)
    for b, row in enumerate(rows):
        i, lb = task.encode(row)  # truncates to max_length = seq, keeping answer tokens
        ids[b, : len(i)], labels[b, : len(lb)], att[b, : len(i)] = torch.tensor(i), torch.tensor(lb), 1
    return {"input_ids": ids, "attention_mask": att, "labels": labels}


def _loss(model: Any, batch: dict[str, Any]) -> Any:
    """The model's own loss (cross-entropy; causal LM shifted, answer tokens only) — identical for PEFT."""
    return model(**batch).loss


def _family_config(family: str, targets: list[str], rank: int) -> Any:
    from cotune.adapters.registry import make_config

    if family == "lowrank":
        return make_config("lowrank", r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules=targets)
    return make_config(family, target_modules=targets)


def measure(
    model: str, system: str, family: str, steps: int, warmup: int, batch: int, seq: int, threads: int,
    placement: str = "process", rank: int = 8,
) -> dict[str, Any]:
    """Build one configuration, run it, return times, memory and traffic. ``system``: peft | backprop | gl |
    gl_merged. Meant to run in a fresh process (``run_isolated``)."""
    import torch

    set_offline()
    torch.set_num_threads(threads)
    import transformers  # noqa: F401 - imported before the runtime baseline is read

    import cotune.adapters  # noqa: F401
    from cotune.engines.base import OptimConfig, make_engine, make_optimizer

    trim_heap()
    runtime = rss_bytes()
    torch.manual_seed(0)
    w = WORKLOADS[model]
    data = _batch(model, batch, seq)
    from cotune.models import load_model

    net = load_model(model, w["task"], **({"num_labels": 2} if w["task"] == "seq_cls" else {}))
    for p in net.parameters():
        p.requires_grad_(False)
    net.train()
    optim = OptimConfig(optimizer="adamw", lr=LR)
    stats_acc: list[dict[str, float]] = []
    fitter_state = 0
    if system == "peft":
        from peft import LoraConfig, get_peft_model

        net = get_peft_model(net, LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules=w["targets"]))
        trainable = {n: p for n, p in net.named_parameters() if p.requires_grad}
        opt = make_optimizer(trainable.items(), optim)

        def step() -> None:
            _loss(net, data).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        engine = None
    else:
        from cotune.adapters import attach
        from cotune.adapters.attach import trainable_parameters

        attach(net, _family_config(family, w["targets"], rank))
        trainable = dict(trainable_parameters(net))
        opts: dict[str, Any] = {}
        if system in ("gl", "gl_merged"):
            opts = {"placement": placement, "merged": system == "gl_merged"}
        engine = make_engine("gl" if system.startswith("gl") else "backprop", net, optim, **opts)
        opt = getattr(engine, "optimizer", None)

        def step() -> None:
            res = engine.step(_loss, data)
            stats_acc.append(dict(res.stats))

    adapter_params = tensor_bytes(trainable.values())
    adapter_ids = {id(p) for p in trainable.values()}
    pristine = [t for m in net.modules() for t in getattr(m, "_pristine", {}).values()]
    weights = tensor_bytes([p for p in net.parameters() if id(p) not in adapter_ids] + list(net.buffers()) + pristine)

    t_build = time.perf_counter()
    for _ in range(warmup):
        step()
    trim_heap()
    before = rss_bytes()
    reset_ok = reset_peak_rss()
    times, cpu = [], []
    stats_acc.clear()
    for _ in range(steps):
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)  # this process only: the fitter's worker process is not counted
    peak = peak_rss_bytes()
    opt_state = optimizer_state_bytes(opt) if opt is not None else 0
    grads = adapter_params if system in ("peft", "backprop") else 0  # fp32 .grad of every trainable tensor
    if system.startswith("gl"):
        # The fitter (another process) holds the gradients and AdamW moments: 2 fp32 moments + grad per param.
        fitter_state = 3 * adapter_params
    pairs = median([s.get("wire_bytes_fp32_pairs", 0.0) for s in stats_acc]) if stats_acc else 0.0
    wire = median([s.get("wire_bytes", 0.0) for s in stats_acc]) if stats_acc else 0.0
    step_delta = max(0, peak - before)
    if engine is not None:
        engine.close()
    return {
        "model": model, "system": system, "family": family, "placement": placement if system.startswith("gl") else None,
        "batch": batch, "seq": seq, "steps": steps, "warmup": warmup, "threads": threads,
        "step_s": median(times), "step_times": times, "server_cpu_s": median(cpu), "server_cpu_times": cpu, "warmup_and_build_s": time.perf_counter() - t_build,
        "trainable_params": sum(p.numel() for p in trainable.values()),
        "runtime_bytes": runtime, "weights_bytes": weights, "adapter_param_bytes": adapter_params,
        "grad_bytes": grads, "optimizer_state_bytes": opt_state,
        "server_adapter_state_bytes": adapter_params + grads + opt_state,
        "fitter_state_bytes": fitter_state, "pairs_bytes": pairs, "wire_bytes": wire,
        "rss_before_steps": before, "peak_rss": peak, "step_delta_bytes": step_delta,
        "activations_bytes": activations(step_delta, grads), "peak_reset": reset_ok,
    }


def activations(step_delta: float, grads: float) -> float:
    """The step's measured peak rise minus the gradients: activations, plus whatever the capture keeps alive.

    The captured pairs are not subtracted: ``u`` is mostly a tensor autograd saves anyway (the capture holds a
    reference, not a copy) and each ``δ`` is shipped and dropped as soon as the backward pass produces it, so
    the analytic pair bytes overlap the activations; the measured extra of capture is the difference between
    a GL row's step peak and the backprop row's.
    """
    return max(0.0, float(step_delta) - float(grads))


# -- the suite ---------------------------------------------------------------------------------------------------
def configurations(models: list[str], families: list[str]) -> list[tuple[str, str, str]]:
    """(model, system, family) of every measured configuration, PEFT first per model."""
    out = []
    for m in models:
        out.append((m, "peft", "lowrank"))
        for f in families:
            out += [(m, "backprop", f), (m, "gl", f)]
            if f in MERGEABLE:
                out.append((m, "gl_merged", f))
    return out


def label(r: dict[str, Any]) -> str:
    if r["system"] == "peft":
        return "PEFT LoRA"
    name = {"backprop": "backprop", "gl": "GL", "gl_merged": "GL merged"}[r["system"]]
    return f"cotune {r['family']} {name}"


def table(results: list[dict[str, Any]]) -> str:
    """The markdown table: time, memory and traffic per configuration, ratios to the model's PEFT LoRA row."""
    headers = ["model", "configuration", "trainable", "step s", "× PEFT", "server CPU s", "× PEFT", "peak RSS MiB",
               "× PEFT", "step Δ MiB",
               "weights MiB", "adapter state MiB", "activations MiB", "pairs u+δ MiB", "shipped MiB/step"]
    rows = []
    for r in results:
        ref = next((x for x in results if x["model"] == r["model"] and x["system"] == "peft"), None)
        rows.append([
            r["model"], label(r), r["trainable_params"], r["step_s"],
            r["step_s"] / ref["step_s"] if ref else None,
            r.get("server_cpu_s"), r["server_cpu_s"] / ref["server_cpu_s"] if ref and "server_cpu_s" in r else None,
            r["peak_rss"] / MiB, r["peak_rss"] / ref["peak_rss"] if ref else None,
            r["step_delta_bytes"] / MiB, r["weights_bytes"] / MiB, r["server_adapter_state_bytes"] / MiB,
            activations(r["step_delta_bytes"], r["grad_bytes"]) / MiB, r["pairs_bytes"] / MiB,
            r["wire_bytes"] / MiB if r["system"].startswith("gl") else None,
        ])
    return markdown_table(headers, rows, digits=2)


def plot(results: list[dict[str, Any]], path: Path) -> Path:
    labels = [f"{r['model']}\n{label(r)}" for r in results]
    parts = {
        "runtime": [r["runtime_bytes"] / MiB for r in results],
        "weights": [r["weights_bytes"] / MiB for r in results],
        "adapter state (server)": [r["server_adapter_state_bytes"] / MiB for r in results],
        "activations (+ capture, measured)": [activations(r["step_delta_bytes"], r["grad_bytes"]) / MiB
                                              for r in results],
    }
    # the rest of the measured peak: tokenizer, data, allocator slack; the bar's height is the measured peak RSS
    parts["other"] = [max(0.0, r["peak_rss"] / MiB - sum(v[i] for v in parts.values())) for i, r in enumerate(results)]
    return stacked_bars(path, labels, parts, "MiB", "Server peak RSS per training step (breakdown)")


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks server_cost", description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="MiniLM, batch 4 x 32, 1+2 steps, lowrank only (< 30 s)")
    p.add_argument("--models", default="minilm,smollm2", help="comma list of: " + ", ".join(WORKLOADS))
    p.add_argument("--families", default=",".join(FAMILIES), help="comma list of: " + ", ".join(FAMILIES))
    p.add_argument("--steps", type=int, default=6, help="timed steps per configuration (median reported)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads of the server process (1: on 2 shared cores, 2 threads ran 2x slower)")
    p.add_argument("--placement", default="process", choices=["process", "thread", "inline"],
                   help="where the gradient-learning fitter runs (process: a worker process, off the server)")
    p.add_argument("--no-isolate", dest="isolate", action="store_false",
                   help="measure every configuration in this process (faster; memory numbers not isolated)")
    p.add_argument("--out", default=None, help="output folder (default runs/bench/server_cost)")
    p.add_argument("--report", action="store_true", help="only rebuild table.md and memory.png from results.json")
    return p.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse(argv)
    set_offline()
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    families = [f.strip() for f in args.families.split(",") if f.strip()]
    bad = [m for m in models if m not in WORKLOADS] + [f for f in families if f not in FAMILIES]
    if bad:
        print(f"unknown model/family {bad}; models: {', '.join(WORKLOADS)}; families: {', '.join(FAMILIES)}")
        return 2
    if args.smoke:  # the code path of every system, in-process (a subprocess per row would take minutes)
        models, families = ["minilm"], ["lowrank"]
        args.steps, args.warmup, args.isolate, args.placement = 2, 1, False, "thread"
    out = out_dir("server_cost", args.smoke, args.out)
    from benchmarks._common import machine

    if args.report:
        return report(json.loads((out / "results.json").read_text())["results"], out)
    results = []
    for model, system, family in configurations(models, families):
        w = WORKLOADS[model]
        batch, seq = (4, 32) if args.smoke else (w["batch"], w["seq"])
        kw = {"model": model, "system": system, "family": family, "steps": args.steps, "warmup": args.warmup,
              "batch": batch, "seq": seq, "threads": args.threads, "placement": args.placement}
        t0 = time.perf_counter()
        r = run_isolated("benchmarks.server_cost:measure", kw, threads=args.threads) if args.isolate else measure(**kw)
        r["isolated"] = args.isolate
        results.append(r)
        print(f"  {model:8} {label(r):28} step {r['step_s']:.3f} s  peak {r['peak_rss'] / MiB:.0f} MiB  "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
        write_json(out / "results.json", {"machine": machine(), "args": vars(args), "results": results})
    return report(results, out)


def report(results: list[dict[str, Any]], out: Path) -> int:
    """Print and write the table and the memory plot of ``results``."""
    text = table(results)
    print()
    print(text)
    (out / "table.md").write_text(text + "\n")
    plot(results, out / "memory.png")
    print(f"\nwrote {out / 'results.json'}, {out / 'table.md'}, {out / 'memory.png'}")
    return 0
