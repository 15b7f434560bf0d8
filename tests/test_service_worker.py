"""ColA's split through the service: a job's adapter update in ``cotune worker``, another process, over HTTP.

A real ``cotune serve`` (MiniLM) on loopback. Tenant A's gl job with ``engine_options.fitter = "remote"``
trains while ``cotune worker`` (a subprocess with A's token) holds its optimizer; it ends equal (1e-6
relative to the update) to the same job with the server-side fitter, after 20 AdamW steps, and the worker
saves the adapter in PEFT format. Tenant B cannot reach A's worker routes (404); a forged weights frame is a
400, an oversized one a 413, and the job goes on to the same result.
"""

from __future__ import annotations

import os
import subprocess
import sys

import torch
from safetensors.torch import load_file
from test_service_restart import sst2_rows, wait_for

from cotune.service.client import Client, ServiceError
from cotune.service.launch import ServerProcess


def test_a_remote_worker_job_equals_the_server_side_fitter(tmp_path, shared_data):
    root = tmp_path / "root"
    spec = {"task": "seq_cls", "engine": "gl", "steps": 20, "batch_size": 4, "max_length": 32,
            "adapter": {"r": 4}, "optim": {"lr": 3e-3}, "seed": 5, "eval_every": 10}
    with ServerProcess(root, ["--threads", "1", "--rate-limit", "0"]) as srv:
        a, b = Client(srv.url), Client(srv.url)
        a.register("alice")
        b.register("bob")
        f = a.upload_bytes(sst2_rows(shared_data), "train.tsv")
        job = a.submit({**spec, "train": {"file_id": f["id"]}, "engine_options": {"fitter": "remote"}})
        for path in ("", "/weights", "/capture"):  # another tenant's job does not exist for bob
            try:
                b.request("GET", f"/v1/jobs/{job['id']}/worker{path}")
                raise AssertionError("bob reached alice's worker route")
            except ServiceError as e:
                assert e.status == 404
        # the job trains once it has weights to start from, and waits for its worker: no step without one
        wait_for(lambda: a.request("GET", f"/v1/jobs/{job['id']}/worker").json()["setup"] is not None, 120,
                 "the job's setup", srv)
        try:
            a.request("POST", f"/v1/jobs/{job['id']}/worker/weights", content=b"not a frame")
            raise AssertionError("a forged frame was taken")
        except ServiceError as e:
            assert e.status == 400 and "frame" in str(e)
        # a frame larger than this job's adapter weights cannot be its answer: refused while it streams in
        size = len(a.request("GET", f"/v1/jobs/{job['id']}/worker/weights").content)
        try:
            a.request("POST", f"/v1/jobs/{job['id']}/worker/weights", content=b"\0" * (size + 2**17))
            raise AssertionError("an oversized frame was taken")
        except ServiceError as e:
            assert e.status == 413 and "adapter" in str(e)
        assert not list((root / "jobs" / job["id"] / "worker").glob("incoming-*"))  # nothing left in its spool
        assert a.status(job["id"])["step"] <= 1  # one step at most: it waits for update 1's weights
        env = {**os.environ, "COTUNE_TOKEN": a.token, "HF_HUB_OFFLINE": "1"}
        out = subprocess.run([sys.executable, "-m", "cotune.cli", "worker", "--server", srv.url, "--job", job["id"],
                              "--state", str(tmp_path / "worker")], env=env, capture_output=True, text=True,
                             timeout=600)
        assert out.returncode == 0, out.stdout + out.stderr + srv.log_tail()
        assert a.status(job["id"])["status"] == "succeeded"
        assert "MB per update" in out.stderr and (tmp_path / "worker" / "adapter" / "adapter_config.json").exists()
        server_side = a.submit({**spec, "train": {"file_id": f["id"]}})
        assert a.wait(server_side["id"], timeout=300)["status"] == "succeeded"
        # the midway evaluation of the remote job reads the weights its worker sent back, as the server-side one
        curves = [{(m["step"], m["name"]): m["value"] for m in a.metrics(j["id"]) if m["name"].startswith("eval_")}
                  for j in (job, server_side)]
        assert {s for s, _ in curves[0]} == {s for s, _ in curves[1]} == {10, 20}
        for k, v in curves[1].items():
            assert abs(curves[0][k] - v) <= 1e-5 * max(abs(v), 1.0), k
    remote_ad = load_file(str(tmp_path / "worker" / "adapter" / "adapter_model.safetensors"))
    server_ad = load_file(str(root / "jobs" / server_side["id"] / "adapter" / "adapter_model.safetensors"))
    assert remote_ad.keys() == server_ad.keys()
    for k in remote_ad:
        scale = float(server_ad[k].abs().max())
        assert scale > 0 and float((remote_ad[k] - server_ad[k]).abs().max()) <= 1e-6 * max(scale, 1.0), k
    assert any(not torch.equal(remote_ad[k], torch.zeros_like(remote_ad[k])) for k in remote_ad)


