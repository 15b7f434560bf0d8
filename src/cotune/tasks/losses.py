"""The losses on a model's output, shared by a single job (``Task.loss``) and a tenant in a mixed batch.

Each is a mean over the rows (or answer tokens) it is given, which is what makes a tenant's loss in a
mixed batch its loss alone.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

#: label value of tokens that are not trained on (prompt, padding): transformers' convention
IGNORE = -100


def classification_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy (mean over rows); one output column means regression (MSE), as in transformers."""
    labels = labels.to(logits.device)
    if logits.shape[-1] == 1:
        return F.mse_loss(logits.squeeze(-1).float(), labels.float())
    return F.cross_entropy(logits.float(), labels.long())


def next_token_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed next-token NLL over the trained tokens, their count): labels shifted by one position."""
    logits = logits[:, :-1].float()
    target = labels.to(logits.device)[:, 1:]
    nll = F.cross_entropy(logits.reshape(-1, logits.size(-1)), target.reshape(-1), ignore_index=IGNORE, reduction="sum")
    return nll, (target != IGNORE).sum()


def next_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the trained tokens (``-100`` ignored)."""
    nll, n = next_token_nll(logits, labels)
    return nll / n.clamp(min=1)  # clamp instead of a host sync per step (encoders keep >= 1 answer token)


def output_loss(logits: torch.Tensor, targets: dict[str, torch.Tensor]) -> torch.Tensor:
    """The loss a tenant trains with by default: next-token for per-token logits, classification otherwise."""
    labels = targets["labels"]
    if logits.dim() == 3:  # a mixed batch is padded on the right to its longest row: the tenant's own length
        return next_token_loss(logits[:, : labels.shape[1]], labels)
    return classification_loss(logits, labels)
