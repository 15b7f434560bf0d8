"""Shared fixtures: the real data in ../shared/data and the real packaged models."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} not present (the real data sets live beside the repository)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def minilm_tokenizer():
    from cotune.models import load_tokenizer

    return load_tokenizer("minilm")


@pytest.fixture
def minilm_cls():
    """A fresh MiniLM sequence classifier (2 labels), fp32, eval mode, deterministic head init."""
    from cotune.models import load_model

    torch.manual_seed(0)
    return load_model("minilm", "seq_cls", num_labels=2).eval()


@pytest.fixture
def sst2_batch(shared_data, minilm_tokenizer):
    """Eight real SST-2 dev rows, tokenized: (batch dict, labels)."""
    rows = (shared_data / "glue" / "SST-2" / "dev.tsv").read_text().splitlines()[1:9]
    sents, labels = zip(*(r.rsplit("\t", 1) for r in rows))
    enc = minilm_tokenizer(list(sents), return_tensors="pt", padding=True, truncation=True, max_length=64)
    return dict(enc), torch.tensor([int(x) for x in labels])


@pytest.fixture(scope="module")
def small():
    """Two-layer MiniLM (its real first layers, pooler and a new head) and four 4 x 64-token SST-2 batches: the
    gradient-learning checks' model (``cotune verify``'s own helpers)."""
    from cotune.commands import verify
    from cotune.models import load_model, load_tokenizer

    torch.manual_seed(0)
    base = verify.keep_layers(load_model("minilm", "seq_cls", num_labels=2).eval(), 2)
    return base, verify.batches(load_tokenizer("minilm"), 4, 64)
