"""``checkpoint-N/`` folders: adapter (PEFT format), engine state, trainer state and RNG states.

A checkpoint holds everything ``--resume`` needs to continue a run exactly as if it had not stopped:

* ``adapter/``: the adapter set (``save_adapter``), fp32, so reloading is bit for bit;
* ``engine.pt``: ``engine.state_dict()`` (optimizer, scheduler, fitter buffers);
* ``trainer_state.json``: step, best metric and its step, the evaluation history;
* ``rng.pt``: python, numpy and torch (CPU and CUDA) generator states.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cotune.adapters import save_adapter
from cotune.adapters.attach import copy_adapter_weights
from cotune.adapters.io import load_weights
from cotune.errors import CotuneError

_NAME = re.compile(r"^checkpoint-(\d+)$")


@dataclass
class TrainerState:
    """Where a run stands; ``step`` counts micro-batches (``Engine.step`` calls)."""

    step: int = 0
    total_steps: int = 0
    best_metric: float | None = None
    best_step: int | None = None
    evals: list[dict[str, Any]] = field(default_factory=list)
    skipped_steps: int = 0
    train_seconds: float = 0.0  # time in data collation and engine steps (evaluation and saving excluded)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainerState:
        names = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in names})


def rng_state() -> dict[str, Any]:
    """The state of every generator training draws from."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete ``checkpoint-N`` folders, oldest first (a half-written one is ignored)."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [
        (int(m[1]), p) for p in root.iterdir() if (m := _NAME.match(p.name)) and (p / "trainer_state.json").is_file()
    ]
    return [p for _, p in sorted(found)]


def save_checkpoint(
    output_dir: str | os.PathLike,
    model: nn.Module,
    engine: Any,
    state: TrainerState,
    keep: int,
) -> Path:
    """Write ``checkpoint-<step>`` atomically (temp folder then rename) and delete all but the last ``keep``."""
    root = Path(output_dir)
    final = root / f"checkpoint-{state.step}"
    tmp = root / f".checkpoint-{state.step}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_adapter(model, tmp / "adapter")
    torch.save(engine.state_dict(), tmp / "engine.pt")
    torch.save(rng_state(), tmp / "rng.pt")
    # Written last: its presence marks the checkpoint complete (see list_checkpoints).
    (tmp / "trainer_state.json").write_text(json.dumps(asdict(state), indent=1))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(folder: str | os.PathLike, model: nn.Module) -> tuple[TrainerState, dict[str, Any], dict[str, Any]]:
    """Load the adapter weights into ``model``; return (trainer state, engine state, rng state).

    The engine state is returned rather than applied so the caller can build the engine after the
    adapter weights are in place (engines may copy them to their fitters when built).
    """
    folder = Path(folder)
    need = ["trainer_state.json", "engine.pt", "rng.pt", "adapter/adapter_model.safetensors"]
    missing = [n for n in need if not (folder / n).is_file()]
    if missing:
        raise CotuneError(
            f"checkpoint {folder} is incomplete (missing {', '.join(missing)}); delete it to resume from an earlier one"
        )
    copy_adapter_weights(model, load_weights(folder / "adapter"))
    state = TrainerState.from_dict(json.loads((folder / "trainer_state.json").read_text()))
    # Our own files (optimizer state holds python scalars and tuples): full unpickling is needed.
    engine_state = torch.load(folder / "engine.pt", weights_only=False)
    rng = torch.load(folder / "rng.pt", weights_only=False)
    return state, engine_state, rng
