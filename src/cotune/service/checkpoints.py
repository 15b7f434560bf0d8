"""Per-job checkpoints of the service: ``jobs/<id>/ckpt-<step>/`` plus an atomically replaced ``LATEST``.

A checkpoint folder holds the job's adapter set (PEFT format, fp32), ``engine.pt`` (optimizer, scheduler,
fitter state) and ``state.json`` (step, last loss). It is written completely under a temporary name, renamed,
and only then does ``LATEST`` point at it; older folders are deleted after that. A SIGKILL at any moment
therefore leaves ``LATEST`` naming a complete checkpoint (or no checkpoint at all).

The single-job trainer's ``cotune.training.checkpoint`` saves the process-wide RNG state and the active
set; the service runs many jobs in one process, so each job's randomness is instead derived from its seed
and step (see ``runner``), and sets are saved by name.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cotune.adapters import save_adapter
from cotune.adapters.attach import copy_adapter_weights
from cotune.adapters.io import load_weights
from cotune.errors import CotuneError
from cotune.service.store import atomic_write_bytes, atomic_write_json

LATEST = "LATEST"


def save(job_dir: Path, model: nn.Module, set_name: str, trainer_state: dict[str, Any], state: dict[str, Any]) -> Path:
    """Write checkpoint ``ckpt-<state['step']>`` of adapter set ``set_name`` and make it the latest.

    ``trainer_state``: the job's optimizer and schedule (or fitter) state; ``state``: step and loss.
    """
    step = int(state["step"])
    final = job_dir / f"ckpt-{step}"
    tmp = job_dir / f".ckpt-{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_adapter(model, tmp / "adapter", name=set_name)
    torch.save(trainer_state, tmp / "engine.pt")
    atomic_write_json(tmp / "state.json", state)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    atomic_write_bytes(job_dir / LATEST, final.name.encode())
    for old in job_dir.glob("ckpt-*"):
        if old.name != final.name:
            shutil.rmtree(old, ignore_errors=True)
    return final


def latest(job_dir: Path) -> Path | None:
    """The newest complete checkpoint of a job, or ``None``."""
    ptr = job_dir / LATEST
    if not ptr.is_file():
        return None
    folder = job_dir / ptr.read_text().strip()
    return folder if (folder / "state.json").is_file() else None


def load(folder: Path, model: nn.Module, set_name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Load the adapter weights into set ``set_name``; return (state, engine state) for the caller to apply."""
    need = ["state.json", "engine.pt", "adapter/adapter_model.safetensors"]
    missing = [n for n in need if not (folder / n).is_file()]
    if missing:
        raise CotuneError(f"checkpoint {folder} is incomplete (missing {', '.join(missing)})")
    copy_adapter_weights(model, load_weights(folder / "adapter"), set_name)
    state = json.loads((folder / "state.json").read_text())
    # Our own file (optimizer state holds python scalars and tuples), so full unpickling is acceptable.
    engine_state = torch.load(folder / "engine.pt", weights_only=False)
    return state, engine_state


def discard(job_dir: Path) -> None:
    """Delete every checkpoint of a finished job (its final adapter is kept separately)."""
    (job_dir / LATEST).unlink(missing_ok=True)
    for old in job_dir.glob("*ckpt-*"):
        shutil.rmtree(old, ignore_errors=True)
