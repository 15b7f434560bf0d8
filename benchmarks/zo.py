"""Zeroth-order (MeZO) benchmark: memory of one step, and accuracy reached on SST-2.

(a) Peak memory of one training step on SmolLM2-135M (causal LM, low-rank adapters on q/v) for plain
    inference, one MeZO step and one backprop step (AdamW). Each mode runs in a fresh subprocess; after
    the model and batch are loaded the kernel's peak-RSS counter is reset (``/proc/self/clear_refs``) and
    the figure is ``VmHWM − VmRSS`` before the step: the extra resident memory the step needed, measured
    by the OS (it counts torch's allocations, which tracemalloc would not see).
(b) MeZO training of low-rank adapters on MiniLM for SST-2, with the new head trained alongside (``--head-init
    random|zero``) or first fitted by linear probing and then frozen (``--head-init lp``): dev accuracy of the
    untrained model, then after training (steps, wall time, accuracy).

``python -m benchmarks zo [--smoke] [--steps N] [--lr LR] [--eps EPS] [--head-init lp]``; results in
``runs/bench/zo/``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

OUT = Path("runs/bench/zo")
SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _status(field: str) -> int:
    """A ``/proc/self/status`` field in bytes (VmRSS, VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def memory_child(mode: str, seq_len: int, batch: int, model_name: str = "smollm2") -> dict:
    """Runs in a fresh process: the extra peak RSS of one ``mode`` step (bytes).

    One inference forward runs first so that memory-mapped weights are resident before the counter is
    reset (otherwise paging the weights in would be counted as the step's memory).
    """
    import gc

    import torch

    from cotune.adapters import attach
    from cotune.engines import OptimConfig, make_engine
    from cotune.models import load_model

    torch.manual_seed(0)
    if model_name == "minilm":  # the smoke run: a small model that loads in a second
        model = load_model("minilm", "seq_cls", num_labels=2).eval()
        ids = torch.randint(1000, 20000, (batch, seq_len))
        data = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.zeros(batch).long()}
    else:
        model = load_model(model_name, "causal_lm").eval()
        ids = torch.randint(100, 10000, (batch, seq_len))
        data = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    attach(model, "lowrank", r=8, lora_alpha=16)

    def loss_fn(m, b):
        return m(**b).loss

    eng = None
    if mode != "inference":
        eng = make_engine("zo" if mode == "mezo" else "backprop", model, OptimConfig(optimizer="adamw", lr=1e-4))
    with torch.inference_mode():
        loss_fn(model, data)
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    before = _status("VmRSS")
    t0 = time.perf_counter()
    if mode == "inference":
        with torch.inference_mode():
            loss_fn(model, data)
    else:
        assert eng is not None
        eng.step(loss_fn, data)
    seconds = time.perf_counter() - t0
    return {"mode": mode, "extra_peak_bytes": _status("VmHWM") - before, "seconds": seconds, "rss_before": before}


def memory_table(seq_len: int, batch: int, model_name: str) -> list[dict]:
    rows = []
    for mode in ("inference", "mezo", "backprop"):
        code = (
            "import json, sys; from benchmarks.zo import memory_child; "
            f"print('RESULT' + json.dumps(memory_child({mode!r}, {seq_len}, {batch}, {model_name!r})))"
        )
        env = dict(os.environ, HF_HUB_OFFLINE="1")
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=False)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT")), None)
        if line is None:
            raise RuntimeError(f"memory measurement for {mode} failed:\n{proc.stderr[-2000:]}")
        rows.append(json.loads(line[len("RESULT") :]))
    return rows


def sst2(split: str, n: int | None = None) -> list[tuple[str, int]]:
    path = SHARED / "glue" / "SST-2" / f"{split}.tsv"
    if not path.is_file():
        raise SystemExit(f"SST-2 not found at {path} (the benchmark needs ../shared/data)")
    rows = [r.rsplit("\t", 1) for r in path.read_text().splitlines()[1:]]
    out = [(s, int(y)) for s, y in rows]
    return out[:n] if n else out


