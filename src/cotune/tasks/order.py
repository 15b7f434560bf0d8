"""The order in which training visits a task's rows: one permutation per epoch, a pure function of the seed.

Both the trainer (``cotune train``) and the service's jobs draw their batches from it, so a run resumed from a
checkpoint recomputes exactly the batches it would have seen, with no RNG state to save.
"""

from __future__ import annotations

import numpy as np


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The row order of ``epoch``: a permutation of ``range(n)`` that depends on ``(seed, epoch)`` only."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def stream_batch(n: int, batch_size: int, seed: int, step: int) -> list[int]:
    """Row indices of batch ``step`` when the epochs follow each other without a break.

    Position ``p = step·batch_size + j`` of the stream is row ``epoch_order(n, seed, p // n)[p % n]``, so a batch
    may end one epoch and start the next (or span several when ``n < batch_size``).
    """
    first, stop = step * batch_size, (step + 1) * batch_size
    orders = {e: epoch_order(n, seed, e) for e in range(first // n, (stop - 1) // n + 1)}
    return [int(orders[p // n][p % n]) for p in range(first, stop)]
