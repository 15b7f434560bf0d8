"""Load test of the service on loopback: many clients polling and predicting while jobs train.

``python -m benchmarks service_load [--clients 50 --duration 60]`` starts ``cotune serve`` (MiniLM) on a free
127.0.0.1 port, registers a few tenants, trains one small job per tenant to predict with, then keeps one
longer job per tenant training while ``--clients`` threads poll job status and send predictions for
``--duration`` seconds (bounded also by ``--max-requests``). Reports errors, request counts and latency
percentiles (p50/p95/p99) of the status and predict endpoints, and the training steps done meanwhile;
writes ``runs/bench/service_load/results.json`` and a latency histogram. ``--smoke``: 4 clients, 3 s.
"""

from __future__ import annotations

import argparse
import json
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
    p.add_argument("--predict-every", type=int, default=5, help="every Nth request of a client is a prediction")
    p.add_argument("--tenants", type=int, default=4)
    p.add_argument("--threads", type=int, default=1, help="torch threads of the server's training loop")
    p.add_argument("--out", default="runs/bench/service_load")
    a = p.parse_args(argv)
    if a.smoke:
        a.clients, a.duration, a.tenants = min(a.clients, 4), min(a.duration, 3.0), 2
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
                rec: dict) -> None:
    c = Client(url, token=tenant["client"].token, timeout=60)
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
    finally:
        c.close()


def main(argv: list[str]) -> int:
    a = parse(argv)
    out_dir = Path(a.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    data = ("\n".join(DATA.read_text().splitlines()[:65]) + "\n").encode()
    with tempfile.TemporaryDirectory(prefix="cotune-load-") as tmp:
        # no rate limit: the suite measures latency under 50 clients, not the 429s of a limit
        with ServerProcess(Path(tmp) / "root", ["--threads", str(a.threads), "--rate-limit", "0"]) as srv:
            t_setup = time.monotonic()
            tenants = setup(srv.url, a.tenants, data, long_steps=100_000)
            setup_s = time.monotonic() - t_setup
            steps0 = {t["long"]: t["client"].status(t["long"])["step"] for t in tenants}
            rec: dict = {"status": [], "predict": [], "errors": 0}
            lock, budget = threading.Lock(), {"left": a.max_requests}
            deadline = time.monotonic() + a.duration
            threads = [threading.Thread(target=client_loop, args=(srv.url, tenants[i % len(tenants)], deadline,
                                                                  budget, lock, a.predict_every, rec))
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
    result = {
        "clients": a.clients, "tenants": a.tenants, "duration_s": round(wall, 2), "setup_s": round(setup_s, 2),
        "requests": len(rec["status"]) + len(rec["predict"]), "errors": rec["errors"],
        "error_samples": rec.get("error_samples", [])[:5],
        "status": percentiles(rec["status"]), "predict": percentiles(rec["predict"]),
        "requests_per_s": round((len(rec["status"]) + len(rec["predict"])) / wall, 1),
        "training_steps_during_load": trained, "predict_passes": health["runner"]["predict_passes"],
        "smoke": a.smoke,
    }
    (out_dir / "results.json").write_text(json.dumps(result, indent=2))
    print(f"service load: {a.clients} clients, {a.tenants} tenants, {wall:.1f} s, "
          f"{result['requests']} requests ({result['requests_per_s']}/s), errors {result['errors']}")
    print(f"{'endpoint':<10} {'n':>7} {'p50 ms':>9} {'p95 ms':>9} {'p99 ms':>9} {'max ms':>9}")
    for k in ("status", "predict"):
        s = result[k]
        if s["n"]:
            print(f"{k:<10} {s['n']:>7} {s['p50_ms']:>9.1f} {s['p95_ms']:>9.1f} {s['p99_ms']:>9.1f} {s['max_ms']:>9.1f}")
    print(f"training steps done by {a.tenants} long jobs during the load: {trained}; "
          f"predict passes (batched across tenants): {result['predict_passes']}")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.5))
        for k in ("status", "predict"):
            if rec[k]:
                ax.hist(np.asarray(rec[k]) * 1000, bins=50, alpha=0.6, label=k)
        ax.set_xlabel("latency (ms)")
        ax.set_ylabel("requests")
        ax.set_title(f"cotune serve, {a.clients} clients, {wall:.0f} s")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out_dir / "latency.png", dpi=100)
        plt.close(fig)
    except Exception as e:  # the numbers are the result; a missing plot is not an error
        print(f"(no plot: {e})")
    return 0 if result["errors"] == 0 else 1
