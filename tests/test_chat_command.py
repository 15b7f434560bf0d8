"""``cotune chat``: a trained causal-LM adapter answers a prompt (one-shot and from stdin), streamed to stdout."""

from __future__ import annotations

import pytest
import torch
from user_cli import cotune

from cotune.adapters import attach, save_adapter, trainable_parameters
from cotune.models import load_model, load_tokenizer

QUESTION = "Name a primary colour."


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    """A SmolLM2 low-rank adapter with non-zero weights, and the greedy answer it gives to QUESTION."""
    folder = tmp_path_factory.mktemp("chat") / "adapter"
    model = load_model("smollm2", "causal_lm").eval()
    attach(model, "lowrank", r=2, target_modules=["q_proj", "v_proj"])
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in trainable_parameters(model).values():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    save_adapter(model, folder)
    tok = load_tokenizer("smollm2")
    text = tok.apply_chat_template([{"role": "user", "content": QUESTION}], tokenize=False, add_generation_prompt=True)
    enc = tok(text, add_special_tokens=False, return_tensors="pt")
    with torch.no_grad():
        ids = model.generate(**enc, max_new_tokens=6, do_sample=False, pad_token_id=tok.eos_token_id)
    return folder, tok.decode(ids[0, enc["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def test_chat_one_shot_prints_the_adapters_answer(adapter, tmp_path):
    folder, want = adapter
    out = cotune("chat", "--adapter", str(folder), "--prompt", QUESTION, "--max-new-tokens", "6", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert want and out.stdout.strip() == want


def test_chat_reads_turns_from_stdin(adapter, tmp_path):
    folder, want = adapter
    out = cotune("chat", "--adapter", str(folder), "--max-new-tokens", "6", cwd=tmp_path,
                 stdin=f"{QUESTION}\n/reset\n{QUESTION}\n/exit\nnever read\n")
    assert out.returncode == 0, out.stderr
    answers = [line for line in out.stdout.splitlines() if line.strip()]
    assert answers == [want, want]  # /reset: the second answer starts afresh


def test_chat_refuses_a_classification_adapter(tmp_path, minilm_cls):
    attach(minilm_cls, "lowrank", r=2)
    save_adapter(minilm_cls, tmp_path / "cls")
    out = cotune("chat", "--adapter", str(tmp_path / "cls"), "--prompt", "hi", cwd=tmp_path)
    assert out.returncode == 2 and "causal-LM adapter" in out.stderr and "Traceback" not in out.stderr