def accuracy(model, tok, rows, max_length: int) -> float:
    import torch

    correct = 0
    with torch.inference_mode():
        for i in range(0, len(rows), 64):
            chunk = rows[i : i + 64]
            enc = tok([s for s, _ in chunk], return_tensors="pt", padding=True, truncation=True, max_length=max_length)
            pred = model(**enc).logits.argmax(-1)
            correct += int((pred == torch.tensor([y for _, y in chunk])).sum())
    return correct / len(rows)


def features(model, tok, texts: list[str], max_length: int = 64):
    """``(pooler_output, masked mean of the last hidden states)`` of MiniLM for ``texts``."""
    import torch

    enc = tok(texts, return_tensors="pt", padding=True, truncation=True, max_length=max_length)
    with torch.inference_mode():
        out = model.bert(**enc)
    mask = enc["attention_mask"].unsqueeze(-1).float()
    return out.pooler_output, (out.last_hidden_state * mask).sum(1) / mask.sum(1)


def linear_probe(model, tok, rows: list[tuple[str, int]], max_length: int) -> None:
    """Set MiniLM's 2-way head to a logistic regression (scikit-learn) on its frozen pooled features of ``rows``."""
    import numpy as np
    import torch
    from sklearn.linear_model import LogisticRegression

    feats = [features(model, tok, [s for s, _ in rows[i : i + 64]], max_length)[0] for i in range(0, len(rows), 64)]
    # C is large: the pooled features are small (std ~0.06), so the weights must be large to separate them
    clf = LogisticRegression(C=100.0, max_iter=5000).fit(torch.cat(feats).numpy(), np.array([y for _, y in rows]))
    w, b = torch.tensor(clf.coef_[0], dtype=torch.float32), float(clf.intercept_[0])
    with torch.no_grad():  # logit1 - logit0 = w.x + b, split evenly between the two logits
        model.classifier.weight.copy_(torch.stack([-w / 2, w / 2]))
        model.classifier.bias.copy_(torch.tensor([-b / 2, b / 2]))


