"""Admission control: a job trains only when the step it joins fits the server's memory budget.

Every active job trains in ONE mixed step, so what must fit is the step of all of them together: their rows
concatenated and padded to the longest row. ``step_bytes`` estimates that step's peak memory above the loaded
base model from the model's shape alone (no allocation, so it can refuse a job before it exists):

    per layer   116 B · tokens · hidden  +  12.5 B · rows · heads · length²   (activations kept for backward;
                                                                           the second term where the attention
                                                                           keeps its scores)
    logits      12 B · tokens · vocab                                          (causal LM: logits, shift, softmax)
    plus        100 MB                                                         (allocator and first touches)

The two per-layer constants are fitted on the peak RSS of five MiniLM steps in a row (8×128, 32×128, 8×512
rows × tokens, fp32, backprop, LoRA on every layer, BERT's attention with dropout), the largest of three fresh
processes, and rounded up: least squares gives 115.3 B, 12.4 B and 30 MB. Five steps, not one, because glibc's
heap keeps freed activations once its adaptive mmap threshold has risen, so a server's later steps peak higher
than its first: at 16×256 one step's peak read 1.69–2.01 GB across 13 processes, five or more steps' 1.98–2.05.
(A fixed ``MALLOC_MMAP_THRESHOLD_`` makes the peak 1.41 GB and exact, but costs 30% of the step's time.) Tested
against fresh measurements of a shape it was not fitted on and of SmolLM2 (fused attention, no scores kept) to
bound them from above by at most 1.7×. A zo step keeps no activations for a backward: two layers' worth are
live at a time. The budget is ``--memory-limit-mb`` (default: half the machine's memory) minus the base model's
weights.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from cotune.errors import CotuneError

ACTIVATION_BYTES = 116  # per token, layer and hidden unit
ATTENTION_BYTES = 12.5  # per attention score (rows · heads · length² per layer)
LOGIT_BYTES = 12  # per token and vocabulary entry
OVERHEAD_BYTES = 100 * 2**20


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs of the base model."""

    layers: int
    hidden: int
    heads: int
    vocab: int
    causal: bool
    #: the attention keeps its (rows, heads, length, length) scores: eager attention, or SDPA with dropout (its
    #: math path); SDPA without dropout runs fused kernels that keep none
    scores: bool = True

    @classmethod
    def of(cls, model: Any, causal: bool) -> ModelShape:
        c = model.config
        dropout = float(getattr(c, "attention_probs_dropout_prob", None) or getattr(c, "attention_dropout", 0) or 0)
        scores = getattr(c, "_attn_implementation", "eager") != "sdpa" or dropout > 0
        return cls(int(c.num_hidden_layers), int(c.hidden_size), int(c.num_attention_heads), int(c.vocab_size), causal,
                   scores)


def step_tokens(spec: dict[str, Any]) -> int:
    """The token slots of one of the job's steps (``batch_size x max_length``): what a step costs the round
    it joins, and what the compute quota counts."""
    return int(spec.get("batch_size", 8)) * int(spec.get("max_length", 128))


def step_bytes(shape: ModelShape, specs: list[dict[str, Any]]) -> int:
    """Estimated peak bytes (above the base weights) of one mixed step of the jobs with these specs."""
    if not specs:
        return 0
    rows = sum(int(s.get("batch_size", 8)) for s in specs)
    length = max(int(s.get("max_length", 128)) for s in specs)
    tokens = rows * length
    layer = ACTIVATION_BYTES * tokens * shape.hidden
    if shape.scores:
        layer += ATTENTION_BYTES * rows * shape.heads * length**2
    live = shape.layers if any(s.get("engine", "backprop") != "zo" for s in specs) else min(2, shape.layers)
    logits = LOGIT_BYTES * tokens * shape.vocab if shape.causal else 0
    return int(OVERHEAD_BYTES + live * layer + logits)


def machine_memory() -> int:
    """The machine's physical memory in bytes."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


@dataclass
class Admission:
    """The server's memory budget for training steps, and the decisions made against it."""

    shape: ModelShape
    budget: int  # bytes a step may take above the base weights

    def refuse_alone(self, spec: dict[str, Any]) -> None:
        """``CotuneError`` naming what to lower when the job cannot fit even with no other job running."""
        need = step_bytes(self.shape, [spec])
        if need > self.budget:
            raise CotuneError(
                f"this job's training step needs about {need / 2**30:.1f} GiB (batch_size {spec.get('batch_size', 8)}"
                f" x max_length {spec.get('max_length', 128)}) and this server's budget is {self.budget / 2**30:.1f}"
                " GiB: lower batch_size or max_length"
            )

    def fits(self, running: list[dict[str, Any]], spec: dict[str, Any]) -> bool:
        """Whether the job can join the running ones (otherwise it waits, queued, until some finish)."""
        return step_bytes(self.shape, [*running, spec]) <= self.budget
