"""The service over real HTTP: one ``cotune serve`` subprocess on a free loopback port, MiniLM, real SST-2 rows.

What is proven here:
* the whole tenant flow (register, upload, submit, poll, metrics, download, predict) works, and the downloaded
  adapter loaded into Hugging Face PEFT gives the same class probabilities as the server's predictions;
* predictions of two tenants answered in ONE routed base pass equal each tenant's own PEFT model;
* every endpoint refuses another tenant's jobs, files and adapters (404) and requests without a valid token (401);
* upload limits (413), path-escaping names, bad file types, server paths outside the data roots, and a
  malformed data file (the job fails with a readable reason; the server keeps serving); the same for OpenAI's
  multipart upload (``files.create``), whose limit holds while the body streams in;
* adapters above a layer's width or the server's parameter limit are refused before anything is built, and a
  one-class training file, a job whose evaluation answers one class, or a regression job whose predictions
  collapse to one value, trains with a warning in the job's metrics and result;
* deleting jobs, adapters and files frees their storage; a rotated token replaces the old one at once;
* the OpenAPI schema lists the endpoints; the ``cotune client`` command talks to the server.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import zipfile
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

from cotune.commands.client import curve_records
from cotune.service.client import Client, ServiceError
from cotune.service.launch import ServerProcess

TINY = {"steps": 6, "batch_size": 4, "max_length": 32, "adapter": {"r": 4}, "optim": {"lr": 5e-3}}
TEXTS = ["a gorgeous, witty, seductive movie.", "the plot is nothing but boilerplate clichés", "it is what it is"]


def sst2_rows(shared_data, n: int = 64, offset: int = 0) -> bytes:
    lines = (shared_data / "glue" / "SST-2" / "train.tsv").read_text().splitlines()
    return ("\n".join([lines[0], *lines[1 + offset : 1 + offset + n]]) + "\n").encode()


@pytest.fixture(scope="module")
def server(tmp_path_factory, shared_data):
    root = tmp_path_factory.mktemp("svc") / "root"
    args = ["--threads", "1", "--max-upload-mb", "0.05", "--data-root", str(shared_data / "glue" / "SST-2"),
            "--checkpoint-every", "3", "--max-adapter-params", "1000000"]
    with ServerProcess(root, args) as srv:
        yield srv


@pytest.fixture(scope="module")
def alice(server, shared_data):
    """Tenant A with one uploaded file and one finished job."""
    c = Client(server.url)
    c.register("alice")
    f = c.upload_bytes(sst2_rows(shared_data), "train.tsv")
    job = c.submit({"task": "seq_cls", "train": {"file_id": f["id"]}, **TINY})
    st = c.wait(job["id"], timeout=180)
    assert st["status"] == "succeeded", (st, server.log_tail())
    yield c, f, st
    c.close()


@pytest.fixture(scope="module")
def bob(server, shared_data):
    """Tenant B, trained on other rows with another rank, by ColA gradient learning."""
    c = Client(server.url)
    c.register("bob")
    f = c.upload_bytes(sst2_rows(shared_data, offset=200), "b.tsv")
    spec = {"task": "seq_cls", "train": {"file_id": f["id"]}, **TINY, "adapter": {"r": 2}, "seed": 3, "engine": "gl"}
    st = c.wait(c.submit(spec)["id"], timeout=180)
    assert st["status"] == "succeeded", (st, server.log_tail())
    assert st["spec"]["engine"] == "gl" and any(m["name"] == "wire_bytes" for m in c.metrics(st["id"]))
    yield c, f, st
    c.close()


def peft_probs(folder, texts: list[str]) -> torch.Tensor:
    """Independent reference: the downloaded adapter loaded by Hugging Face PEFT on a fresh MiniLM."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from cotune.models import minilm_path

    base = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2)
    model = PeftModel.from_pretrained(base, str(folder)).eval()
    tok = AutoTokenizer.from_pretrained(minilm_path())
    enc = tok(texts, padding=True, truncation=True, max_length=32, return_tensors="pt")
    with torch.no_grad():
        return torch.softmax(model(**enc).logits.float(), -1)


