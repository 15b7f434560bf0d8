"""Small readers of the real classification tasks in ``../shared/data`` for the multi-tenant benchmark/tests.

Each task gives (texts, labels, num_labels); a text is a sentence or a sentence pair. Only the first
``n`` rows after ``offset`` are read, in file order (deterministic, no shuffling).
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import torch

#: task -> (file under the data root, num_labels)
TASKS = {
    "sst2": ("glue/SST-2/train.tsv", 2),
    "rte": ("glue/RTE/train.tsv", 2),
    "mrpc": ("glue/MRPC/train.tsv", 2),
    "cola": ("glue/CoLA/train.tsv", 2),
    "fpb": ("fpb/all-data.csv", 3),
    "qnli": ("glue/QNLI/dev.tsv", 2),
    "wnli": ("glue/WNLI/train.tsv", 2),
    "stsb": ("glue/STS-B/train.tsv", 1),
}
FPB_LABELS = {"negative": 0, "neutral": 1, "positive": 2}
NLI_LABELS = {"entailment": 0, "not_entailment": 1}


def _tsv(path: Path) -> list[list[str]]:
    text = path.read_text(encoding="utf-8-sig", errors="replace")
    return [line.split("\t") for line in text.splitlines() if line.strip()]


def task_rows(root: Path, task: str, n: int, offset: int = 0) -> tuple[list, list, int]:
    """The first ``n`` rows (after ``offset``) of ``task``: texts, labels (int, or float for stsb), num_labels."""
    rel, num_labels = TASKS[task]
    path = Path(root) / rel
    if task == "fpb":
        rows = list(csv.reader(io.StringIO(path.read_text(encoding="latin-1"))))[1:]
        picked = rows[offset : offset + n]
        return [r[1] for r in picked], [FPB_LABELS[r[0]] for r in picked], num_labels
    rows = _tsv(path)
    if task == "cola":  # no header: source, label, orig-label, sentence
        picked = rows[offset : offset + n]
        return [r[3] for r in picked], [int(r[1]) for r in picked], num_labels
    picked = rows[1 + offset : 1 + offset + n]
    if task == "sst2":
        return [r[0] for r in picked], [int(r[1]) for r in picked], num_labels
    if task == "mrpc":
        return [(r[3], r[4]) for r in picked], [int(r[0]) for r in picked], num_labels
    if task in ("rte", "qnli"):
        return [(r[1], r[2]) for r in picked], [NLI_LABELS[r[3]] for r in picked], num_labels
    if task == "wnli":
        return [(r[1], r[2]) for r in picked], [int(r[3]) for r in picked], num_labels
    if task == "stsb":
        return [(r[7], r[8]) for r in picked], [float(r[9]) for r in picked], num_labels
    raise KeyError(task)


def encode(tokenizer, texts: list, labels: list, max_length: int = 64) -> dict[str, torch.Tensor]:
    """Tokenize to fixed ``max_length`` (padding to max_length keeps every batch the same shape)."""
    if texts and isinstance(texts[0], tuple):
        a, b = zip(*texts, strict=True)
        enc = tokenizer(
            list(a), list(b), truncation=True, max_length=max_length, padding="max_length", return_tensors="pt"
        )
    else:
        enc = tokenizer(list(texts), truncation=True, max_length=max_length, padding="max_length", return_tensors="pt")
    out = dict(enc)
    out["labels"] = torch.tensor(labels, dtype=torch.float32 if isinstance(labels[0], float) else torch.long)
    return out


def stream(tokenizer, root: Path, task: str, rows: int, max_length: int = 64, offset: int = 0):
    """All ``rows`` rows of ``task`` tokenized as one batch dict (the scheduler re-cuts it per step)."""
    texts, labels, _ = task_rows(root, task, rows, offset)
    return [encode(tokenizer, texts, labels, max_length)]
