"""Helpers for tests that run the command line as a user does: ``python -m cotune`` in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
#: Two steps on a few rows, appended to a real config as overrides.
TINY = ["max_steps=2", "train_limit=8", "batch_size=4", "eval_limit=4", "eval_batch_size=4", "test=false"]


def cotune(*args: str, cwd: Path, timeout: int = 600, stdin: str | None = None) -> subprocess.CompletedProcess:
    """``python -m cotune ARGS`` in ``cwd``, offline and on one thread, as a user would type it."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("COTUNE_DATA", None)
    return subprocess.run(
        [sys.executable, "-m", "cotune", *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, input=stdin,
    )
