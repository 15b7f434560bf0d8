"""Load test of the service on loopback: many clients polling and predicting while jobs train.

``python -m benchmarks service_load [--clients 50 --duration 60]`` starts ``cotune serve`` (MiniLM) on a free
127.0.0.1 port, registers a few tenants, trains one small job per tenant to predict with, then keeps one
longer job per tenant training while ``--clients`` threads poll job status and send predictions for
``--duration`` seconds (bounded also by ``--max-requests``). Reports errors, request counts and latency
percentiles (p50/p95/p99/max) of the status and predict endpoints, and the training steps done meanwhile, for
a server that trains in a child process (``--trainer process``, the default) and one that trains in a thread of
the API's process, one after the other; writes ``runs/bench/service_load/results.json`` and a latency
histogram. ``--smoke``: 4 clients, 3 s, the process trainer only.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from cotune.service.client import Client
from cotune.service.launch import ServerProcess

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "glue" / "SST-2" / "train.tsv"
TEXTS = ["a gorgeous, witty, seductive movie.", "the plot is nothing but boilerplate clichés"]


def percentiles(xs: list[float]) -> dict[str, float]:
    if not xs:
        return {"n": 0}
    a = np.asarray(xs) * 1000.0
    return {"n": len(xs), "p50_ms": float(np.percentile(a, 50)), "p95_ms": float(np.percentile(a, 95)),
            "p99_ms": float(np.percentile(a, 99)), "max_ms": float(a.max()), "mean_ms": float(a.mean())}


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks service_load", description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="a few seconds with a few clients")
    p.add_argument("--clients", type=int, default=50)
    p.add_argument("--duration", type=float, default=60.0, help="seconds of load")
    p.add_argument("--max-requests", type=int, default=200_000, help="stop after this many requests in all")
    p.add_argument("--think", type=float, default=0.5,
                   help="mean seconds each client waits between its requests, exponentially distributed (0.5: as "
                        "often as Client.wait polls a job; 0: a closed loop that measures the server's saturation, where latency = clients / "
                        "throughput by Little's law)")
    p.add_argument("--predict-every", type=int, default=5, help="every Nth request of a client is a prediction")
    p.add_argument("--tenants", type=int, default=4)
    p.add_argument("--threads", type=int, default=1, help="torch threads of the server's training loop")
    p.add_argument("--trainer", choices=("process", "thread", "both"), default="both",
                   help="where the server trains (cotune serve --trainer); both: one run of each, in turn")
    p.add_argument("--out", default="runs/bench/service_load")
    a = p.parse_args(argv)
    if a.smoke:
        a.clients, a.duration, a.tenants = min(a.clients, 4), min(a.duration, 3.0), 2
        a.trainer = "process" if a.trainer == "both" else a.trainer
    if not 1 <= a.clients <= 200 or not 0 < a.duration <= 600 or a.tenants < 1:
        p.error("bounded load only: 1..200 clients, duration in (0, 600] s, at least one tenant")
    return a


def setup(url: str, tenants: int, data: bytes, long_steps: int) -> list[dict]:
    """Per tenant: a token, a finished job to predict with, and a long job that trains during the load."""
    out = []
    for i in range(tenants):
        c = Client(url)
        c.register(f"load-{i}")
        f = c.upload_bytes(data, "train.tsv")
        base = {"task": "seq_cls", "train": {"file_id": f["id"]}, "batch_size": 4, "max_length": 32,
                "adapter": {"r": 4}, "seed": i}
        small = c.submit({**base, "steps": 4})
        out.append({"client": c, "small": small["id"], "base": base})
    for t in out:  # the small jobs train together through the multi-tenant engine
        st = t["client"].wait(t["small"], timeout=300)
        if st["status"] != "succeeded":
            raise RuntimeError(f"setup job failed: {st['error']}")
    for t in out:
        t["long"] = t["client"].submit({**t["base"], "steps": long_steps, "checkpoint_every": 25})["id"]
    return out


def client_loop(url: str, tenant: dict, deadline: float, budget: dict, lock: threading.Lock, every: int,
                rec: dict, think: float) -> None:
    c = Client(url, token=tenant["client"].token, timeout=60)
    # Poisson arrivals (exponential pauses of mean ``think``): clients that all slept the same 0.5 s would
    # arrive in bursts of 50 and measure their own queue
    rng = random.Random(id(rec) ^ threading.get_ident())
    if think:
        time.sleep(rng.uniform(0, think))
    i = 0
    try:
        while time.monotonic() < deadline:
            with lock:
                if budget["left"] <= 0:
                    return
                budget["left"] -= 1
            i += 1
            kind = "predict" if every and i % every == 0 else "status"
            t0 = time.perf_counter()
            try:
                if kind == "predict":
                    preds = c.predict(tenant["small"], TEXTS)
                    ok = len(preds) == len(TEXTS)
                else:
                    ok = c.status(tenant["long"])["status"] in ("queued", "running", "succeeded")
            except Exception as e:  # counted, never raised: the report says how many
                ok = False
                rec.setdefault("error_samples", []).append(f"{kind}: {type(e).__name__}: {e}"[:300])
            dt = time.perf_counter() - t0
            with lock:
                rec[kind].append(dt)
                if not ok:
                    rec["errors"] += 1
            if think:
                time.sleep(rng.expovariate(1.0 / think))
    finally:
        c.close()


def measure(a: argparse.Namespace, data: bytes, trainer: str) -> tuple[dict, dict]:
    """One server with ``--trainer TRAINER`` under the load: its summary and the raw latencies."""
    with tempfile.TemporaryDirectory(prefix="cotune-load-") as tmp:
        # no rate limit: the suite measures latency under 50 clients, not the 429s of a limit
        args = ["--threads", str(a.threads), "--rate-limit", "0", "--trainer", trainer]
        with ServerProcess(Path(tmp) / "root", args) as srv:
            t_setup = time.monotonic()
            tenants = setup(srv.url, a.tenants, data, long_steps=100_000)
            setup_s = time.monotonic() - t_setup
            steps0 = {t["long"]: t["client"].status(t["long"])["step"] for t in tenants}
            rec: dict = {"status": [], "predict": [], "errors": 0}
            lock, budget = threading.Lock(), {"left": a.max_requests}
            deadline = time.monotonic() + a.duration
            threads = [threading.Thread(target=client_loop, args=(srv.url, tenants[i % len(tenants)], deadline,
                                                                  budget, lock, a.predict_every, rec, a.think))
                       for i in range(a.clients)]
            t0 = time.monotonic()
            for th in threads:
                th.start()
            for th in threads:
                th.join(a.duration + 120)
            wall = time.monotonic() - t0
            trained = sum(t["client"].status(t["long"])["step"] - steps0[t["long"]] for t in tenants)
            health = tenants[0]["client"].health()
            for t in tenants:
                t["client"].cancel(t["long"])
                t["client"].close()
    return {
        "trainer": trainer, "duration_s": round(wall, 2), "setup_s": round(setup_s, 2),
        "requests": len(rec["status"]) + len(rec["predict"]), "errors": rec["errors"],
        "error_samples": rec.get("error_samples", [])[:5],
        "status": percentiles(rec["status"]), "predict": percentiles(rec["predict"]),
        "requests_per_s": round((len(rec["status"]) + len(rec["predict"])) / wall, 1),
        "training_steps_during_load": trained, "predict_passes": health["runner"]["predict_passes"],
    }, rec


def main(argv: list[str]) -> int:
    a = parse(argv)
    out_dir = Path(a.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    data = ("\n".join(DATA.read_text().splitlines()[:65]) + "\n").encode()
    trainers = ("process", "thread") if a.trainer == "both" else (a.trainer,)
    runs, raw = {}, {}
    for trainer in trainers:  # one after the other, never two servers at once
        runs[trainer], raw[trainer] = measure(a, data, trainer)
    result = {"clients": a.clients, "tenants": a.tenants, "think_s": a.think, "smoke": a.smoke, "runs": runs,
              "goal": "status p99 <= 100 ms with 50 clients while jobs train (issue 18)"}
    (out_dir / "results.json").write_text(json.dumps(result, indent=2))
    print(f"service load: {a.clients} clients ({a.think:g} s between a client's requests), {a.tenants} tenants "
          f"training, {a.duration:.0f} s per trainer placement")
    print(f"{'trainer':<8} {'endpoint':<8} {'n':>7} {'p50 ms':>9} {'p95 ms':>9} {'p99 ms':>9} {'max ms':>9} "
          f"{'errors':>7} {'steps':>6}")
    for trainer, r in runs.items():
        for k in ("status", "predict"):
            s = r[k]
            if s["n"]:
                print(f"{trainer:<8} {k:<8} {s['n']:>7} {s['p50_ms']:>9.1f} {s['p95_ms']:>9.1f} {s['p99_ms']:>9.1f} "
                      f"{s['max_ms']:>9.1f} {r['errors']:>7} {r['training_steps_during_load']:>6}")
    passes = ", ".join(f"{t}: {r['predict_passes']}" for t, r in runs.items())
    print(f"steps: training steps the long jobs did during the load; predict passes (batched across tenants): {passes}")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.5))
        for trainer, rec in raw.items():
            for k in ("status", "predict"):
                if rec[k]:
                    ax.hist(np.asarray(rec[k]) * 1000, bins=50, alpha=0.5, label=f"{k}, trainer {trainer}")
        ax.set_xscale("symlog")
        ax.set_xlabel("latency (ms)")
        ax.set_ylabel("requests")
        ax.set_title(f"cotune serve, {a.clients} clients while jobs train")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out_dir / "latency.png", dpi=100)
        plt.close(fig)
    except Exception as e:  # the numbers are the result; a missing plot is not an error
        print(f"(no plot: {e})")
    return 0 if all(r["errors"] == 0 for r in runs.values()) else 1
