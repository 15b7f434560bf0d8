"""The order in which training visits a task's rows: one permutation per epoch, a pure function of the seed.

Both the trainer (``cotune train``) and the service's jobs draw their batches from it, so a run resumed from a
checkpoint recomputes exactly the batches it would have seen, with no RNG state to save.
"""

from __future__ import annotations

import functools

import numpy as np


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The row order of ``epoch``: a permutation of ``range(n)`` that depends on ``(seed, epoch)`` only."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def step_rows(n: int, batch_size: int, seed: int, step: int) -> np.ndarray:
    """Row indices of 0-based training step ``step``: epochs of ``ceil(n / batch_size)`` steps, the last batch of
    an epoch holding what is left, each epoch in its own ``epoch_order``."""
    epoch, pos = divmod(step, -(-n // batch_size))
    return _order(n, seed, epoch)[pos * batch_size : (pos + 1) * batch_size]


@functools.lru_cache(maxsize=4)
def _order(n: int, seed: int, epoch: int) -> np.ndarray:
    order = epoch_order(n, seed, epoch)
    order.flags.writeable = False  # shared by every step of the epoch
    return order
