"""Store, tokens, upload names and checkpoints of the service, in-process (no HTTP, no model download)."""

from __future__ import annotations

import hashlib

import pytest
import torch
from torch import nn

from cotune.adapters import attach, trainable_parameters
from cotune.service import checkpoints
from cotune.service.api import safe_label
from cotune.service.auth import hash_token, issue_token, verify_token
from cotune.service.store import FileRecord, Store, new_id


def test_tokens_hashed_and_verified(tmp_path):
    store = Store(tmp_path)
    tid, token = issue_token(store, "alice")
    assert store.tenant(tid)["token_hash"] == hashlib.sha256(token.encode()).hexdigest() == hash_token(token)
    assert token not in (tmp_path / "cotune.db").read_bytes().decode("latin-1")
    assert verify_token(store, token) == tid
    other_tid, other = issue_token(store, "bob")
    secret = token.split(".", 1)[1]
    for bad in [None, "", "garbage", f"{tid}.{secret[:-1]}x", f"{other_tid}.{secret}", f"{tid}.{other.split('.')[1]}",
                f"{new_id()}.{secret}", token + " "]:
        assert verify_token(store, bad) is None, bad


def test_resources_are_scoped_to_their_tenant(tmp_path):
    store = Store(tmp_path)
    a, _ = issue_token(store, "a")
    b, _ = issue_token(store, "b")
    fid = new_id()
    store.add_file(FileRecord(fid, a, "x.tsv", ".tsv", 3, "0" * 64, 0.0))
    store.add_job("j1", a, {"train": {"file_id": fid}}, 5)
    assert store.get_file(fid, a) is not None and store.get_file(fid, b) is None
    assert store.get_job("j1", a) is not None and store.get_job("j1", b) is None
    assert [j.id for j in store.list_jobs(b)] == []
    with pytest.raises(Exception, match="invalid file id"):
        store.file_path("../../etc/passwd", ".tsv")
    store.add_metrics("j1", 1, {"loss": 1.0})
    store.add_metrics("j1", 2, {"loss": 0.5})
    store.truncate_metrics("j1", 1)
    assert [m["step"] for m in store.metrics("j1")] == [1]


@pytest.mark.parametrize(("name", "label"), [
    ("../../etc/passwd.tsv", "passwd.tsv"), ("..\\..\\boot.ini.csv", "boot.ini.csv"), ("/abs/path/x.jsonl", "x.jsonl"),
    ("a b;rm -rf.tsv", "a_b_rm_-rf.tsv"), ("..", "upload"), (".hidden.tsv", "hidden.tsv"),
])
def test_upload_names_become_harmless_labels(name, label):
    assert safe_label(name) == label


def test_checkpoint_latest_survives_a_torn_write(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 2))
    attach(model, "lowrank", name="t", target_modules=["0"], r=2)
    params = trainable_parameters(model, "t")
    opt = torch.optim.AdamW(params.values(), lr=0.1)
    model(torch.randn(3, 6)).sum().backward()
    opt.step()
    saved = {k: v.detach().clone() for k, v in params.items()}
    checkpoints.save(tmp_path, model, "t", {"optimizer": opt.state_dict()}, {"step": 3})
    # a later checkpoint interrupted before LATEST moved: a half-written temp folder only
    (tmp_path / ".ckpt-6.tmp" / "adapter").mkdir(parents=True)
    assert checkpoints.latest(tmp_path).name == "ckpt-3"
    with torch.no_grad():
        for p in params.values():
            p.zero_()
    state, opt_state = checkpoints.load(checkpoints.latest(tmp_path), model, "t")
    assert state["step"] == 3
    for k, v in trainable_parameters(model, "t").items():
        assert torch.equal(v, saved[k])
    assert opt_state["optimizer"]["state"][0]["step"] == opt.state_dict()["state"][0]["step"]
    checkpoints.save(tmp_path, model, "t", {"optimizer": opt.state_dict()}, {"step": 6})
    assert checkpoints.latest(tmp_path).name == "ckpt-6" and not (tmp_path / "ckpt-3").exists()


def test_an_upload_killed_before_it_was_recorded_leaves_nothing(tmp_path):
    store = Store(tmp_path)
    a, _ = issue_token(store, "a")
    kept, torn = new_id(), new_id()
    store.add_file(FileRecord(kept, a, "x.tsv", ".tsv", 3, "0" * 64, 0.0))
    store.file_path(kept, ".tsv").parent.mkdir(parents=True)
    store.file_path(kept, ".tsv").write_text("a\tb")
    (store.files_dir / torn).mkdir()  # the folder of an upload killed before its record
    (store.files_dir / torn / ".data.tsv.1234.tmp").write_text("half")
    store.close()
    store = Store(tmp_path)
    assert not (store.files_dir / torn).exists() and store.file_path(kept, ".tsv").read_text() == "a\tb"


class _IdleRunner:
    """A runner stand-in: the tenant routes never reach the training loop."""

    def start(self) -> None: ...

    def stop(self) -> None: ...


