"""The classification head reads the sentence embedding a sentence-transformers checkpoint defines.

A sentence-transformers checkpoint (e.g. ``all-MiniLM-L6-v2``) lists its modules in ``modules.json``; its
``Pooling`` module's ``config.json`` says how token states become the sentence embedding (mean over the
attention mask, the first token, or the max). Such a model was trained through that pooling only: BERT's
``pooler`` (first token → dense → tanh) holds weights it never trained, and a head on it starts from noise
(MiniLM zero-shot 0.588 through the pooler against 0.725 mean-pooled, issue 20). ``pooling="auto"`` (the
default) therefore replaces the ``pooler`` of a BERT-style base (the module the sequence-classification head
reads) by ``SentencePooler`` in the checkpoint's mode; ``"model"`` keeps the model's own pooler; ``"mean"``,
``"cls"``, ``"max"`` force a mode.

PEFT loads the adapter and the head (``modules_to_save``) of such a job, but not the pooling: run there, the
head reads BERT's pooler again. cotune records the mode in the adapter folder's ``adapter_config.json``
(``cotune_pooling``) and rebuilds it on load.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cotune.errors import CotuneError

log = logging.getLogger("cotune")

#: sentence-transformers' ``pooling_mode_*`` keys of the modes a ``SentencePooler`` computes
MODES = {"mean": "pooling_mode_mean_tokens", "cls": "pooling_mode_cls_token", "max": "pooling_mode_max_tokens"}
CHOICES = ("auto", "model", *MODES)


def check_choice(pooling: str) -> str:
    """``pooling`` when it is one of ``CHOICES``; a ``CotuneError`` naming them otherwise."""
    if pooling not in CHOICES:
        raise CotuneError(f"pooling must be one of {list(CHOICES)}, not {pooling!r}")
    return pooling


def checkpoint_pooling(spec: str) -> str | None:
    """The pooling mode of a sentence-transformers checkpoint (a folder or a hub id); ``None`` when ``spec`` is not
    one, or pools in a way ``SentencePooler`` does not compute (several modes at once, weighted, last token)."""
    modules = _file(spec, "modules.json")
    if modules is None:
        return None
    try:
        entries = json.loads(Path(modules).read_text())
        entry = next((m for m in entries if str(m.get("type", "")).endswith("models.Pooling")), None)
        if entry is None:
            return None
        config = _file(spec, f"{entry['path']}/config.json")
        cfg = json.loads(Path(config).read_text()) if config else {}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CotuneError(f"{spec}: modules.json or its Pooling config.json cannot be read ({e}); fix or remove "
                          "them, or pass pooling='model'") from e
    on = [k for k, v in cfg.items() if k.startswith("pooling_mode") and v]
    modes = [m for m, key in MODES.items() if key in on]
    if len(on) != 1 or len(modes) != 1:
        log.warning("%s pools with %s; cotune's head reads the model's own pooler instead", spec, on or "nothing")
        return None
    return modes[0]


def _file(spec: str, name: str) -> str | None:
    folder = Path(spec)
    if folder.is_dir():
        return str(folder / name) if (folder / name).is_file() else None
    from transformers.utils import cached_file  # a hub id: the hub's copy (or the local cache when offline)

    try:
        return cached_file(spec, name, _raise_exceptions_for_missing_entries=False,
                           _raise_exceptions_for_connection_errors=False)
    except OSError:
        return None


class SentencePooler(nn.Module):
    """Token states ``(n, T, d)`` → sentence embedding ``(n, d)``, over the rows' attention mask.

    It stands in the place of BERT's ``pooler`` (which sees only the hidden states), so the base model's forward
    pre-hook ``read_mask`` hands it the attention mask of the call."""

    def __init__(self, mode: str) -> None:
        super().__init__()
        if mode not in MODES:
            raise CotuneError(f"pooling mode must be one of {list(MODES)}, not {mode!r}")
        self.mode = mode
        self._mask: torch.Tensor | None = None

    def read_mask(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        self._mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        mask = self._mask
        if self.mode == "cls":
            return hidden[:, 0]
        if mask is None or mask.dim() != 2 or mask.shape != hidden.shape[:2]:
            mask = torch.ones(hidden.shape[:2], dtype=hidden.dtype, device=hidden.device)
        m = mask.to(hidden.dtype).unsqueeze(-1)
        if self.mode == "max":  # sentence-transformers sets padding to -1e9 before the max
            return hidden.masked_fill(m == 0, torch.finfo(hidden.dtype).min).amax(dim=1)
        return (hidden * m).sum(dim=1) / m.sum(dim=1).clamp(min=1e-9)

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}"


def apply_pooling(model: nn.Module, spec: str, pooling: str = "auto") -> str | None:
    """Make the sequence-classification head of ``model`` (loaded from ``spec``) read ``pooling``; the mode used
    (``None``: the model's own pooler)."""
    if check_choice(pooling) == "model":
        return None
    mode = checkpoint_pooling(spec) if pooling == "auto" else pooling
    if mode is None:
        return None
    base = getattr(model, getattr(model, "base_model_prefix", ""), None)
    if not isinstance(getattr(base, "pooler", None), nn.Module):
        msg = (f"{type(model).__name__}'s head does not read a pooler module, so pooling {mode!r} cannot be "
               "applied; pass pooling='model'")
        if pooling != "auto":
            raise CotuneError(msg)
        log.warning("%s (the checkpoint pools with %r)", msg, mode)
        return None
    pooler = SentencePooler(mode)
    base.pooler = pooler
    base.register_forward_pre_hook(pooler.read_mask, with_kwargs=True)
    model.config.cotune_pooling = mode  # saved with the model config; adapters record it too
    return mode