def test_openapi_lists_the_endpoints(server):
    schema = httpx.get(server.url + "/openapi.json").json()
    paths = schema["paths"]
    for p in ["/v1/tenants", "/v1/files", "/v1/files/{file_id}", "/v1/jobs", "/v1/jobs/{job_id}",
              "/v1/jobs/{job_id}/metrics", "/v1/jobs/{job_id}/cancel", "/v1/jobs/{job_id}/adapter",
              "/v1/jobs/{job_id}/adapter/{name}", "/v1/jobs/{job_id}/predict", "/healthz", "/v1/fine_tuning/jobs",
              "/v1/fine_tuning/jobs/{job_id}", "/v1/fine_tuning/jobs/{job_id}/cancel",
              "/v1/fine_tuning/jobs/{job_id}/events"]:
        assert p in paths, p
    assert "post" in paths["/v1/jobs"] and "get" in paths["/v1/jobs/{job_id}"]


def test_flow_and_downloaded_adapter_matches_peft(alice, tmp_path):
    c, f, st = alice
    assert st["step"] == st["total_steps"] == 6 and st["progress"] == 1.0
    assert {"train_loss", "eval"} <= set(st["result"]) and "accuracy" in st["result"]["eval"]
    losses = [m for m in c.metrics(st["id"]) if m["name"] == "loss"]
    assert [m["step"] for m in losses] == list(range(1, 7))  # one loss per step, each once
    folder = c.download(st["id"], tmp_path / "adapter")
    cfg = json.loads((folder / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["modules_to_save"] == ["classifier"]
    assert cfg["base_model_name_or_path"] == "minilm"  # the public name, not where the server keeps it
    single = c.request("GET", f"/v1/jobs/{st['id']}/adapter/adapter_model.safetensors").content
    assert single == (folder / "adapter_model.safetensors").read_bytes()
    preds = c.predict(st["id"], TEXTS)
    ref = peft_probs(folder, TEXTS)
    got = torch.tensor([p["scores"] for p in preds])
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=0)
    assert [p["label"] for p in preds] == [str(int(i)) for i in ref.argmax(-1)]


def test_two_tenants_predict_concurrently(alice, bob, tmp_path):
    (ca, _, sa), (cb, _, sb) = alice, bob
    ref_a = peft_probs(ca.download(sa["id"], tmp_path / "a"), TEXTS)
    ref_b = peft_probs(cb.download(sb["id"], tmp_path / "b"), TEXTS)
    assert not torch.allclose(ref_a, ref_b, atol=1e-4)  # the two tenants' adapters really differ
    calls = [(ca, sa["id"]), (cb, sb["id"])] * 4
    with ThreadPoolExecutor(8) as ex:
        outs = list(ex.map(lambda cj: cj[0].predict(cj[1], TEXTS), calls))
    for (_, jid), out in zip(calls, outs, strict=True):
        ref = ref_a if jid == sa["id"] else ref_b
        torch.testing.assert_close(torch.tensor([p["scores"] for p in out]), ref, atol=2e-5, rtol=0)


def test_mixed_predict_pass_equals_each_tenant_alone(alice, bob, tmp_path, minilm_tokenizer):
    """``predict_together`` answers both tenants in ONE routed forward; each equals its PEFT model."""
    from cotune.models import load_model
    from cotune.service.runner import predict_together
    from cotune.service.workload import Workload
    from cotune.tenants import TenantBank

    (ca, _, sa), (cb, _, sb) = alice, bob
    fa, fb = ca.download(sa["id"], tmp_path / "a"), cb.download(sb["id"], tmp_path / "b")
    bank = TenantBank(load_model("minilm", "seq_cls").eval())
    bank.add_tenant("a", fa)
    bank.add_tenant("b", fb)
    wl = Workload.__new__(Workload)  # prediction side only: tokenizer, labels, length
    wl.tokenizer, wl.max_length, wl.regression, wl.label_names = minilm_tokenizer, 32, False, ["0", "1"]
    calls = []
    orig = bank.model.forward
    bank.model.forward = lambda *a, **k: (calls.append(1), orig(*a, **k))[1]
    outs = predict_together(bank, [("a", wl, TEXTS, 0), ("b", wl, TEXTS[:2], 0)])
    assert len(calls) == 1  # one base pass for both tenants
    torch.testing.assert_close(torch.tensor([p["scores"] for p in outs[0]]), peft_probs(fa, TEXTS), atol=2e-5, rtol=0)
    torch.testing.assert_close(torch.tensor([p["scores"] for p in outs[1]]), peft_probs(fb, TEXTS[:2]), atol=2e-5,
                               rtol=0)


def test_every_endpoint_refuses_other_tenants(server, alice, bob):
    (ca, fa, sa), (cb, _, _) = alice, bob
    jid, fid = sa["id"], fa["id"]
    attempts = [
        ("GET", f"/v1/jobs/{jid}", {}), ("GET", f"/v1/jobs/{jid}/metrics", {}),
        ("POST", f"/v1/jobs/{jid}/cancel", {}), ("GET", f"/v1/jobs/{jid}/adapter", {}),
        ("GET", f"/v1/jobs/{jid}/adapter/adapter_config.json", {}),
        ("GET", f"/v1/jobs/{jid}/adapter/adapter_model.safetensors", {}),
        ("POST", f"/v1/jobs/{jid}/predict", {"json": {"inputs": ["x"]}}),
        ("GET", f"/v1/files/{fid}", {}), ("GET", f"/v1/files/{fid}/content", {}), ("DELETE", f"/v1/files/{fid}", {}),
        ("POST", "/v1/jobs", {"json": {"train": {"file_id": fid}, **TINY}}),  # training on A's upload
    ]
    for method, path, kw in attempts:
        with pytest.raises(ServiceError) as e:
            cb.request(method, path, **kw)
        assert e.value.status == 404, (method, path, e.value)
    assert fid not in [f["id"] for f in cb.files()] and jid not in [j["id"] for j in cb.jobs()]
    # no token / a forged token: 401 everywhere
    anon = Client(server.url)
    forged = Client(server.url, token=ca.token.split(".")[0] + ".AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA")
    for client in (anon, forged):
        for method, path, kw in [*attempts, ("GET", "/v1/jobs", {}), ("GET", "/v1/files", {})]:
            with pytest.raises(ServiceError) as e:
                client.request(method, path, **kw)
            assert e.value.status == 401, (method, path)
    # the owner still has everything
    assert ca.status(jid)["status"] == "succeeded" and ca.files()[0]["id"] == fid


def test_tokens_are_stored_hashed(server, alice):
    import hashlib
    import sqlite3

    c, _, _ = alice
    db = sqlite3.connect(server.root / "cotune.db")
    rows = dict(db.execute("SELECT id, token_hash FROM tenants").fetchall())
    tid = c.me()["tenant_id"]
    assert rows[tid] == hashlib.sha256(c.token.encode()).hexdigest()
    dump = "\n".join(db.iterdump())
    assert c.token not in dump and c.token.split(".")[1] not in dump


def test_upload_limits_names_and_types(server, alice, shared_data):
    c, _, _ = alice
    with pytest.raises(ServiceError) as e:  # 0.05 MiB limit
        c.upload_bytes(b"x\t1\n" * 20_000, "big.tsv")
    assert e.value.status == 413
    with pytest.raises(ServiceError) as e:  # no Content-Length: cut off while streaming
        c.upload_bytes(iter([b"x\t1\n" * 5_000] * 4), "big.tsv")
    assert e.value.status == 413
    with pytest.raises(ServiceError) as e:
        c.upload_bytes(b"abc", "evil.sh")
    assert e.value.status == 400 and ".tsv" in str(e.value)
    rec = c.upload_bytes(sst2_rows(shared_data, 8), "../../etc/passwd.tsv")
    assert rec["filename"] == "passwd.tsv" and "/" not in rec["filename"]
    stored = list((server.root / "files" / rec["id"]).iterdir())
    assert [p.name for p in stored] == ["data.tsv"]
    assert not (server.root.parent / "etc").exists() and not (server.root / "etc").exists()
    assert c.request("GET", f"/v1/files/{rec['id']}/content").content == sst2_rows(shared_data, 8)
    c.delete_file(rec["id"])
    assert not (server.root / "files" / rec["id"]).exists()
    with pytest.raises(ServiceError) as e:
        c.request("GET", f"/v1/files/{'..%2F..%2Fetc%2Fpasswd'}")
    assert e.value.status == 404


def test_a_native_refusal_told_in_openais_shape_keeps_its_status_and_headers():
    """A quota's 429 reaches an OpenAI client as its RateLimitError, with the Retry-After it backs off by."""
    from fastapi import HTTPException

    from cotune.service.routes.openai import OpenAIError

    e = OpenAIError.of(HTTPException(429, "2 active jobs: the limit is 2", headers={"Retry-After": "30"}))
    assert (e.status, e.headers) == (429, {"Retry-After": "30"})
    assert e.body == {"message": "2 active jobs: the limit is 2", "type": "rate_limit_exceeded", "param": None,
                      "code": None}
    e = OpenAIError.of(HTTPException(409, "job x already succeeded"), param="job")
    assert (e.status, e.headers, e.body["type"], e.body["param"]) == (409, None, "invalid_request_error", "job")


def test_openai_multipart_upload_is_streamed_and_limited(server, alice, shared_data):
    """``files.create`` of the ``openai`` client (multipart ``file`` + ``purpose``) stores the same bytes as the raw
    upload, under the same limit, refused as it streams; on an encoder server ``fine_tuning.jobs.create`` says why
    it cannot train there, in OpenAI's shape."""
    openai = pytest.importorskip("openai")
    c, _, _ = alice
    api = openai.OpenAI(base_url=server.url + "/v1", api_key=c.token, max_retries=0)
    data = sst2_rows(shared_data, 8)
    rec = api.files.create(file=("../../etc/passwd.tsv", data), purpose="fine-tune")
    assert (rec.filename, rec.bytes, rec.purpose, rec.object) == ("passwd.tsv", len(data), "fine-tune", "file")
    assert c.request("GET", f"/v1/files/{rec.id}/content").content == data
    assert c.files()[0]["sha256"] == hashlib.sha256(data).hexdigest()
    # files.list: OpenAI's cursor page, newest first; the client's auto-pagination walks it one file at a time
    second = api.files.create(file=("again.tsv", data), purpose="fine-tune")
    assert [f.id for f in api.files.list().data][:2] == [second.id, rec.id]
    walked = [f.id for f in api.files.list(limit=1)]
    assert walked == [f["id"] for f in c.files()] and walked[:2] == [second.id, rec.id] and len(set(walked)) > 1
    assert [f.id for f in api.files.list(order="asc")] == walked[::-1] and not api.files.list(purpose="batch").data
    c.delete_file(second.id)
    c.delete_file(rec.id)
    before = sorted(p.name for p in (server.root / "files").iterdir())
    with pytest.raises(openai.APIStatusError) as e:  # 0.05 MiB limit, with Content-Length
        api.files.create(file=("big.tsv", b"x\t1\n" * 20_000), purpose="fine-tune")
    assert e.value.status_code == 413
    boundary = "cotunetest"
    head = (f'--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nfine-tune\r\n--{boundary}\r\n'
            'Content-Disposition: form-data; name="file"; filename="big.tsv"\r\n\r\n').encode()
    stream = iter([head, *[b"x\t1\n" * 5_000] * 4, f"\r\n--{boundary}--\r\n".encode()])  # no Content-Length
    r = httpx.post(server.url + "/v1/files", content=stream, headers={
        "Authorization": f"Bearer {c.token}", "Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert r.status_code == 413, r.text
    assert sorted(p.name for p in (server.root / "files").iterdir()) == before  # nothing left behind
    with pytest.raises(openai.BadRequestError, match="purpose 'assistants'") as e:
        api.files.create(file=("a.tsv", data), purpose="assistants")
    assert e.value.body["param"] == "purpose"
    with pytest.raises(openai.BadRequestError, match="not accepted"):
        api.files.create(file=("evil.sh", b"rm -rf /"), purpose="fine-tune")
    for form, files, words in [({"purpose": "fine-tune"}, {"other": ("a.tsv", data)}, "no 'file' part"),
                               ({}, {"file": ("a.tsv", data)}, "purpose '(none)'")]:
        r = httpx.post(server.url + "/v1/files", data=form, files=files, headers={"Authorization": f"Bearer {c.token}"})
        assert r.status_code == 400 and words in r.json()["error"]["message"], r.text
    assert sorted(p.name for p in (server.root / "files").iterdir()) == before
    with pytest.raises(openai.BadRequestError, match="is an encoder") as e:
        api.fine_tuning.jobs.create(model="minilm", training_file="f" * 32)
    assert e.value.body["param"] == "model"


def test_server_paths_only_under_data_roots(server, alice, shared_data):
    c, _, _ = alice
    for bad in ["/etc/passwd", str(shared_data / "glue" / "SST-2" / ".." / "CoLA" / "train.tsv")]:
        with pytest.raises(ServiceError) as e:
            c.submit({"train": {"path": bad}, **TINY})
        assert e.value.status == 403 and "data roots" in str(e.value)
    with pytest.raises(ServiceError) as e:
        c.submit({"train": {"hub": "nyu-mll/glue:sst2"}, **TINY})
    assert e.value.status == 403
    with pytest.raises(ServiceError) as e:  # unknown fields are refused, not ignored
        c.submit({"train": {"path": "x"}, "stepz": 3})
    assert e.value.status == 422
    ok = c.submit({"train": {"path": str(shared_data / "glue" / "SST-2" / "dev.tsv")}, **TINY, "steps": 2,
                   "task_options": {"max_rows": 40}})
    assert c.wait(ok["id"], timeout=180)["status"] == "succeeded"


def test_non_finite_numbers_are_a_422_in_json(server, alice):
    """Python's json reads NaN / Infinity tokens; the refusal must still be a JSON 422, never a 500."""
    c, f, st = alice
    for bad in ("NaN", "Infinity", "-Infinity"):
        body = json.dumps({"train": {"file_id": f["id"]}, "steps": 2, "optim": {"lr": 1e-3}}).replace("0.001", bad)
        r = httpx.post(f"{server.url}/v1/jobs", content=body, timeout=30,
                       headers={"Authorization": f"Bearer {c.token}", "Content-Type": "application/json"})
        assert r.status_code == 422, (bad, r.text)
        assert "finite" in json.dumps(r.json()["detail"])
    zo = c.submit({"train": {"file_id": f["id"]}, **TINY, "engine": "zo", "engine_options": {"eps": 0.0}})
    assert "eps must be > 0" in c.wait(zo["id"], timeout=60)["error"]  # the engine refuses it before any step
    assert c.health()["ok"] and c.status(st["id"])["status"] == "succeeded"


def test_malformed_upload_fails_the_job_not_the_server(server, alice):
    c, _, st = alice
    bad = c.upload_bytes(b"sentence\tlabel\nfine movie\t1\nno label column here\n", "bad.tsv")
    job = c.submit({"train": {"file_id": bad["id"]}, **TINY})
    out = c.wait(job["id"], timeout=120)
    assert out["status"] == "failed" and "line 3" in out["error"], out["error"]
    bad_opt = c.submit({"train": {"file_id": bad["id"]}, **TINY, "method": "no-such-family"})
    assert "unknown" in c.wait(bad_opt["id"], timeout=60)["error"]
    with pytest.raises(ServiceError) as e:
        c.predict(job["id"], ["x"])
    assert e.value.status == 409
    assert c.health()["ok"] and c.predict(st["id"], ["still serving"])[0]["label"] in ("0", "1")


def test_client_command(server, alice):
    """``cotune client`` (a subprocess each: status with the token from the environment, then a bad token)."""
    c, _, st = alice
    env = {**os.environ, "COTUNE_TOKEN": c.token, "HF_HUB_OFFLINE": "1"}
    run = [sys.executable, "-m", "cotune.cli", "client", "--url", server.url]
    out = subprocess.run([*run, "status", st["id"]], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["status"] == "succeeded"
    out = subprocess.run([*run, "--token", "nope", "status"], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 2 and "HTTP 401" in out.stderr


def test_zip_download_has_exactly_the_two_files(alice):
    c, _, st = alice
    data = c.request("GET", f"/v1/jobs/{st['id']}/adapter").content
    assert sorted(zipfile.ZipFile(io.BytesIO(data)).namelist()) == ["adapter_config.json", "adapter_model.safetensors"]


def test_oversized_adapters_are_refused_before_anything_is_built(server, alice):
    c, f, st = alice
    wide = c.wait(c.submit({"train": {"file_id": f["id"]}, **TINY, "adapter": {"r": 100000}})["id"], timeout=60)
    assert wide["status"] == "failed" and "above the width 384" in wide["error"], wide["error"]
    big = c.wait(c.submit({"train": {"file_id": f["id"]}, **TINY, "method": "mlp", "adapter": {}})["id"], timeout=60)
    assert big["status"] == "failed" and "at most 1,000,000" in big["error"], big["error"]
    assert c.predict(st["id"], ["still serving"])[0]["label"] in ("0", "1")


def test_one_class_training_data_is_flagged(server, alice, shared_data):
    c, _, _ = alice
    lines = (shared_data / "glue" / "SST-2" / "train.tsv").read_text().splitlines()
    ones = [ln for ln in lines[1:200] if ln.endswith("\t1")][:20]
    f = c.upload_bytes(("\n".join([lines[0], *ones]) + "\n").encode(), "ones.tsv")
    st = c.wait(c.submit({"train": {"file_id": f["id"]}, **TINY, "steps": 2})["id"], timeout=120)
    assert st["status"] == "succeeded" and "one class" in " ".join(st["result"]["warnings"])
    assert {"name": "warning_one_class", "step": 0, "value": 1.0} in [
        {k: m[k] for k in ("name", "step", "value")} for m in c.metrics(st["id"])]


def test_a_job_that_answers_one_class_says_so(alice):
    """Six steps on 64 rows leave every evaluation row with one answer: flagged; twenty steps leave it: not."""
    c, f, st = alice
    assert st["result"]["eval"]["pred_classes"] == 1 and st["result"]["eval"]["accuracy"] < 1
    top = int(st["result"]["eval"]["pred_top_class"])  # the answer it gave every row, named in the warning
    assert len(st["result"]["warnings"]) == 1 and f"one class (class {top}" in st["result"]["warnings"][0]
    assert ("warning_one_class_predicted", TINY["steps"], 1.0) in [
        (m["name"], m["step"], m["value"]) for m in c.metrics(st["id"])]
    longer = c.wait(c.submit({"train": {"file_id": f["id"]}, **TINY, "steps": 20})["id"], timeout=180)
    assert longer["result"]["eval"]["pred_classes"] == 2 and longer["result"]["warnings"] == []
    assert not [m for m in c.metrics(longer["id"]) if m["name"].startswith("warning")]


def test_a_job_with_eval_every_logs_a_learning_curve(alice, tmp_path):
    """``eval_every`` evaluates midway too: the job's metrics hold a curve, the last point its result's."""
    c, f, _ = alice
    cli = [sys.executable, "-m", "cotune", "client", "--url", c.url, "submit", "--file-id", f["id"], "--steps",
           str(TINY["steps"]), "--batch-size", "4", "--max-length", "32", "--lr", "5e-3", "--eval-every", "4",
           "--wait", "r=4"]  # as the README's client line, so its flag is the one this tests
    env = {**os.environ, "COTUNE_TOKEN": c.token, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(cli, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    st = json.loads(out.stdout)
    assert st["status"] == "succeeded" and st["spec"]["eval_every"] == 4
    curve = {m["step"]: m["value"] for m in c.metrics(st["id"]) if m["name"] == "eval_loss"}
    assert sorted(curve) == [4, TINY["steps"]] and curve[4] != curve[TINY["steps"]]
    assert curve[TINY["steps"]] == pytest.approx(st["result"]["eval"]["loss"])
    # the curve as `cotune train` draws one: loss per step, and the job's own metric at each evaluation
    records = curve_records(c.metrics(st["id"]))
    assert [r["step"] for r in records if r["type"] == "train"] == list(range(1, TINY["steps"] + 1))
    evals = [r for r in records if r["type"] == "eval"]
    assert [r["step"] for r in evals] == [4, TINY["steps"]] and st["result"]["metric"] == "accuracy"
    assert evals[-1]["accuracy"] == st["result"]["eval"]["accuracy"] and evals[0]["loss"] == curve[4]
    png = tmp_path / "curve.png"
    out = subprocess.run([*cli[:6], "metrics", st["id"], "--plot", str(png)], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", out.stderr
    assert json.loads(out.stdout) == c.metrics(st["id"])
    # one class midway is a normal start, so only the end's evaluation flags it (this job's does)
    assert [m["step"] for m in c.metrics(st["id"]) if m["name"] == "warning_one_class_predicted"] == [TINY["steps"]]
    with pytest.raises(ServiceError) as e:
        c.submit({"train": {"file_id": f["id"]}, **TINY, "eval_every": 0})
    assert e.value.status == 422 and "eval_every" in str(e.value)
    # each midway evaluation holds every tenant's round: at most 20 per job (the default --max-job-evals)
    with pytest.raises(ServiceError) as e:
        c.submit({"train": {"file_id": f["id"]}, **TINY, "steps": 1000, "eval_every": 1})
    assert e.value.status == 400 and "999 times" in str(e.value) and "eval_every to 48 or more" in str(e.value)
    with pytest.raises(ServiceError):  # 21 midway evaluations
        c.submit({"train": {"file_id": f["id"]}, **TINY, "steps": 1000, "eval_every": 47})
    c.cancel(c.submit({"train": {"file_id": f["id"]}, **TINY, "steps": 1000, "eval_every": 48})["id"])  # 20: taken


def test_a_regression_job_whose_predictions_collapse_says_so(server, shared_data):
    """A tenant's own regression file is scored by Pearson; a job whose adapter swamps its layers (lr 0.5) gives
    every row one prediction, and its metrics and result say so, as ``cotune train`` does."""
    c = Client(server.url)
    c.register("erin")
    lines = (shared_data / "glue" / "STS-B" / "train.tsv").read_text().splitlines()[:161]
    f = c.upload_bytes(("\n".join(lines) + "\n").encode(), "scores.tsv")
    spec = {"train": {"file_id": f["id"]}, **TINY, "task_options": {
        "regression": True, "text_key": "sentence1", "text_pair_key": "sentence2", "label_key": "score"}}
    ok = c.wait(c.submit(spec)["id"], timeout=180)
    lost = c.wait(c.submit({**spec, "optim": {"lr": 0.5}, "eval_every": 3})["id"], timeout=180)
    assert ok["status"] == lost["status"] == "succeeded", (ok, lost, server.log_tail())
    assert ok["result"]["eval"]["pred_spread"] > 1e-3 and ok["result"]["warnings"] == []
    assert lost["result"]["eval"]["pred_spread"] < 1e-3 and "pearson" in lost["result"]["eval"]
    assert len(lost["result"]["warnings"]) == 1 and "collapsed to one value" in lost["result"]["warnings"][0]
    flags = [(m["name"], m["step"], m["value"]) for m in c.metrics(lost["id"]) if m["name"].startswith("warning")]
    assert flags == [("warning_collapsed", 3, 1.0), ("warning_collapsed", TINY["steps"], 1.0)]  # midway too
    assert not [m for m in c.metrics(ok["id"]) if m["name"].startswith("warning")]


def test_delete_jobs_adapters_and_files_and_rotate_the_token(server, shared_data):
    c = Client(server.url)
    c.register("dora")
    f = c.upload_bytes(sst2_rows(shared_data, n=16), "d.tsv")
    running = c.submit({"train": {"file_id": f["id"]}, **TINY, "steps": 500})
    with pytest.raises(ServiceError) as e:
        c.delete_job(running["id"])
    assert e.value.status == 409 and "cancel it first" in str(e.value)
    c.cancel(running["id"])
    done = c.wait(c.submit({"train": {"file_id": f["id"]}, **TINY, "steps": 2})["id"], timeout=120)
    assert c.predict(done["id"], ["fine"])  # loads its adapter into the bank
    c.delete_adapter(done["id"])
    with pytest.raises(ServiceError) as e:
        c.download(done["id"], server.root.parent / "gone")
    assert e.value.status == 409 and c.status(done["id"])["status"] == "succeeded"
    for job in (done["id"], running["id"]):
        c.delete_job(job)
        with pytest.raises(ServiceError) as e:
            c.status(job)
        assert e.value.status == 404
        assert not (server.root / "jobs" / job).exists()
    c.delete_file(f["id"])
    assert c.files() == [] and not (server.root / "files" / f["id"]).exists()
    old = c.token
    new = c.rotate_token()
    assert new != old and c.me()["name"] == "dora"
    with pytest.raises(ServiceError) as e:
        Client(server.url, old).me()
    assert e.value.status == 401
    r = httpx.post(server.url + f"/v1/tenants/{c.me()['tenant_id']}/revoke")
    assert r.status_code == 403  # this server has no admin token: nobody may revoke
    c.close()
