"""A hostile tenant against a training one, on one real ``cotune serve`` process (MiniLM, real SST-2 rows).

While tenant A trains, tenant B submits every entry of a catalogue of bad specs. Each is refused (422 / 400 /
403 / 413) or fails as B's own job with a message that names what to fix and no server path; A's job ends with
exactly the adapter the same job gets on a server where nobody disturbed it.
"""

from __future__ import annotations

import json
import time

import pytest
import torch
from safetensors.torch import load_file

from cotune.service.client import Client, ServiceError
from cotune.service.launch import ServerProcess

A_SPEC = {"steps": 12, "batch_size": 4, "max_length": 32, "adapter": {"r": 4}, "optim": {"lr": 5e-3}, "seed": 1}
B_BASE = {"steps": 4, "batch_size": 4, "max_length": 32}

#: (what B sends on top of a valid spec, how it must end: an HTTP status, or "failed" with a phrase)
CATALOGUE = [
    ({"adapter": {"r": -3}}, ("failed", "r")),
    ({"adapter": {"target_modules": ["nosuchmodule"]}}, ("failed", "nosuchmodule")),
    ({"adapter": {"r": 100000}}, ("failed", "above the width")),
    ({"adapter": {"no_such_option": 1}}, ("failed", "no_such_option")),
    ({"method": "no-such-family"}, ("failed", "unknown")),
    ({"method": "cola", "adapter": {}}, ("failed", "init='lora'")),
    ({"optim": {"lr": float("nan")}}, 422),
    ({"optim": {"lr": float("inf")}}, 422),
    ({"engine": "no-such-engine"}, 422),
    ({"engine": "gl", "engine_options": {"placement": "process"}}, ("failed", "not accepted")),
    ({"task_options": {"data_root": "/"}}, ("failed", "not accepted")),
    ({"task": "causal_lm"}, ("failed", "encoder")),
    ({"batch_size": 100_000}, 400),
    ({"max_length": 100_000}, 400),
    ({"steps": 10**9}, 400),
    ({"train": {"path": "/etc/passwd"}}, 403),
    ({"train": {"file_id": "0" * 32}}, 404),
]


def _rows(shared_data, n: int, offset: int) -> bytes:
    lines = (shared_data / "glue" / "SST-2" / "train.tsv").read_text().splitlines()
    return ("\n".join([lines[0], *lines[1 + offset : 1 + offset + n]]) + "\n").encode()


def _train_a(url: str, shared_data, tmp_path, name: str) -> tuple[Client, dict, dict]:
    a = Client(url)
    a.register(name)
    f = a.upload_bytes(_rows(shared_data, 48, 0), "a.tsv")
    return a, f, a.submit({"train": {"file_id": f["id"]}, **A_SPEC})


@pytest.fixture(scope="module")
def undisturbed(tmp_path_factory, shared_data):
    """A's adapter from a server where A trained alone."""
    root = tmp_path_factory.mktemp("calm") / "root"
    with ServerProcess(root, ["--threads", "1"]) as srv:
        a, _, job = _train_a(srv.url, shared_data, root, "a")
        st = a.wait(job["id"], timeout=300)
        assert st["status"] == "succeeded", srv.log_tail()
        return load_file(a.download(job["id"], root.parent / "calm-a") / "adapter_model.safetensors")


def test_bad_specs_of_one_tenant_leave_another_tenants_job_exact(undisturbed, tmp_path, shared_data):
    root = tmp_path / "root"
    with ServerProcess(root, ["--threads", "1", "--max-adapter-params", "1000000"]) as srv:
        a, _, job = _train_a(srv.url, shared_data, root, "a")
        b = Client(srv.url)
        b.register("b")
        fb = b.upload_bytes(_rows(shared_data, 16, 300), "b.tsv")
        failed = []
        for extra, want in CATALOGUE:
            spec = {"train": {"file_id": fb["id"]}, **B_BASE, **extra}
            if isinstance(want, int):
                with pytest.raises(ServiceError) as e:  # raw JSON: NaN and Infinity as Python's json writes them
                    b.request("POST", "/v1/jobs", content=json.dumps(spec), headers={"Content-Type": "application/json"})
                assert e.value.status == want, (extra, e.value.status, str(e.value))
            else:
                failed.append((b.submit(spec)["id"], extra, want[1]))
        for jid, extra, phrase in failed:
            st = b.wait(jid, timeout=120)
            assert st["status"] == "failed" and phrase in st["error"], (extra, st["status"], st["error"])
            assert str(root.resolve()) not in st["error"] and "/site-packages/" not in st["error"], st["error"]
        st = a.wait(job["id"], timeout=300)
        assert st["status"] == "succeeded" and st["step"] == A_SPEC["steps"], (st, srv.log_tail())
        got = load_file(a.download(job["id"], tmp_path / "a") / "adapter_model.safetensors")
    assert got.keys() == undisturbed.keys()
    for k in got:  # the same job, whatever B did beside it
        torch.testing.assert_close(got[k], undisturbed[k], atol=1e-6, rtol=0)


def test_jobs_that_cannot_fit_the_memory_budget_are_refused_or_wait(tmp_path, shared_data):
    # MiniLM: 90 MB of weights; a 16 x 128 step is estimated at 0.8 GB, two of them together at 1.5 GB.
    with ServerProcess(tmp_path / "root", ["--threads", "1", "--memory-limit-mb", "1300"]) as srv:
        c = Client(srv.url)
        c.register("a")
        f = c.upload_bytes(_rows(shared_data, 48, 0), "a.tsv")
        spec = {"train": {"file_id": f["id"]}, "steps": 10, "batch_size": 16, "max_length": 128}
        with pytest.raises(ServiceError) as e:
            c.submit({**spec, "batch_size": 32, "max_length": 512})
        assert e.value.status == 413 and "lower batch_size or max_length" in str(e.value), str(e.value)
        first = c.submit(spec)
        while c.status(first["id"])["status"] == "queued":
            time.sleep(0.05)  # polls within the rate limit
        second = c.submit(spec)
        seen = set()
        while c.status(first["id"])["status"] == "running":
            seen.add(c.status(second["id"])["status"])
            time.sleep(0.05)
        assert seen == {"queued"}  # it fits alone, not beside the first: it waited for it
        assert c.wait(first["id"], timeout=300)["status"] == c.wait(second["id"], timeout=300)["status"] == "succeeded"