def test_registration_is_closed_unless_opened_and_admins_revoke(tmp_path):
    from fastapi.testclient import TestClient

    from cotune.service.api import create_app
    from cotune.service.config import ServiceConfig

    with TestClient(create_app(ServiceConfig(tmp_path / "closed"), runner=_IdleRunner())) as closed:
        r = closed.post("/v1/tenants", json={"name": "eve"})
        assert r.status_code == 403 and "--open-registration" in r.json()["detail"]
    admin = ServiceConfig(tmp_path / "admin", admin_token="s3cret")
    with TestClient(create_app(admin, runner=_IdleRunner())) as app:
        assert app.post("/v1/tenants", json={"name": "eve"}).status_code == 403
        made = app.post("/v1/tenants", json={"name": "eve"}, headers={"X-Admin-Token": "s3cret"}).json()
        auth = {"Authorization": f"Bearer {made['token']}"}
        assert app.get("/v1/tenants/me", headers=auth).status_code == 200
        assert app.post(f"/v1/tenants/{made['tenant_id']}/revoke", headers={"X-Admin-Token": "nope"}).status_code == 403
        assert app.post(f"/v1/tenants/{made['tenant_id']}/revoke", headers={"X-Admin-Token": "s3cret"}).status_code == 204
        assert app.get("/v1/tenants/me", headers=auth).status_code == 401


def test_rate_limit_and_storage_quota(tmp_path):
    from fastapi.testclient import TestClient

    from cotune.service.api import create_app
    from cotune.service.config import ServiceConfig

    config = ServiceConfig(tmp_path / "q", open_registration=True, rate_limit=1.0, tenant_storage_bytes=30)
    with TestClient(create_app(config, runner=_IdleRunner())) as app:
        auth = {"Authorization": f"Bearer {app.post('/v1/tenants', json={'name': 'eve'}).json()['token']}"}
        codes = [app.get("/v1/tenants/me", headers=auth).status_code for _ in range(3)]
        assert codes == [200, 200, 429]  # a burst of two, then one per second
        r = app.get("/v1/models", headers=auth)
        assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_exceeded"
        assert 1 <= int(r.headers["Retry-After"]) <= 2
        app.app.state.limiter.rate = 0  # the quota alone from here
        assert app.post("/v1/files?filename=a.tsv", content=b"x\t1\n" * 5, headers=auth).status_code == 201
        r = app.post("/v1/files?filename=b.tsv", content=b"x\t1\n" * 5, headers=auth)
        assert r.status_code == 413 and "storage quota" in r.json()["detail"]


def test_step_size_bound_and_compute_quota(tmp_path):
    from fastapi.testclient import TestClient

    from cotune.service.api import create_app
    from cotune.service.config import ServiceConfig
    from cotune.service.store import SUCCEEDED

    config = ServiceConfig(tmp_path / "c", open_registration=True, rate_limit=0, max_step_tokens=4096,
                           tenant_compute_tokens=10_000)
    runner = _IdleRunner()
    runner.notify = runner.check_admission = runner.forget = lambda *a: None
    with TestClient(create_app(config, runner=runner)) as app:
        auth = {"Authorization": f"Bearer {app.post('/v1/tenants', json={'name': 'eve'}).json()['token']}"}
        fid = app.post("/v1/files?filename=a.tsv", content=b"sentence\tlabel\nok\t1\n", headers=auth).json()["id"]
        spec = {"train": {"file_id": fid}, "batch_size": 4, "max_length": 128}  # 512 token slots a step
        r = app.post("/v1/jobs", json={**spec, "batch_size": 64}, headers=auth)  # 8192 > 4096: one job's share
        assert r.status_code == 400 and "engine_options.grad_accum" in r.json()["detail"], r.text
        r = app.post("/v1/jobs", json={**spec, "batch_size": 64, "engine": "gl"}, headers=auth)
        assert r.status_code == 400 and "engine_options.interval" in r.json()["detail"]
        first = app.post("/v1/jobs", json={**spec, "steps": 12}, headers=auth).json()  # plans 6144 of 10000
        r = app.post("/v1/jobs", json={**spec, "steps": 8}, headers=auth)  # 6144 + 4096 > 10000
        assert r.status_code == 429 and "6144 planned" in r.json()["detail"], r.text
        assert app.get("/v1/tenants/me", headers=auth).json()["compute_tokens_planned"] == 6144
        # the first job trains 5 steps and is deleted: its 2560 stay used, the rest is free again
        store = app.app.state.store
        store.update_job(first["id"], status=SUCCEEDED, step=5)
        assert app.delete(f"/v1/jobs/{first['id']}", headers=auth).status_code == 204
        me = app.get("/v1/tenants/me", headers=auth).json()
        assert (me["compute_tokens"], me["compute_tokens_planned"], me["compute_quota_tokens"]) == (2560, 0, 10_000)
        assert app.post("/v1/jobs", json={**spec, "steps": 14}, headers=auth).status_code == 201  # 2560 + 7168
        assert app.post("/v1/jobs", json={**spec, "steps": 1}, headers=auth).status_code == 429  # + 512 > 10000


def test_a_late_answer_to_a_request_that_gave_up_is_dropped():
    """A timed-out request cancels its future; the runner's late answer must not raise (it killed the trainer's
    pipe reader once, and every later request then hung)."""
    from concurrent.futures import Future

    from cotune.errors import CotuneError
    from cotune.service.pending import settle

    gave_up = Future()
    assert gave_up.cancel()
    settle(gave_up, {"late": True})
    settle(gave_up, error=CotuneError("late"))
    fut = Future()
    settle(fut, 7)
    settle(fut, 8)  # settled once: the first answer stands
    assert fut.result() == 7