def _worker(srv: ServerProcess, token: str, job_id: str, state, log) -> subprocess.Popen:
    env = {**os.environ, "COTUNE_TOKEN": token, "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen([sys.executable, "-m", "cotune.cli", "worker", "--server", srv.url, "--job", job_id,
                             "--state", str(state)], env=env, stdout=log, stderr=subprocess.STDOUT)


def test_worker_and_server_killed_mid_run_the_job_ends_as_if_uninterrupted(tmp_path, shared_data):
    root, args = tmp_path / "root", ["--threads", "1", "--rate-limit", "0"]
    spec = {"task": "seq_cls", "engine": "gl", "steps": 24, "batch_size": 4, "max_length": 32,
            "adapter": {"r": 4}, "optim": {"lr": 3e-3}, "seed": 9}
    srv = ServerProcess(root, args).start()
    log = open(tmp_path / "worker.log", "ab")  # noqa: SIM115
    try:
        a = Client(srv.url)
        a.register("alice")
        f = a.upload_bytes(sst2_rows(shared_data), "train.tsv")
        job = a.submit({**spec, "train": {"file_id": f["id"]}, "engine_options": {"fitter": "remote"}})
        w = _worker(srv, a.token, job["id"], tmp_path / "state", log)
        wait_for(lambda: a.status(job["id"])["step"] >= 6, 180, "six steps", srv)
        w.kill()  # SIGKILL, wherever it is: computing, saving or sending an update
        w.wait(30)
        w = _worker(srv, a.token, job["id"], tmp_path / "state", log)  # the same state folder
        wait_for(lambda: a.status(job["id"])["step"] >= 14, 180, "fourteen steps", srv)
        srv.kill()  # the API and its trainer; the worker keeps retrying until the server is back
        srv = ServerProcess(root, args, port=srv.port).start()
        assert w.wait(600) == 0, (tmp_path / "worker.log").read_text()[-3000:]
        a = Client(srv.url, token=a.token)
        assert a.status(job["id"])["status"] == "succeeded"
        steps = [m["step"] for m in a.metrics(job["id"]) if m["name"] == "loss"]
        assert steps == list(range(1, 25))
        ref = a.submit({**spec, "train": {"file_id": f["id"]}})
        assert a.wait(ref["id"], timeout=300)["status"] == "succeeded"
    finally:
        log.close()
        srv.stop()
    got = load_file(str(tmp_path / "state" / "adapter" / "adapter_model.safetensors"))
    want = load_file(str(root / "jobs" / ref["id"] / "adapter" / "adapter_model.safetensors"))
    for k in want:
        assert float((got[k] - want[k]).abs().max()) <= 1e-6 * max(float(want[k].abs().max()), 1.0), k


def test_a_job_without_its_worker_pauses_and_resumes_when_it_comes(tmp_path, shared_data):
    spec = {"task": "seq_cls", "engine": "gl", "steps": 4, "batch_size": 4, "max_length": 32, "adapter": {"r": 4},
            "engine_options": {"fitter": "remote"}}
    with ServerProcess(tmp_path / "root", ["--threads", "1", "--rate-limit", "0", "--worker-timeout", "8"]) as srv:
        a = Client(srv.url)
        a.register("alice")
        f = a.upload_bytes(sst2_rows(shared_data), "train.tsv")
        job = a.submit({**spec, "train": {"file_id": f["id"]}})
        other = a.submit({**spec, "train": {"file_id": f["id"]}, "engine_options": {}})  # server-side fitter
        paused = wait_for(lambda: (s := a.status(job["id"]))["status"] == "paused" and s, 120, "the pause", srv)
        assert "cotune worker" in paused["error"]
        assert a.wait(other["id"], timeout=120)["status"] == "succeeded"  # it never waited for the worker
        with open(tmp_path / "worker.log", "ab") as log:
            assert _worker(srv, a.token, job["id"], tmp_path / "state", log).wait(300) == 0
        out = a.status(job["id"])
        assert out["status"] == "succeeded" and out["error"] is None
