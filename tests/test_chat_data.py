"""ShareGPT (``conversations``) and OpenAI ``messages`` data for the causal-LM task: the tokenizer's chat template,
the loss on assistant tokens only, clear errors naming the row. Dialogues are built from real Alpaca items."""

from __future__ import annotations

import json

import pytest
import yaml
from user_cli import TINY, cotune

from cotune.errors import CotuneError
from cotune.tasks import make_task
from cotune.tasks.causal_lm import IGNORE


def _alpaca(shared_data, n: int) -> list[dict]:
    items = json.loads((shared_data / "instruct" / "alpaca_en_demo.json").read_text())
    return [it for it in items if not it["input"] and len(it["output"]) < 300][:n]


def write_sharegpt(path, shared_data, rows: int = 8):
    """Two-turn ShareGPT dialogues (with a system prompt) from pairs of Alpaca items."""
    items = _alpaca(shared_data, 2 * rows)
    with open(path, "w") as f:
        for a, b in zip(items[::2], items[1::2]):
            conv = [{"from": "human", "value": a["instruction"]}, {"from": "gpt", "value": a["output"]},
                    {"from": "human", "value": b["instruction"]}, {"from": "gpt", "value": b["output"]}]
            f.write(json.dumps({"conversations": conv, "system": "You answer briefly."}) + "\n")
    return path


def write_messages(path, shared_data, rows: int = 4, bad: dict | None = None):
    items = _alpaca(shared_data, rows)
    with open(path, "w") as f:
        for i, a in enumerate(items, 1):
            msgs = [{"role": "user", "content": a["instruction"]}, {"role": "assistant", "content": a["output"]}]
            f.write(json.dumps(bad if bad and i == 3 else {"messages": msgs}) + "\n")
    return path


def _labelled_text(task, row) -> str:
    ids, labels = task.encode(row)
    assert len(ids) == len(labels)
    return task.tokenizer.decode([t for t in labels if t != IGNORE])


def test_sharegpt_loss_is_on_every_assistant_turn_only(shared_data, tmp_path):
    path = write_sharegpt(tmp_path / "chat.jsonl", shared_data)
    task = make_task("causal_lm", str(path), model="smollm2", max_length=1024)
    row = task.load("train").rows[0]
    assert [m["role"] for m in row["messages"]] == ["system", "user", "assistant", "user", "assistant"]
    learnt = _labelled_text(task, row)
    a1, a2 = row["messages"][2]["content"], row["messages"][4]["content"]
    assert learnt == f"{a1}<|im_end|>{a2}<|im_end|>"  # both assistant turns and their end-of-turn, nothing else
    # The inputs are exactly the template's rendering of the whole dialogue.
    ids, _ = task.encode(row)
    rendered = task.tokenizer.apply_chat_template(row["messages"], tokenize=False).rstrip("\n")
    assert task.tokenizer.decode(ids) == rendered
    # Generation starts after the last user turn, with the assistant header.
    prompt = task.tokenizer.decode(task.prompt_ids(row))
    assert prompt.endswith("<|im_start|>assistant\n") and row["messages"][3]["content"] in prompt and a2 not in prompt


def test_openai_messages_read_the_same_way(shared_data, tmp_path):
    path = write_messages(tmp_path / "m.jsonl", shared_data, rows=10)
    task = make_task("causal_lm", str(path), model="smollm2", max_length=1024)
    row = task.load("train").rows[0]
    assert _labelled_text(task, row) == row["messages"][-1]["content"] + "<|im_end|>"
    assert task.metric == "rouge_l"


@pytest.mark.parametrize("bad,message", [
    ({"messages": [{"content": "hi"}, {"role": "assistant", "content": "hello"}]}, "turn 1 of 'messages' has no 'role'"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " "}]}, "empty assistant turn"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "not an assistant turn"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "unknown role 'robot'"),
])
def test_bad_dialogues_name_the_row(shared_data, tmp_path, bad, message):
    path = write_messages(tmp_path / "bad.jsonl", shared_data, rows=4, bad=bad)
    task = make_task("causal_lm", str(path), model="smollm2")
    with pytest.raises(CotuneError, match="line 3") as e:
        task.load("train")
    assert message in str(e.value)


def test_train_on_sharegpt_from_the_command_line(shared_data, tmp_path):
    write_sharegpt(tmp_path / "chat.jsonl", shared_data, rows=12)
    cfg = {"model": "smollm2", "task": {"kind": "causal_lm", "data": "chat.jsonl",
                                        "options": {"max_length": 256, "max_new_tokens": 4}},
           "method": {"name": "lowrank", "options": {"r": 2, "target_modules": ["q_proj", "v_proj"]}},
           "optim": {"lr": 1e-3}, "output_dir": "runs/chat"}
    (tmp_path / "chat.yaml").write_text(yaml.safe_dump(cfg))
    out = cotune("train", "chat.yaml", *TINY, "eval_limit=2", "batch_size=2", "--quiet", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    assert summary["steps"] == 2 and "rouge_l" in summary["validation"]
