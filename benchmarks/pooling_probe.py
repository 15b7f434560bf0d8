"""What the head reads on MiniLM: a linear probe on frozen features, BERT's pooler against the checkpoint's pooling.

``python -m benchmarks pooling_probe [--train-rows 2000]`` embeds SST-2 train rows and every dev row with frozen
all-MiniLM-L6-v2, once through BERT's ``pooler`` (``pooling=model``) and once through the checkpoint's own
pooling (``pooling=auto``: its masked mean), fits scikit-learn's logistic regression on the train features and
scores dev accuracy. No fine-tuning: it measures the features the task head starts from (issue 20). Writes
``runs/bench/pooling_probe/results.json``. ``--smoke``: 400 train and 300 dev rows.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks._common import machine, markdown_table, out_dir, set_offline, write_json

SST2 = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "glue" / "SST-2"


def rows(split: str, n: int | None = None) -> tuple[list[str], np.ndarray]:
    lines = (SST2 / f"{split}.tsv").read_text().splitlines()[1:]
    texts, labels = zip(*(r.rsplit("\t", 1) for r in lines[:n]), strict=True)
    return list(texts), np.array([int(y) for y in labels])


def probe(pooling: str, train: tuple[list[str], np.ndarray], dev: tuple[list[str], np.ndarray]) -> float:
    """Dev accuracy of a logistic regression on frozen MiniLM features read through ``pooling``."""
    import torch
    from sklearn.linear_model import LogisticRegression

    from cotune.models import load_model, load_tokenizer, minilm_path
    from cotune.tasks.pooling import apply_pooling

    tok = load_tokenizer("minilm")
    model = load_model("minilm", "seq_cls", num_labels=2).eval()
    apply_pooling(model, str(minilm_path()), pooling)
    feats = []
    with torch.no_grad():
        for texts, _ in (train, dev):
            chunks = [model.bert(**tok(texts[i : i + 64], return_tensors="pt", padding=True, truncation=True,
                                       max_length=64)).pooler_output for i in range(0, len(texts), 64)]
            feats.append(torch.cat(chunks).numpy())
    return float(LogisticRegression(max_iter=5000).fit(feats[0], train[1]).score(feats[1], dev[1]))


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks pooling_probe", description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--train-rows", type=int, default=2000)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    set_offline()
    train, dev = rows("train", 400 if a.smoke else a.train_rows), rows("dev", 300 if a.smoke else None)
    acc = {pooling: probe(pooling, train, dev) for pooling in ("model", "auto")}
    res: dict[str, Any] = {"train_rows": len(train[1]), "dev_rows": len(dev[1]), "accuracy": acc,
                           "majority": float(max(np.mean(dev[1]), 1 - np.mean(dev[1]))), "machine": machine()}
    out = out_dir("pooling_probe", a.smoke, a.out)
    write_json(out / "results.json", res)
    print(markdown_table(["features", f"SST-2 dev accuracy ({res['dev_rows']} rows)"],
                         [["BERT's pooler (pooling=model)", acc["model"]],
                          ["the checkpoint's mean pooling (pooling=auto)", acc["auto"]],
                          ["majority class", res["majority"]]]))
    return 0
