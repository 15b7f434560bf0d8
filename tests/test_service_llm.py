"""LLM fine-tuning as a service: ``cotune serve --model smollm2`` over real HTTP, chat data, the OpenAI client.

What is proven here (one SmolLM2-135M-Instruct server subprocess, real Alpaca rows as OpenAI ``messages``):
* a job trained through the service equals the same job run by ``cotune train`` (seed, data order, config):
  adapters equal to 1e-6;
* three tenants trained at once with three families and the three engines (lowrank/backprop, kron/gl,
  loretta_adp/zo), then asked concurrently through the real ``openai`` client: each answer equals the same
  request asked alone, and the lowrank tenant's equals Hugging Face ``generate`` on its adapter loaded by PEFT;
* streaming (server-sent events) gives the same text as the plain answer; ``/v1/completions``, ``/v1/models``;
* OpenAI's fine-tuning API through the ``openai`` client (files.create, fine_tuning.jobs.create / retrieve /
  list / list_events / cancel) trains exactly the cotune job it documents: adapters equal to the last bit;
* the README's walkthrough (``sh`` and ``py`` blocks of its LLM section) runs as written against this server,
  with the job shortened by appended flags (the fine-tuning example on 6 rows of its file);
* isolation and errors in OpenAI's shape: another tenant's model is 404, a bad key 401, ``max_tokens`` over the
  limit or past the context window 400; a chat file with an empty assistant turn fails its job naming the line
  and the upload's name (never a server path); rows longer than ``max_length`` are counted in the job's metrics.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import load_file
from user_cli import cotune

from cotune.service.client import Client
from cotune.service.launch import ServerProcess

openai = pytest.importorskip("openai")

REPO = Path(__file__).resolve().parents[1]

JOB = {"task": "causal_lm", "steps": 4, "batch_size": 2, "max_length": 64, "seed": 3,
       "task_options": {"max_new_tokens": 8}, "optim": {"lr": 2e-3}}
QUESTION = [{"role": "user", "content": "Give three tips for staying healthy."}]


def chat_rows(shared_data, n: int = 40, offset: int = 0) -> bytes:
    """Real Alpaca items written as OpenAI chat-format JSONL (``messages``), as a chat user would upload them."""
    items = json.loads((shared_data / "instruct" / "alpaca_en_demo.json").read_text())[offset : offset + n]
    lines = []
    for it in items:
        user = it["instruction"] + (f"\n\n{it['input']}" if it.get("input") else "")
        lines.append(json.dumps({"messages": [{"role": "user", "content": user},
                                              {"role": "assistant", "content": it["output"]}]}))
    return ("\n".join(lines) + "\n").encode()


@pytest.fixture(scope="module")
def server(tmp_path_factory, shared_data):
    root = tmp_path_factory.mktemp("llm") / "root"
    args = ["--threads", "1", "--max-new-tokens", "9000", "--data-root", str(shared_data / "instruct")]
    with ServerProcess(root, args, model="smollm2") as srv:
        yield srv


@pytest.fixture(scope="module")
def tenants(server, shared_data):
    """Three tenants, each with a job of another family and engine, trained together on the shared base."""
    specs = {"alice": {"method": "lowrank", "adapter": {"r": 4}, "engine": "backprop"},
             "bob": {"method": "kron", "engine": "gl"},
             "carol": {"method": "loretta_adp", "engine": "zo", "optim": {"optimizer": "sgd", "lr": 1e-3}}}
    out = {}
    for k, (name, extra) in enumerate(specs.items()):
        c = Client(server.url)
        c.register(name)
        f = c.upload_bytes(chat_rows(shared_data, offset=40 * k), "chat.jsonl")
        job = c.submit({**JOB, "train": {"file_id": f["id"]}, **extra})
        out[name] = (c, f, job)
    for name, (c, f, job) in out.items():
        st = c.wait(job["id"], timeout=600)
        assert st["status"] == "succeeded", (name, st, server.log_tail())
        out[name] = (c, f, st)
    yield out
    for c, _, _ in out.values():
        c.close()


def oai(server, client: Client):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=client.token, max_retries=0)


def ask(api, model: str, **kw) -> str:
    r = api.chat.completions.create(model=model, messages=QUESTION, max_tokens=8, temperature=0, **kw)
    return r.choices[0].message.content


def test_service_job_equals_cotune_train(tenants, shared_data, tmp_path):
    c, f, st = tenants["alice"]
    data = tmp_path / "chat.jsonl"
    data.write_bytes(chat_rows(shared_data))
    run = tmp_path / "run"
    (tmp_path / "job.yaml").write_text(
        "model: smollm2\n"
        f"task: {{kind: causal_lm, data: {data}, options: {{max_length: 64, max_new_tokens: 8}}}}\n"
        "method: {name: lowrank, options: {r: 4}}\nengine: {name: backprop}\noptim: {lr: 0.002}\n"
        f"seed: 3\nbatch_size: 2\nmax_steps: 4\noutput_dir: {run}\n"
    )
    out = cotune("train", "job.yaml", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    served = load_file(c.download(st["id"], tmp_path / "served") / "adapter_model.safetensors")
    trained = load_file(run / "adapter" / "adapter_model.safetensors")
    assert served.keys() == trained.keys() and served
    moved = 0.0
    for k in served:
        torch.testing.assert_close(served[k], trained[k], atol=1e-6, rtol=0)
        moved = max(moved, float(served[k].abs().max()))
    assert moved > 0  # the adapters trained (B left zero)
    assert 0 < st["result"]["truncated_rows"] <= 32  # Alpaca answers are longer than 64 tokens: counted, and cut
    assert any(m["name"] == "truncated_rows" and m["step"] == 0 for m in c.metrics(st["id"]))


def test_openai_client_mixed_tenants_equal_each_alone_and_peft(server, tenants, tmp_path):
    from peft import PeftModel

    from cotune.models import load_model, load_tokenizer

    apis = {name: (oai(server, c), st["id"]) for name, (c, _, st) in tenants.items()}
    alone = {name: ask(api, model) for name, (api, model) in apis.items()}
    assert len(set(alone.values())) == 3  # three different adapters, three different answers
    calls = list(apis.items()) * 2
    with ThreadPoolExecutor(len(calls)) as ex:  # concurrent: the runner decodes them in one batch
        together = list(ex.map(lambda kv: (kv[0], ask(*kv[1])), calls))
    assert all(text == alone[name] for name, text in together)
    tok = load_tokenizer("smollm2")
    c, _, st = tenants["alice"]
    peft = PeftModel.from_pretrained(load_model("smollm2", "causal_lm"), str(c.download(st["id"], tmp_path / "a"))).eval()
    text = tok.apply_chat_template(QUESTION, tokenize=False, add_generation_prompt=True)
    ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        ref = peft.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                            pad_token_id=tok.eos_token_id)
    assert alone["alice"] == tok.decode(ref[0, ids.shape[1] :], skip_special_tokens=True)


def test_streaming_completions_models_and_chat_command(server, tenants, tmp_path):
    c, _, st = tenants["bob"]
    api = oai(server, c)
    plain = ask(api, st["id"])
    out = cotune("chat", "--server", server.url, "--model", st["id"], "--token", c.token, "--prompt",
                 QUESTION[0]["content"], "--max-new-tokens", "8", cwd=tmp_path)
    assert out.returncode == 0 and out.stdout.strip() == plain.strip(), out.stderr
    chunks = list(api.chat.completions.create(model=st["id"], messages=QUESTION, max_tokens=8, temperature=0,
                                              stream=True))
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == plain
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[-1].choices[0].finish_reason == "length"
    ids = [m.id for m in api.models.list().data]
    assert ids[0] == "smollm2" and st["id"] in ids and tenants["alice"][2]["id"] not in ids
    done = api.completions.create(model="smollm2", prompt="The capital of France is", max_tokens=5, temperature=0)
    again = api.completions.create(model="smollm2", prompt="The capital of France is", max_tokens=5, temperature=0)
    assert done.choices[0].text and done.choices[0].text == again.choices[0].text
    assert done.usage.completion_tokens == 5 and done.usage.prompt_tokens > 3
    cut = api.completions.create(model="smollm2", prompt="The capital of France is", max_tokens=5, temperature=0,
                                 stop=[done.choices[0].text.strip()[:2]])
    assert cut.choices[0].finish_reason == "stop" and len(cut.choices[0].text) < len(done.choices[0].text)
    a, b = (api.completions.create(model=st["id"], prompt="Once upon a time", max_tokens=6, temperature=1.0, seed=5)
            for _ in range(2))
    assert a.choices[0].text == b.choices[0].text  # a seeded draw is reproducible


def test_isolation_and_errors_in_openai_shape(server, tenants, shared_data):
    (ca, _, sa), (cb, _, _) = tenants["alice"][:3], tenants["bob"][:3]
    bob = oai(server, cb)
    with pytest.raises(openai.NotFoundError):  # another tenant's model is not found, like a missing one
        ask(bob, sa["id"])
    with pytest.raises(openai.NotFoundError):
        ask(bob, "no-such-job")
    with pytest.raises(openai.AuthenticationError):
        ask(openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0), sa["id"])
    api = oai(server, ca)
    with pytest.raises(openai.BadRequestError, match="over this server's limit"):
        api.chat.completions.create(model=sa["id"], messages=QUESTION, max_tokens=9001)
    with pytest.raises(openai.BadRequestError, match="context window"):
        api.chat.completions.create(model=sa["id"], messages=QUESTION, max_tokens=8190)
    with pytest.raises(openai.BadRequestError) as e:
        api.chat.completions.create(model=sa["id"], messages=QUESTION, temperature=5)
    assert e.value.body["param"] == "temperature" and e.value.status_code == 400
    r = httpx.post(server.url + "/v1/chat/completions", json={"model": sa["id"], "messages": []},
                   headers={"Authorization": f"Bearer {ca.token}"})
    assert r.status_code == 400 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    rows = chat_rows(shared_data, n=3).decode().splitlines()
    rows[1] = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " "}]})
    f = ca.upload_bytes(("\n".join(rows) + "\n").encode(), "bad.jsonl")
    st = ca.wait(ca.submit({**JOB, "train": {"file_id": f["id"]}})["id"], timeout=120)
    assert st["status"] == "failed" and "line 2: turn 2: empty assistant turn" in st["error"]
    assert "uploaded file 'bad.jsonl'" in st["error"] and str(server.root.resolve()) not in st["error"]
    assert ask(api, sa["id"]) == ask(api, sa["id"])  # the failed job touched nothing of the others


def test_openai_fine_tuning_api_trains_the_job_it_documents(server, shared_data, tmp_path):
    """The whole loop through the ``openai`` client: files.create, fine_tuning.jobs.create / retrieve / list /
    list_events / cancel, then chat with ``fine_tuned_model``. The reference is the cotune job its docstring says
    it is (steps = ceil(n_epochs x rows / batch_size), lr = multiplier x LoRA's tuned rate, every row trained, the
    validation file scored on the way), submitted natively after it: the two adapters are equal to the last bit
    (each trains alone: jobs in one round are padded together, which moves the last bits)."""
    import time

    from cotune.adapters.methods import default_lr

    c = Client(server.url)
    c.register("dave")
    api = oai(server, c)
    rows, held = chat_rows(shared_data, n=7, offset=120), chat_rows(shared_data, n=3, offset=130)
    train = api.files.create(file=("chat.jsonl", rows), purpose="fine-tune")
    valid = api.files.create(file=("valid.jsonl", held), purpose="fine-tune")
    assert (train.object, train.bytes, train.filename, train.purpose) == ("file", len(rows), "chat.jsonl", "fine-tune")
    assert c.request("GET", f"/v1/files/{train.id}/content").content == rows
    hyper = {"n_epochs": 2, "batch_size": 4, "learning_rate_multiplier": 2.0}
    job = api.fine_tuning.jobs.create(model="smollm2", training_file=train.id, validation_file=valid.id, seed=3,
                                      method={"type": "supervised", "supervised": {"hyperparameters": hyper}})
    assert job.object == "fine_tuning.job" and job.fine_tuned_model is None and job.status in ("queued", "running")
    assert job.hyperparameters.n_epochs == 2 and job.hyperparameters.batch_size == 4 and job.seed == 3
    assert c.status(job.id)["total_steps"] == 4  # ceil(2 epochs x 7 rows / 4)
    deadline = time.time() + 600
    while (job := api.fine_tuning.jobs.retrieve(job.id)).status not in ("succeeded", "failed", "cancelled"):
        assert time.time() < deadline, server.log_tail()
        time.sleep(0.5)
    assert job.status == "succeeded" and job.fine_tuned_model == job.id and job.finished_at, job.error
    # trained_tokens: 4 steps of 4 rows are both epochs, each of the 7 rows twice, every templated token of a row
    # but the newline the template writes after the last end-of-turn (not trained), up to max_length (one row of
    # the seven is 560 tokens: 512 of them train)
    from transformers import AutoTokenizer

    from cotune.models import smollm2_path

    tok = AutoTokenizer.from_pretrained(smollm2_path())
    templated = sum(min(512, len(tok(tok.apply_chat_template(json.loads(line)["messages"], tokenize=False)
                                         .rstrip("\n"), add_special_tokens=False)["input_ids"])) for line in rows.splitlines())
    assert job.trained_tokens == 2 * templated == sum(m["value"] for m in c.metrics(job.id) if m["name"] == "tokens")
    twin = c.submit({"task": "causal_lm", "method": "lowrank", "steps": 4, "batch_size": 4, "max_length": 512,
                     "seed": 3, "optim": {"lr": 2.0 * default_lr("lowrank")}, "train": {"file_id": train.id},
                     "eval": {"file_id": valid.id}, "eval_every": 1,  # ceil(4 / 5): four points before the end
                     "task_options": {"val_fraction": 0.0, "test_fraction": 0.0, "metric": "loss"}})
    assert c.wait(twin["id"], timeout=600)["status"] == "succeeded"
    ours = load_file(c.download(job.id, tmp_path / "ours") / "adapter_model.safetensors")
    native = load_file(c.download(twin["id"], tmp_path / "native") / "adapter_model.safetensors")
    assert ours.keys() == native.keys() and ours
    for k in ours:
        torch.testing.assert_close(ours[k], native[k], atol=0, rtol=0)
    # events: newest first, one per step with the training loss the job logged, and the validation loss
    events = api.fine_tuning.jobs.list_events(job.id, limit=100).data
    assert events[0].message == "The job has successfully completed" and events[-1].message == "Created fine-tuning job"
    steps = [e for e in events if e.type == "metrics"][::-1]
    logged = {m["step"]: m["value"] for m in c.metrics(job.id) if m["name"] == "loss"}
    valid_loss = {m["step"]: m["value"] for m in c.metrics(job.id) if m["name"] == "eval_loss"}
    assert [e.data["step"] for e in steps] == [1, 2, 3, 4] and sorted(valid_loss) == [1, 2, 3, 4]
    assert all(e.data["train_loss"] == logged[e.data["step"]] and e.data["valid_loss"] == valid_loss[e.data["step"]]
               for e in steps)
    assert steps[-1].message.startswith("Step 4/4: training loss=") and "validation loss=" in steps[-1].message
    first = api.fine_tuning.jobs.list_events(job.id, limit=2)
    assert first.has_more and [e.id for e in first.data] == [e.id for e in events[:2]]
    after = api.fine_tuning.jobs.list_events(job.id, limit=2, after=first.data[-1].id)
    assert [e.id for e in after.data] == [e.id for e in events[2:4]]
    assert [j.id for j in api.fine_tuning.jobs.list().data] == [job.id]  # not the native twin
    assert ask(api, job.fine_tuned_model) == ask(api, twin["id"])
    # errors, in OpenAI's shape
    with pytest.raises(openai.ConflictError):
        api.fine_tuning.jobs.cancel(job.id)
    with pytest.raises(openai.NotFoundError):
        api.fine_tuning.jobs.retrieve(twin["id"])
    with pytest.raises(openai.BadRequestError) as e:
        api.fine_tuning.jobs.create(model="gpt-4o-mini", training_file=train.id)
    assert e.value.body["param"] == "model" and "smollm2" in e.value.message
    with Client(server.url) as other:
        other.register("erin")
        stranger = oai(server, other)
        with pytest.raises(openai.NotFoundError):  # another tenant's file and job are not found, like missing ones
            stranger.fine_tuning.jobs.create(model="smollm2", training_file=train.id)
        with pytest.raises(openai.NotFoundError):
            stranger.fine_tuning.jobs.retrieve(job.id)
        assert stranger.fine_tuning.jobs.list().data == []
    with pytest.raises(openai.BadRequestError) as e:
        api.fine_tuning.jobs.create(model="smollm2", training_file=train.id, hyperparameters={"n_epochs": 10**6})
    assert e.value.body["param"] == "hyperparameters.n_epochs" and "875000 steps" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        api.fine_tuning.jobs.create(model="smollm2", training_file=train.id, suffix="mine")
    assert e.value.body["param"] == "suffix"
    with pytest.raises(openai.BadRequestError) as e:
        api.fine_tuning.jobs.create(model="smollm2", training_file=train.id, method={"type": "dpo"})
    assert e.value.body["param"] == "method.type"
    with pytest.raises(openai.BadRequestError):
        api.files.create(file=("chat.jsonl", rows), purpose="assistants")
    assert api.files.retrieve(valid.id).bytes == len(held) and api.files.delete(valid.id).deleted
    with pytest.raises(openai.NotFoundError):
        api.files.retrieve(valid.id)
    c.close()


def test_readme_walkthrough_runs_as_written(server, shared_data, tmp_path):
    text = (REPO / "README.md").read_text()
    section = text[text.index("## LLM fine-tuning as a service") : text.index("## How it fits together")]
    serve, steps = re.findall(r"^```sh\n(.*?)^```", section, flags=re.S | re.M)
    example, fine_tuning = re.findall(r"^```py\n(.*?)^```", section, flags=re.S | re.M)
    assert serve.startswith("cotune serve --model smollm2 ")  # the server this module runs
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    values: dict[str, str] = {}

    def fill(line: str) -> str:
        for k, v in values.items():
            line = line.replace(f"<{k}>", v)
        return line.replace("http://127.0.0.1:8000", server.url)

    env["COTUNE_URL"] = server.url
    out = None
    for line in filter(None, (ln.strip() for ln in steps.splitlines())):
        line = fill(line)
        if line.startswith("export "):
            key, _, value = line[len("export ") :].partition("=")
            env[key] = value
            continue
        args = shlex.split(line)
        if args[1:3] == ["client", "submit"]:
            args += ["--steps", "3", "--batch-size", "2", "--max-length", "64"]  # later flags win: a short job
        out = subprocess.run([sys.executable, "-m", "cotune", *args[1:]], cwd=REPO, env=env, capture_output=True,
                             text=True, timeout=900)
        assert out.returncode == 0, (line, out.stdout, out.stderr, server.log_tail())
        if args[1:3] == ["client", "register"]:
            values["token"] = json.loads(out.stdout)["token"]
        if args[1:3] == ["client", "submit"]:
            values["job"] = json.loads(out.stdout)["id"]
    assert out is not None and out.stdout.strip()  # the chat answered
    run = subprocess.run([sys.executable, "-c", fill(example)], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr
    listed, answer = run.stdout.split("\n", 1)
    assert "'smollm2'" in listed and values["job"] in listed and answer.strip()
    # the fine-tuning example on 6 of the file's 999 rows: one epoch at batch size 8 is one step
    small = tmp_path / "alpaca_small.json"
    small.write_text(json.dumps(json.loads((shared_data / "instruct" / "alpaca_en_demo.json").read_text())[:6]))
    source = fill(fine_tuning).replace("../shared/data/instruct/alpaca_en_demo.json", str(small))
    assert source != fill(fine_tuning)
    run = subprocess.run([sys.executable, "-c", source], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, (run.stderr, server.log_tail())
    status, answer = run.stdout.split("\n", 1)
    assert status.startswith("succeeded ['The job has successfully completed', 'Step 1/1: training loss=")
    assert answer.strip()
