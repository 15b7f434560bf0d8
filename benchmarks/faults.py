"""Fault injection: ``kill -9`` of the trainer and of the API of a real ``cotune serve``, then every invariant.

``python -m benchmarks faults [--kills 20 --seed 0]`` starts ``cotune serve`` (MiniLM) on a free loopback port,
two tenants train a rolling set of small jobs (backprop and gradient-learning LoRA), and the harness SIGKILLs
either the trainer process alone (a crash, the OOM killer; the API restarts it) or the API process (whose
trainer then checkpoints and exits; the harness starts the server again) at one of four moments:

- ``training``: a random moment while jobs train;
- ``checkpoint``: as soon as a job reaches a checkpoint step (the checkpoint being written);
- ``adapter``: as soon as a job reaches its last step (its adapter being saved);
- ``upload``: in the middle of a slow upload of a 2 MB training file.

The first kills go through every (process, moment) pair in a seeded order, then at random. After each restart:
every recorded upload is there byte for byte and no partial one is; every finished job is still succeeded with
its adapter byte for byte; no job failed; no partial upload's folder is left. Each kill waits for a new checkpoint (or
for no job to be active) before the next one. At the end: each job's loss metrics hold every step exactly once,
and each job's adapter equals a second, uninterrupted run of the same spec on the same server (atol 1e-6).
Writes ``runs/bench/faults/results.json``; exits 1 on any violated invariant. ``--smoke``: 4 kills.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import random
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from cotune.service.client import Client
from cotune.service.launch import ServerProcess

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "glue" / "SST-2" / "train.tsv"
TARGETS = ("trainer", "api")
MOMENTS = ("training", "checkpoint", "adapter", "upload")
SERVER_ARGS = ["--threads", "1", "--rate-limit", "0"]


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks faults", description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="4 kills, short jobs")
    p.add_argument("--kills", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=40, help="steps of each job")
    p.add_argument("--concurrent", type=int, default=1,
                   help="jobs training at once; above 1 the uninterrupted-run comparison does not hold (the base's "
                        "dropout masks are drawn over each round's whole batch, and a restart shifts which steps of "
                        "which jobs share a round), so it is reported, not required")
    p.add_argument("--out", default="runs/bench/faults")
    a = p.parse_args(argv)
    if a.smoke:
        a.kills, a.steps = min(a.kills, 4), min(a.steps, 16)
    if not 1 <= a.kills <= 200 or not 4 <= a.steps <= 1000:
        p.error("bounded runs only: 1..200 kills, 4..1000 steps per job")
    return a


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Harness:
    """The server, its tenants and everything that must survive the kills."""

    def __init__(self, root: Path, steps: int, rng: random.Random, exact: bool = True) -> None:
        self.root, self.steps, self.rng, self.exact = root, steps, rng, exact
        self.srv = ServerProcess(root, SERVER_ARGS).start()
        self.clients = [Client(self.srv.url) for _ in range(2)]
        for i, c in enumerate(self.clients):
            c.register(f"faults-{i}")
        rows = DATA.read_text().splitlines()
        self.train = [("\n".join(rows[:1] + rows[1 + 64 * i : 1 + 64 * (i + 1)]) + "\n").encode() for i in range(2)]
        self.files: dict[str, tuple[int, str]] = {}  # file id -> (tenant, sha256)
        self.data_file = [self.upload(i, self.train[i]) for i in range(2)]
        self.jobs: list[dict[str, Any]] = []  # {"tenant", "spec", "id"}
        self.finished: dict[str, str] = {}  # job id -> sha256 of its adapter when it finished
        self.final: set[str] = set()  # jobs seen in a final state
        self.violations: list[str] = []
        self.cut_uploads: dict[str, int] = {}  # sha256 of an upload whose answer was lost -> its tenant
        self.restarts: list[float] = []  # seconds from the kill until the server trains again
        self._specs = itertools.count()

    # -- the workload -------------------------------------------------------------------------------------
    def upload(self, tenant: int, data: bytes) -> str:
        rec = self.clients[tenant].upload_bytes(data, "train.tsv")
        self.files[rec["id"]] = (tenant, sha(data))
        return rec["id"]

    def spec(self, i: int) -> dict[str, Any]:
        return {"task": "seq_cls", "train": {"file_id": self.data_file[i % 2]}, "steps": self.steps,
                "batch_size": 4, "max_length": 32, "checkpoint_every": 4, "adapter": {"r": 4}, "seed": i,
                "engine": "gl" if i % 2 else "backprop", "optim": {"lr": 3e-3, "scheduler": "linear"}}

    def keep_busy(self, active: int = 2) -> None:
        """Submit jobs until ``active`` are queued or running."""
        statuses = self.statuses()
        while sum(s["status"] in ("queued", "running") for s in statuses.values()) < active:
            i = next(self._specs)
            spec = self.spec(i)
            job = self.clients[i % 2].submit(spec)
            self.jobs.append({"tenant": i % 2, "spec": spec, "id": job["id"]})
            statuses[job["id"]] = job

    def statuses(self, all_jobs: bool = False) -> dict[str, dict[str, Any]]:
        """The jobs' statuses; only those not yet seen finished unless ``all_jobs`` (polling stays light)."""
        out = {}
        for j in self.jobs:
            if not all_jobs and j["id"] in self.final:
                continue
            s = self.clients[j["tenant"]].status(j["id"])
            out[j["id"]] = s
            if s["status"] in ("succeeded", "failed", "cancelled"):
                self.final.add(j["id"])
            if s["status"] == "succeeded" and j["id"] not in self.finished:
                self.finished[j["id"]] = sha(self.adapter_bytes(j))
        return out

    def adapter_bytes(self, job: dict[str, Any]) -> bytes:
        path = f"/v1/jobs/{job['id']}/adapter/adapter_model.safetensors"
        return self.clients[job["tenant"]].request("GET", path).content

    # -- the kills ---------------------------------------------------------------------------------------
    def wait_moment(self, moment: str, timeout: float = 120.0) -> None:
        """Return at ``moment`` (for ``upload`` the caller starts the upload)."""
        if moment == "training":
            time.sleep(self.rng.uniform(0.0, 1.5))
            return
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            for s in self.statuses().values():
                if s["status"] != "running":
                    continue
                at_checkpoint = s["step"] > s["checkpoint_step"] and s["step"] % 4 == 0
                if (moment == "checkpoint" and at_checkpoint) or (moment == "adapter" and s["step"] >= self.steps - 1):
                    return
            time.sleep(0.05)

    def slow_upload(self, tenant: int, outcome: dict[str, Any]) -> None:
        """A 2 MB training file sent in 32 KB pieces 5 ms apart (about 0.3 s); ``outcome`` says how it ended."""
        body = (self.train[tenant] * 200)[: 2 * 2**20]
        body = body[: body.rfind(b"\n") + 1]

        def pieces():
            for k in range(0, len(body), 32 * 1024):
                time.sleep(0.005)
                yield body[k : k + 32 * 1024]

        try:
            with httpx.Client(base_url=self.srv.url, timeout=60) as h:
                r = h.post("/v1/files", params={"filename": "big.tsv"}, content=pieces(),
                           headers={"Authorization": f"Bearer {self.clients[tenant].token}"})
            outcome["status"] = r.status_code
            if r.status_code == 201:
                self.files[r.json()["id"]] = (tenant, sha(body))
        except httpx.HTTPError as e:
            outcome["status"] = type(e).__name__
            self.cut_uploads[sha(body)] = tenant  # recorded in full, or not at all

    def kill(self, target: str, moment: str) -> dict[str, Any]:
        before = {jid: s["checkpoint_step"] for jid, s in self.statuses().items() if s["status"] == "running"}
        upload: dict[str, Any] = {}
        uploader = None
        if moment == "upload":
            uploader = threading.Thread(target=self.slow_upload, args=(self.rng.randrange(2), upload))
            uploader.start()
            time.sleep(0.15)
        else:
            self.wait_moment(moment)
        t0 = time.monotonic()
        if target == "trainer":
            old = self.srv.kill_trainer()
            self.wait(lambda: (p := self.srv.trainer_pid()) not in (None, old) and self.health()["ready"], "a new trainer")
        else:
            self.srv.kill_api()
            self.srv = ServerProcess(self.root, SERVER_ARGS, port=self.srv.port).start()
        self.restarts.append(time.monotonic() - t0)
        if uploader is not None:
            uploader.join(60)
        self.check(f"after kill {len(self.restarts)} ({target}, {moment})")
        # the next kill waits for progress: a new checkpoint of a job that was running, or no job active
        self.wait(lambda: self.progressed(before), "a new checkpoint")
        return {"target": target, "moment": moment, "upload": upload.get("status"),
                "restart_s": round(self.restarts[-1], 2)}

    def progressed(self, before: dict[str, int]) -> bool:
        now = self.statuses()
        if not any(s["status"] in ("queued", "running") for s in now.values()):
            return True
        return not before or any(j in self.final or now[j]["checkpoint_step"] > c for j, c in before.items())

    def health(self) -> dict[str, Any]:
        return httpx.get(self.srv.url + "/healthz", timeout=10).json()["runner"]

    def wait(self, pred: Any, what: str, timeout: float = 240.0) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                if pred():
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"timed out waiting for {what}\n{self.srv.log_tail()}")

    # -- the invariants ----------------------------------------------------------------------------------------
    def check(self, when: str) -> None:
        listed = {f["id"]: t for t, c in enumerate(self.clients) for f in c.files()}
        for fid in set(listed) - set(self.files):  # only an upload cut just after it was recorded may appear
            digest = sha(self.clients[listed[fid]].request("GET", f"/v1/files/{fid}/content").content)
            if self.cut_uploads.get(digest) == listed[fid]:
                self.files[fid] = (listed[fid], digest)
            else:
                self.violations.append(f"{when}: file {fid} is listed but was never uploaded in full")
        for fid, (tenant, digest) in self.files.items():
            got = self.clients[tenant].request("GET", f"/v1/files/{fid}/content").content
            if sha(got) != digest:
                self.violations.append(f"{when}: file {fid} changed or lost")
        by_id = {j["id"]: j for j in self.jobs}
        for jid, s in self.statuses(all_jobs=True).items():
            if s["status"] == "failed":
                self.violations.append(f"{when}: job {jid} failed: {s['error']}")
            if jid in self.finished and (s["status"] != "succeeded" or sha(self.adapter_bytes(by_id[jid])) != self.finished[jid]):
                self.violations.append(f"{when}: finished job {jid} lost or changed its adapter")
        files_dir = self.root / "files"
        if empty := [d.name for d in files_dir.iterdir() if d.is_dir() and not any(d.iterdir())]:
            self.violations.append(f"{when}: empty upload folders left: {empty}")

    def final_checks(self) -> float:
        """Metrics without gaps or duplicates and adapters equal to uninterrupted runs; the largest difference."""
        import torch
        from safetensors.torch import load

        self.wait(lambda: not self.statuses(), "every job to finish", timeout=900)
        self.check("at the end")
        again = []
        for j in self.jobs:
            steps = [m["step"] for m in self.clients[j["tenant"]].metrics(j["id"]) if m["name"] == "loss"]
            if steps != list(range(1, self.steps + 1)):
                self.violations.append(f"job {j['id']}: loss metrics at steps {steps}, not 1..{self.steps} once each")
            again.append(self.clients[j["tenant"]].submit(j["spec"])["id"])
            if self.exact:  # alone, as the killed job trained
                self.clients[j["tenant"]].wait(again[-1], timeout=900)
        for j, ref in zip(self.jobs, again, strict=True):
            out = self.clients[j["tenant"]].wait(ref, timeout=900)
            if out["status"] != "succeeded":
                self.violations.append(f"the uninterrupted run of job {j['id']} ended {out['status']}: {out['error']}")
        worst = 0.0
        for j, ref in zip(self.jobs, again, strict=True):
            a = load(self.adapter_bytes(j))
            b = load(self.adapter_bytes({"tenant": j["tenant"], "id": ref}))
            for k in a:
                diff = float((a[k] - b[k]).abs().max())
                worst = max(worst, diff)
                if self.exact and not torch.allclose(a[k], b[k], atol=1e-6, rtol=1e-5):
                    self.violations.append(f"job {j['id']} ({j['spec']['engine']}): {k} differs from the "
                                           f"uninterrupted run by {diff:.2e}")
        return worst


