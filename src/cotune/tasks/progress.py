"""Progress bars (tqdm) for evaluations and generation, which can run for many minutes on a CPU.

Shown by default only when stderr is a terminal (tqdm's own rule), so servers and pipes stay quiet; a command
forces them on or off for a block with ``progress(True | False)`` (``cotune train``'s ``progress`` key,
``--quiet``).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TypeVar

T = TypeVar("T")
_SHOW: ContextVar[bool | None] = ContextVar("cotune_progress", default=None)


@contextmanager
def progress(show: bool | None) -> Iterator[None]:
    """Within the block, evaluation bars are shown (True), hidden (False) or shown on a terminal only (None)."""
    token = _SHOW.set(show)
    try:
        yield
    finally:
        _SHOW.reset(token)


def chunks(items: Sequence[T], size: int, desc: str) -> Iterator[Sequence[T]]:
    """``items`` in slices of ``size`` with a bar named ``desc`` counting the slices."""
    from tqdm.auto import tqdm

    show = _SHOW.get()
    total = math.ceil(len(items) / size)
    with tqdm(total=total, desc=desc, unit="batch", leave=False, dynamic_ncols=True,
              disable=None if show is None else not show) as bar:
        for i in range(0, len(items), size):
            yield items[i : i + size]
            bar.update(1)