def mezo_sst2(
    steps: int,
    lr: float,
    eps: float,
    batch: int,
    max_length: int,
    dev_rows: int | None,
    seed: int,
    zo_optimizer: str = "sgd",
    head_init: str = "random",
    target: str | None = None,
    lp_rows: int = 4000,
) -> dict:
    """MeZO-train lowrank adapters on MiniLM for SST-2; dev accuracy before and after.

    ``head_init``: ``random`` (the new head as transformers initialises it; trained with the adapters),
    ``zero`` (all logits 0 at the start; trained), or ``lp`` (linear probing first: a logistic regression
    on the frozen pooled features of ``lp_rows`` training rows, then MeZO trains the adapters only, with the
    head frozen, so that what MeZO adds is measured on its own).
    """
    import torch

    from cotune.adapters import attach, make_config, parameter_report
    from cotune.engines import OptimConfig, make_engine
    from cotune.models import load_model, load_tokenizer

    torch.manual_seed(seed)
    tok = load_tokenizer("minilm")
    model = load_model("minilm", "seq_cls", num_labels=2).eval()
    if head_init == "zero":  # every logit starts at 0: the loss is flat in the adapter, so ZO noise there costs nothing yet
        torch.nn.init.zeros_(model.classifier.weight)
        torch.nn.init.zeros_(model.classifier.bias)
    train, dev = sst2("train"), sst2("dev", dev_rows)
    rng = random.Random(seed)
    acc_untrained = acc0 = accuracy(model, tok, dev, max_length)
    if head_init == "lp":
        linear_probe(model, tok, rng.sample(train, lp_rows), max_length)
        acc0 = accuracy(model, tok, dev, max_length)
    head = [] if head_init == "lp" else [make_config("full")]
    attach(model, [make_config("lowrank", r=8, lora_alpha=8, target_modules=target), *head])
    _, trainable, _ = parameter_report(model)
    eng = make_engine("zo", model, OptimConfig(lr=lr), eps=eps, seed=seed, zo_optimizer=zo_optimizer)

    def loss_fn(m, b):
        return m(**b[0], labels=b[1]).loss

    t0 = time.perf_counter()
    losses = []
    for _ in range(steps):
        chunk = rng.sample(train, batch)
        enc = tok([s for s, _ in chunk], return_tensors="pt", padding=True, truncation=True, max_length=max_length)
        losses.append(eng.step(loss_fn, (dict(enc), torch.tensor([y for _, y in chunk]))).loss)
        if steps >= 100 and len(losses) % (steps // 10) == 0:
            recent = losses[-(steps // 10) :]
            print(f"  step {len(losses)}/{steps}: mean loss {sum(recent) / len(recent):.4f}", flush=True)
    seconds = time.perf_counter() - t0
    acc1 = accuracy(model, tok, dev, max_length)
    k = max(1, steps // 10)
    return {
        "steps": steps, "lr": lr, "eps": eps, "batch": batch, "zo_optimizer": zo_optimizer, "trainable": trainable, "dev_rows": len(dev),
        "head_init": head_init, "acc_untrained": acc_untrained, "acc_before": acc0, "acc_after": acc1, "train_seconds": seconds,
        "loss_first": sum(losses[:k]) / k, "loss_last": sum(losses[-k:]) / k,
    }  # fmt: skip


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks zo", description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="a tiny run (< 30 s): few steps, short sequences")
    p.add_argument("--steps", type=int, default=4000)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--eps", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--zo-optimizer", default="sgd", help="sgd (MeZO), adam or momentum")
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--dev-rows", type=int, default=None, help="evaluate on the first N dev rows (default: all 872)")
    p.add_argument("--head-init", default="random", choices=["random", "zero", "lp"],
                   help="the new head: random or zero (trained with the adapters), or lp (a logistic regression "
                        "on frozen features of --lp-rows train rows, then frozen: MeZO trains the adapters only)")
    p.add_argument("--lp-rows", type=int, default=4000)
    p.add_argument("--target", default=None, help="lowrank target_modules regex (default: query/value of every layer)")
    p.add_argument("--skip-memory", action="store_true", help="only the SST-2 part")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    OUT.mkdir(parents=True, exist_ok=True)
    result: dict = {}
    if not args.skip_memory:
        seq, bs, model_name = (32, 2, "minilm") if args.smoke else (256, 4, "smollm2")
        # The smoke run measures in this process (fast); the full run uses a fresh process per mode.
        rows = (
            [memory_child(m, seq, bs, model_name) for m in ("inference", "mezo", "backprop")]
            if args.smoke
            else memory_table(seq, bs, model_name)
        )
        result["memory"] = {"model": model_name, "seq_len": seq, "batch": bs, "rows": rows}
        print(f"(a) {model_name} + lowrank q/v, batch {bs} x {seq} tokens: extra peak RSS of one step")
        base = rows[0]["extra_peak_bytes"]
        for r in rows:
            ratio = f"{r['extra_peak_bytes'] / base:6.2f}x inference" if base >= 2**20 else "inference ~0"
            print(f"  {r['mode']:<10} {r['extra_peak_bytes'] / 2**20:9.1f} MiB  ({ratio})  {r['seconds']:.2f} s")
    steps = 20 if args.smoke else args.steps
    res = mezo_sst2(steps, args.lr, args.eps, 8 if args.smoke else args.batch_size,
                    32 if args.smoke else args.max_length, 64 if args.smoke else args.dev_rows, args.seed,
                    args.zo_optimizer, args.head_init, args.target, 64 if args.smoke else args.lp_rows)  # fmt: skip
    result["sst2"] = res
    head = {"random": "+ head", "zero": "+ zero-init head", "lp": "only, head linear-probed then frozen"}[args.head_init]
    lp = f"untrained head {res['acc_untrained']:.3f}, linear probe " if args.head_init == "lp" else ""
    print(f"(b) MeZO on MiniLM SST-2 (lowrank r8 {args.target or 'q/v'} {head}; {res['trainable']:,} trainable), {res['steps']} steps, "
          f"zo_optimizer {res['zo_optimizer']}, lr {res['lr']:g}, eps {res['eps']:g}, batch {res['batch']}: dev accuracy {lp}{res['acc_before']:.3f} -> "
          f"{res['acc_after']:.3f} on {res['dev_rows']} rows, train loss {res['loss_first']:.3f} -> "
          f"{res['loss_last']:.3f}, {res['train_seconds']:.0f} s")  # fmt: skip
    name = "smoke.json" if args.smoke else ("results.json" if not args.skip_memory else "sst2.json")
    (OUT / name).write_text(json.dumps(result, indent=2))
    print(f"written {OUT / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
