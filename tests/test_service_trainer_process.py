"""The trainer in its own process: the API answers while it trains, dies and restarts; jobs resume exactly.

A real ``cotune serve`` (MiniLM) on loopback. SIGKILL of the trainer process alone (what the OOM killer does):
status requests polled all along keep answering 200, the API starts a new trainer, the job resumes from its last
checkpoint with each step's metrics once, and its adapter equals an uninterrupted run of the same job. A job
that is training each time the trainer dies, three times in a row with no checkpoint in between, is failed
with a message, and the trainer goes on with the others.
"""

from __future__ import annotations

import threading
import time

import httpx
import torch
from safetensors.torch import load_file
from test_service_restart import sst2_rows, wait_for

from cotune.service.client import Client
from cotune.service.launch import ServerProcess


def test_trainer_killed_mid_training_api_answers_and_job_resumes_exactly(tmp_path, shared_data):
    root = tmp_path / "root"
    spec = {"task": "seq_cls", "steps": 12, "batch_size": 4, "max_length": 32, "checkpoint_every": 3,
            "adapter": {"r": 4}, "optim": {"lr": 3e-3, "scheduler": "linear"}, "seed": 3}
    with ServerProcess(root, ["--threads", "1", "--rate-limit", "0"]) as srv:
        c = Client(srv.url)
        c.register("erin")
        f = c.upload_bytes(sst2_rows(shared_data), "train.tsv")
        job = c.submit({**spec, "train": {"file_id": f["id"]}})
        wait_for(lambda: c.status(job["id"])["checkpoint_step"] >= 3, 120, "a checkpoint", srv)

        answers: list[int] = []
        stop = threading.Event()

        def poll() -> None:  # a tenant watching its job while the trainer dies and comes back
            with httpx.Client(base_url=srv.url, headers={"Authorization": f"Bearer {c.token}"}) as h:
                while not stop.is_set():
                    answers.append(h.get(f"/v1/jobs/{job['id']}", timeout=10).status_code)
                    time.sleep(0.05)

        poller = threading.Thread(target=poll)
        poller.start()
        try:
            old = srv.kill_trainer()
            wait_for(lambda: (p := srv.trainer_pid()) is not None and p != old, 60, "a new trainer", srv)
            out = c.wait(job["id"], timeout=180)
        finally:
            stop.set()
            poller.join()
        assert out["status"] == "succeeded", (out, srv.log_tail())
        assert out["resumed_from"] is not None and out["resumed_from"] >= 3
        assert len(answers) > 20 and set(answers) == {200}  # the API never stopped answering
        health = c.health()["runner"]
        assert health["trainer_restarts"] == 1 and health["ready"]
        steps = [m["step"] for m in c.metrics(job["id"]) if m["name"] == "loss"]
        assert steps == list(range(1, 13))  # the steps redone after the restart replaced, not doubled
        # the restarted trainer answers predictions, and an uninterrupted run of the same job is the same
        assert len(c.predict(job["id"], ["a fine film"])) == 1
        again = c.submit({**spec, "train": {"file_id": f["id"]}})
        assert c.wait(again["id"], timeout=180)["status"] == "succeeded"
    a, b = (load_file(str(root / "jobs" / j["id"] / "adapter" / "adapter_model.safetensors")) for j in (job, again))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5)


def test_a_job_in_three_trainer_deaths_in_a_row_is_failed_and_the_others_go_on(tmp_path, shared_data):
    spec = {"task": "seq_cls", "batch_size": 4, "max_length": 32, "adapter": {"r": 4}, "seed": 1}
    with ServerProcess(tmp_path / "root", ["--threads", "1", "--rate-limit", "0"]) as srv:
        c = Client(srv.url)
        c.register("frank")
        f = c.upload_bytes(sst2_rows(shared_data), "train.tsv")
        # checkpoints far apart: each death comes before the next checkpoint, as with a job that kills its trainer
        victim = c.submit({**spec, "train": {"file_id": f["id"]}, "steps": 400, "checkpoint_every": 400})
        for _ in range(3):
            wait_for(lambda: c.health()["runner"].get("active_jobs", 0) >= 1, 90, "the job training", srv)
            wait_for(lambda: c.status(victim["id"])["step"] >= 2, 90, "two steps", srv)
            old = srv.kill_trainer()
            wait_for(lambda old=old: (p := srv.trainer_pid()) is not None and p != old, 60, "a new trainer", srv)
        out = wait_for(lambda: (s := c.status(victim["id"]))["status"] == "failed" and s, 30, "the job failed", srv)
        assert "died 3 times" in out["error"] and "batch_size" in out["error"]
        # each restart began again at step 0 (no checkpoint): the steps before a death were logged once, not twice
        steps = [m["step"] for m in c.metrics(victim["id"]) if m["name"] == "loss"]
        assert steps == list(range(1, len(steps) + 1)), steps
        other = c.submit({**spec, "train": {"file_id": f["id"]}, "steps": 2})
        assert c.wait(other["id"], timeout=120)["status"] == "succeeded"
