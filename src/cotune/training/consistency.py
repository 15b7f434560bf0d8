"""MAdaKron's consistency loss as a training objective: two forwards with independent expert draws.

``loss = CE(logits₁, y) + w · ½[KL(sg p₂‖p₁) + KL(sg p₁‖p₂)]`` on the classification logits (MAdaKron: ``adapters/families/kron.py``),
switched on by a kron config's ``consistency_loss: w`` (AdaKron's ``--use_consistency_loss 1`` is ``w = 1``).
Built here, from the task's logits, so that neither the family nor the engines need to know about it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cotune.adapters.base import AdapterConfig
from cotune.adapters.families.kron import consistency_loss
from cotune.engines.base import LossFn
from cotune.errors import CotuneError


def consistency_weight(configs: Sequence[AdapterConfig]) -> float:
    """The largest ``consistency_loss`` weight among the configs (0: off)."""
    return max((float(getattr(c, "consistency_loss", 0.0) or 0.0) for c in configs), default=0.0)


def with_consistency(task: Any, weight: float) -> LossFn:
    """The task's cross-entropy on a first forward plus ``weight`` times the consistency term with a second."""
    if not hasattr(task, "logits") or getattr(task, "regression", False) or task.kind != "seq_cls":
        raise CotuneError(
            "consistency_loss is defined on classification logits: use it with task.kind=seq_cls (not regression), "
            f"or set it to 0 (task kind {task.kind!r})"
        )

    def loss_fn(model: nn.Module, batch: dict) -> torch.Tensor:
        first = task.logits(model, batch).float()
        second = task.logits(model, batch).float()  # new expert draws: each site call gets a fresh seed
        return F.cross_entropy(first, batch["labels"]) + weight * consistency_loss(first, second)

    return loss_fn
