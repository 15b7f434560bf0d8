"""Why MeZO cannot get started on MiniLM's SST-2 head, measured (the diagnosis behind the ``zo`` suite's numbers).

(a) The pooled features MiniLM's new head reads: all-MiniLM-L6-v2 is a mean-pooling sentence encoder whose BERT
    pooler was never trained, so ``pooler_output`` is small; std and mean norm over training rows.
(b) Backprop SGD on the zero-initialised head alone (no adapter): how far plain gradient steps get from that
    start, at lr 1e-2 and 1 (MeZO's ZO-SGD is a noisy estimate of the same step).
(c) Label-word zero-shot heads: cosine of each dev sentence's features to the features of "a bad movie" /
    "a good movie", with the pooler's output and with mean pooling.
(d) ``--smollm2``: the prompt-based start the MeZO paper uses, on a model that has a pretrained LM head:
    SmolLM2-135M zero-shot with "Review: … Sentiment:" → " negative" / " positive", and the seconds of one
    MeZO step (lowrank q/v, batch 16) on this machine.

``python -m benchmarks zo_start [--smoke] [--smollm2]``; results in ``runs/bench/zo_start/``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

from benchmarks._common import out_dir, set_offline
from benchmarks.zo import accuracy, features, sst2

LABEL_WORDS = ("a bad movie", "a good movie")
PROMPT, VERBALIZER = "Review: {s}\nSentiment:", (" negative", " positive")


def minilm_start(steps: int, rows: int, dev_rows: int | None, lrs: tuple[float, ...]) -> dict:
    import torch
    import torch.nn.functional as F

    from cotune.models import load_model, load_tokenizer

    torch.manual_seed(0)
    tok = load_tokenizer("minilm")
    model = load_model("minilm", "seq_cls", num_labels=2).eval()
    train, dev = sst2("train"), sst2("dev", dev_rows)
    pooled, _ = features(model, tok, [s for s, _ in random.Random(0).sample(train, rows)])
    res: dict = {"pooled_std": float(pooled.std()), "pooled_norm": float(pooled.norm(dim=-1).mean())}

    dev_feats = [features(model, tok, [s for s, _ in dev[i : i + 64]]) for i in range(0, len(dev), 64)]
    labels = torch.tensor([y for _, y in dev])
    words = features(model, tok, list(LABEL_WORDS))
    for k, name in enumerate(("pooler", "mean")):
        x = F.normalize(torch.cat([f[k] for f in dev_feats]), dim=-1)
        pred = (x @ F.normalize(words[k], dim=-1).T).argmax(-1)
        res[f"zero_shot_{name}"] = float((pred == labels).float().mean())

    res["head_sgd"] = {}
    head = model.classifier
    for p in model.parameters():
        p.requires_grad_(False)
    for lr in lrs:
        torch.nn.init.zeros_(head.weight)
        torch.nn.init.zeros_(head.bias)
        head.requires_grad_(True)
        opt = torch.optim.SGD(head.parameters(), lr=lr)
        rng, losses = random.Random(0), []
        for _ in range(steps):
            chunk = rng.sample(train, 16)
            enc = tok([s for s, _ in chunk], return_tensors="pt", padding=True, truncation=True, max_length=64)
            loss = model(**enc, labels=torch.tensor([y for _, y in chunk])).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        k = max(1, steps // 10)
        res["head_sgd"][str(lr)] = {"loss_first": sum(losses[:k]) / k, "loss_last": sum(losses[-k:]) / k,
                                    "dev_acc": accuracy(model, tok, dev, 64)}  # fmt: skip
    res["dev_rows"], res["steps"] = len(dev), steps
    return res


def smollm2_start(dev_rows: int, batch: int = 16) -> dict:
    import torch

    from cotune.adapters import attach, make_config
    from cotune.engines import OptimConfig, make_engine
    from cotune.models import load_model, load_tokenizer

    torch.manual_seed(0)
    tok = load_tokenizer("smollm2")
    tok.padding_side = "left"  # the label word is read at the last position of every row
    model = load_model("smollm2", "causal_lm").eval()
    ids = [tok(w, add_special_tokens=False)["input_ids"][0] for w in VERBALIZER]

    def logits(m, rows):
        enc = tok([PROMPT.format(s=s.strip()) for s, _ in rows], return_tensors="pt", padding=True)
        return m(**enc).logits[:, -1, ids]

    dev = sorted(sst2("dev", dev_rows), key=lambda r: len(r[0]))  # similar lengths per batch: less padding
    correct = 0
    with torch.inference_mode():
        for i in range(0, len(dev), 32):
            chunk = dev[i : i + 32]
            correct += int((logits(model, chunk).argmax(-1) == torch.tensor([y for _, y in chunk])).sum())
    attach(model, make_config("lowrank", r=8, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    eng = make_engine("zo", model, OptimConfig(optimizer="sgd", lr=1e-4), eps=1e-3, seed=0)

    def loss_fn(m, rows):
        return torch.nn.functional.cross_entropy(logits(m, rows), torch.tensor([y for _, y in rows]))

    rows = random.Random(0).sample(sst2("train"), batch)
    t0 = time.perf_counter()
    eng.step(loss_fn, rows)
    return {"zero_shot": correct / len(dev), "dev_rows": len(dev), "mezo_step_seconds": time.perf_counter() - t0}


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks zo_start", description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="a tiny run (< 30 s)")
    p.add_argument("--steps", type=int, default=300, help="SGD steps of batch 16 on the head alone")
    p.add_argument("--dev-rows", type=int, default=None, help="dev rows for (b) and (c) (default: all 872)")
    p.add_argument("--smollm2", action="store_true", help="also (d): SmolLM2 prompt zero-shot and MeZO step time")
    p.add_argument("--smollm2-dev-rows", type=int, default=200)
    args = p.parse_args(argv)
    set_offline()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    out = out_dir("zo_start", args.smoke)
    steps, rows, dev_rows = (3, 32, 32) if args.smoke else (args.steps, 1024, args.dev_rows)
    res = minilm_start(steps, rows, dev_rows, (1e-2, 1.0))
    print(f"(a) MiniLM pooled features over {rows} training rows: std {res['pooled_std']:.3f}, "
          f"mean norm {res['pooled_norm']:.2f} (384 dimensions)")  # fmt: skip
    print(f"(b) backprop SGD on the zero-initialised head alone, {steps} steps of batch 16 "
          f"(dev accuracy on {res['dev_rows']} rows):")  # fmt: skip
    for lr, r in res["head_sgd"].items():
        print(f"    lr {float(lr):g}: loss {r['loss_first']:.3f} -> {r['loss_last']:.3f}, dev accuracy {r['dev_acc']:.3f}")
    print(f"(c) zero-shot by cosine to {LABEL_WORDS}: pooler {res['zero_shot_pooler']:.3f}, "
          f"mean pooling {res['zero_shot_mean']:.3f}")  # fmt: skip
    if args.smollm2 and not args.smoke:
        res["smollm2"] = s = smollm2_start(args.smollm2_dev_rows)
        print(f"(d) SmolLM2-135M prompt zero-shot {s['zero_shot']:.3f} on {s['dev_rows']} dev rows; one MeZO step "
              f"(lowrank q/v, batch 16) {s['mezo_step_seconds']:.1f} s")  # fmt: skip
    (out / "results.json").write_text(json.dumps(res, indent=2))
    print(f"written {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
