"""``report_to``: send a run's log records to TensorBoard or Weights & Biases through their own libraries.

Both are optional extras (``pip install 'cotune[tensorboard]'``, ``pip install 'cotune[wandb]'``); asking for one
that is not installed is an error naming the pip command, raised before any training starts. Every record the
run writes to ``log.jsonl`` (``train``, ``eval``, ``test``) becomes scalars ``<type>/<key>`` at its step:
``train/loss``, ``train/lr``, ``eval/accuracy``, ``test/f1``, … TensorBoard writes to ``output_dir/tensorboard``;
W&B uses ``$WANDB_PROJECT`` (default ``cotune``), the output folder's name as the run name, the resolved config,
and honours ``$WANDB_MODE`` (``offline``, ``disabled``) as wandb itself does.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Protocol

from cotune.errors import CotuneError

REPORTERS = ("tensorboard", "wandb")
#: Record types whose numbers are sent (``start`` / ``end`` hold bookkeeping, not metrics).
SCALAR_RECORDS = ("train", "eval", "test")


class Reporter(Protocol):
    def log(self, record: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


def report_names(value: Any) -> list[str]:
    """``report_to`` as a list of reporter names: a name, a comma list, a list, or none / empty."""
    if value is None:
        return []
    items = value if isinstance(value, list | tuple) else str(value).split(",")
    names = [str(x).strip().lower() for x in items if str(x).strip()]
    names = [n for n in names if n != "none"]
    bad = sorted(set(names) - set(REPORTERS))
    if bad:
        raise CotuneError(f"report_to: unknown {bad}; valid: {', '.join(REPORTERS)} (or none)")
    return list(dict.fromkeys(names))


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """``{"<type>/<key>": value}`` for the finite numbers of a ``train`` / ``eval`` / ``test`` record."""
    kind = record.get("type")
    if kind not in SCALAR_RECORDS:
        return {}
    # A collaboration's per-user records: ``eval/<user>/<key>`` so the users' curves stay apart.
    prefix = f"{kind}/{record['user']}" if "user" in record else kind
    out = {}
    for k, v in record.items():
        if k in ("type", "step", "split", "user") or isinstance(v, bool) or not isinstance(v, int | float):
            continue
        if math.isfinite(v):
            out[f"{prefix}/{k}"] = float(v)
    return out


def _missing(extra: str, module: str, e: ImportError) -> CotuneError:
    return CotuneError(
        f"report_to: {extra} needs the {module} package, which is not installed ({e}); "
        f"install it with: pip install 'cotune[{extra}]'  (or: pip install {module})"
    )


class TensorBoardReporter:
    """Scalars through ``torch.utils.tensorboard.SummaryWriter`` into ``output_dir/tensorboard``."""

    def __init__(self, out: Path, config: dict[str, Any]) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise _missing("tensorboard", "tensorboard", e) from e
        import yaml

        self.writer = SummaryWriter(log_dir=str(out / "tensorboard"))
        self.writer.add_text("config", "```\n" + yaml.safe_dump(config, sort_keys=False) + "```")

    def log(self, record: dict[str, Any]) -> None:
        for k, v in scalars(record).items():
            self.writer.add_scalar(k, v, global_step=int(record.get("step", 0)))

    def close(self) -> None:
        self.writer.close()


class WandbReporter:
    """Scalars through ``wandb.init`` / ``run.log`` / ``run.finish``."""

    def __init__(self, out: Path, config: dict[str, Any]) -> None:
        try:
            import wandb
        except ImportError as e:
            raise _missing("wandb", "wandb", e) from e
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "cotune"), name=out.name, dir=str(out),
                              config=config)

    def log(self, record: dict[str, Any]) -> None:
        values = scalars(record)
        if values:
            self.run.log(values, step=int(record.get("step", 0)))

    def close(self) -> None:
        self.run.finish()


def make_reporters(value: Any, out: str | os.PathLike, config: dict[str, Any]) -> list[Reporter]:
    """The reporters ``report_to`` asks for, started (import errors name the pip command)."""
    classes = {"tensorboard": TensorBoardReporter, "wandb": WandbReporter}
    return [classes[name](Path(out), config) for name in report_names(value)]
