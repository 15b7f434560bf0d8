"""Run logs: one JSON object per line in ``log.jsonl`` and a learning-curve PNG drawn from it."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any


class JsonlLogger:
    """Appends records ``{"type": "train"|"eval"|..., "step": N, ...}`` to a JSONL file, flushed per line."""

    def __init__(self, path: str | os.PathLike, sinks: list[Any] | None = None) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        #: Also given every record (``report_to``: TensorBoard, W&B; see ``cotune.training.reporting``).
        self.sinks = list(sinks or [])

    def log(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(_clean(record), sort_keys=False) + "\n")
        for sink in self.sinks:
            sink.log(record)

    def close(self) -> None:
        """Close the sinks (flushes TensorBoard's event file, finishes a W&B run)."""
        for sink in self.sinks:
            sink.close()
        self.sinks = []

    def truncate_after(self, step: int) -> None:
        """Drop records of steps after ``step`` (a resumed run repeats them), keeping earlier ones."""
        if not self.path.is_file():
            return
        kept = [r for r in read_log(self.path) if r.get("step", 0) <= step and r.get("type") != "end"]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))


def _clean(record: dict[str, Any]) -> dict[str, Any]:
    # JSON has no NaN/inf: write them as strings so the file stays standard JSON.
    out: dict[str, Any] = {}
    for k, v in record.items():
        if isinstance(v, float) and not math.isfinite(v):
            out[k] = str(v)
        elif isinstance(v, dict):
            out[k] = _clean(v)
        else:
            out[k] = v
    return out


def read_log(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a ``log.jsonl`` (a torn last line from a killed run is skipped)."""
    out = []
    for line in Path(path).read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def plot_learning_curve(log_path: str | os.PathLike, png_path: str | os.PathLike, metric: str, title: str = "") -> Path:
    """Train loss (left axis) and the validation ``metric`` (right axis) against the step, from a run's log."""
    return plot_curve(read_log(log_path), png_path, metric, title)


def plot_curve(records: list[dict[str, Any]], png_path: str | os.PathLike, metric: str, title: str = "") -> Path:
    """Train loss and validation ``metric`` against the step, from ``log.jsonl``-shaped records (``type``
    ``train`` with a ``loss``, ``eval`` with ``metric``)."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed; safe in threads and on servers
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in records if r.get("type") == "train" and _finite(r.get("loss"))]
    evals = [(r["step"], r[metric]) for r in records if r.get("type") == "eval" and _finite(r.get(metric))]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        ax.plot(*zip(*train), color="tab:blue", label="train loss")
    ax.set_xlabel("step")
    ax.set_ylabel("train loss", color="tab:blue")
    if evals:
        ax2 = ax.twinx()
        ax2.plot(*zip(*evals), color="tab:orange", marker="o", label=f"validation {metric}")
        ax2.set_ylabel(f"validation {metric}", color="tab:orange")
    ax.set_title(title or Path(png_path).parent.name)
    fig.tight_layout()
    png = Path(png_path)
    fig.savefig(png)
    plt.close(fig)
    return png


def _finite(v: Any) -> bool:
    return isinstance(v, int | float) and math.isfinite(v)
