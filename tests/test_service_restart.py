"""Durability: SIGKILL a real ``cotune serve`` mid-training, start it again on the same root.

Proves: every unfinished job resumes from its last checkpoint (not step 0) and finishes; its metrics hold
each step exactly once; the finished job, its adapter and the uploaded files are all still there, byte for
byte; the resumed run's adapter equals a second, never-interrupted run of the same job (jobs draw their rows
from (seed, step) only, and a lone job's step is the same computation whether or not it was interrupted).
"""

from __future__ import annotations

import time

import pytest
import torch
from safetensors.torch import load_file

from cotune.service.client import Client
from cotune.service.launch import ServerProcess


def sst2_rows(shared_data, n: int = 64) -> bytes:
    lines = (shared_data / "glue" / "SST-2" / "train.tsv").read_text().splitlines()
    return ("\n".join(lines[: n + 1]) + "\n").encode()


def wait_for(pred, timeout: float, what: str, srv: ServerProcess):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        out = pred()
        if out:
            return out
        time.sleep(0.1)
    pytest.fail(f"timed out waiting for {what}\n{srv.log_tail()}")


def test_sigkill_mid_training_resumes_every_job(tmp_path, shared_data):
    root = tmp_path / "root"
    args = ["--threads", "1"]
    spec = {"task": "seq_cls", "steps": 14, "batch_size": 4, "max_length": 32, "checkpoint_every": 3,
            "adapter": {"r": 4}, "optim": {"lr": 3e-3, "scheduler": "linear"}, "seed": 7}
    srv = ServerProcess(root, args).start()
    try:
        c = Client(srv.url)
        c.register("dora")
        f = c.upload_bytes(sst2_rows(shared_data), "train.tsv")
        done = c.submit({**spec, "train": {"file_id": f["id"]}, "steps": 3})
        assert c.wait(done["id"], timeout=120)["status"] == "succeeded"
        adapter_before = (root / "jobs" / done["id"] / "adapter" / "adapter_model.safetensors").read_bytes()
        job = c.submit({**spec, "train": {"file_id": f["id"]}})
        st = wait_for(lambda: (s := c.status(job["id"]))["checkpoint_step"] >= 6 and s, 180, "a checkpoint", srv)
        srv.kill()  # SIGKILL: no shutdown code runs
    finally:
        srv.stop()
    killed_at = st["checkpoint_step"]
    assert 6 <= killed_at < 14

    srv = ServerProcess(root, args, port=srv.port).start()
    try:
        c = Client(srv.url, token=c.token)
        out = c.wait(job["id"], timeout=180)
        assert out["status"] == "succeeded", (out, srv.log_tail())
        assert out["resumed_from"] is not None and out["resumed_from"] >= killed_at > 0
        steps = [m["step"] for m in c.metrics(job["id"]) if m["name"] == "loss"]
        assert steps == list(range(1, 15))  # every step once: the repeated ones were replaced, not doubled
        # nothing finished or uploaded was lost
        assert c.status(done["id"])["status"] == "succeeded"
        assert c.request("GET", f"/v1/jobs/{done['id']}/adapter/adapter_model.safetensors").content == adapter_before
        assert c.request("GET", f"/v1/files/{f['id']}/content").content == sst2_rows(shared_data)
        # the same job never interrupted gives the same adapter (to float tolerance: same math, same rows)
        again = c.submit({**spec, "train": {"file_id": f["id"]}})
        assert c.wait(again["id"], timeout=180)["status"] == "succeeded"
    finally:
        srv.stop()
    a = load_file(str(root / "jobs" / job["id"] / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(root / "jobs" / again["id"] / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5)
    assert not list((root / "jobs" / job["id"]).glob("ckpt-*"))  # checkpoints of finished jobs are cleaned up