def schedule(kills: int, rng: random.Random) -> list[tuple[str, str]]:
    """Every (process, moment) pair once in a seeded order, then random pairs."""
    pairs = list(itertools.product(TARGETS, MOMENTS))
    rng.shuffle(pairs)
    return [pairs[i] if i < len(pairs) else (rng.choice(TARGETS), rng.choice(MOMENTS)) for i in range(kills)]


def main(argv: list[str]) -> int:
    a = parse(argv)
    out_dir = Path(a.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(a.seed)
    t_start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="cotune-faults-") as tmp:
        h = Harness(Path(tmp) / "root", a.steps, rng, exact=a.concurrent == 1)
        try:
            kills = []
            for target, moment in schedule(a.kills, rng):
                h.keep_busy(a.concurrent)
                kills.append(h.kill(target, moment))
                print(f"kill {len(kills):>3}: {target:<7} during {moment:<10} back in {kills[-1]['restart_s']:5.1f} s"
                      + (f", upload answered {kills[-1]['upload']}" if moment == "upload" else ""), flush=True)
            worst = h.final_checks()
        finally:
            h.srv.stop()
    result = {
        "kills": len(kills), "seed": a.seed, "steps_per_job": a.steps, "concurrent": a.concurrent, "jobs": len(h.jobs), "smoke": a.smoke,
        "by_kind": {f"{t}/{m}": sum(k["target"] == t and k["moment"] == m for k in kills)
                    for t, m in itertools.product(TARGETS, MOMENTS)},
        "restart_s": {"median": float(np.median(h.restarts)), "max": float(np.max(h.restarts))},
        "max_adapter_difference": worst, "violations": h.violations, "kill_log": kills,
        "wall_s": round(time.monotonic() - t_start, 1),
    }
    (out_dir / "results.json").write_text(json.dumps(result, indent=2))
    print(f"{len(kills)} kills ({', '.join(f'{k} {v}' for k, v in result['by_kind'].items() if v)}), {len(h.jobs)} jobs; "
          f"back to training in {result['restart_s']['median']:.1f} s (median), {result['restart_s']['max']:.1f} s (max)")
    print(f"largest difference between a killed job's adapter and its uninterrupted run: {worst:.2e}")
    print(f"invariants violated: {len(h.violations)}" + "".join(f"\n  - {v}" for v in h.violations))
    return 0 if not h.violations else 1
