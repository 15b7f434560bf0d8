"""ColA's split over a real wire: bytes per update and step time of ``cotune worker`` against the server-side fitter.

``python -m benchmarks remote_worker [--models minilm smollm2 --families lowrank linear mlp --steps 12]`` starts
one ``cotune serve`` per model on loopback and, per family, trains the same gl job twice, each alone: with the
server-side fitter, then with ``engine_options.fitter = "remote"`` and a ``cotune worker`` subprocess. Reported:
the capture frame (server -> worker) and weights frame (worker -> server) bytes per update, the median step time
after 2 warm-up steps of both (from the job's metric timestamps), their ratio, and the time per step at
100 Mbit/s and 1 Gbit/s computed from the measured bytes (loopback time + bytes x 8 / bandwidth: loopback
already paid the serialisation). Then the server's memory (RSS of its trainer and API processes) with K jobs
training at once, K remote vs K server-side, for the last family, each in a fresh server. Also the final adapters' largest difference (fp32 wire: within 1e-6 of the
server-side fitter) and the bf16 wire's. Writes ``runs/bench/remote_worker/results.json`` and a plot.
``--smoke``: MiniLM, lowrank, 4 steps, K = 2.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from cotune.service.client import Client
from cotune.service.launch import ServerProcess

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
BANDWIDTHS = {"100 Mbit/s": 100e6, "1 Gbit/s": 1e9}
ADAPTERS = {"lowrank": {"r": 8}, "linear": {}, "mlp": {}}
NO_EVAL = {"val_fraction": 0.0, "test_fraction": 0.0}  # timing the training only: no held-out evaluation at the end
SHAPES = {"minilm": (8, 128), "smollm2": (4, 128)}  # rows x tokens of a step


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks remote_worker", description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--models", nargs="*", default=["minilm", "smollm2"])
    p.add_argument("--families", nargs="*", default=list(ADAPTERS))
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--k", type=int, default=4, help="jobs at once for the memory comparison")
    p.add_argument("--out", default="runs/bench/remote_worker")
    a = p.parse_args(argv)
    if a.smoke:
        a.models, a.families, a.steps, a.k = ["minilm"], ["lowrank"], 4, 2
    if not 3 <= a.steps <= 200 or not 1 <= a.k <= 8:
        p.error("bounded runs only: 3..200 steps, K in 1..8")
    return a


def data_for(model: str) -> bytes:
    if model == "minilm":
        lines = (SHARED / "glue" / "SST-2" / "train.tsv").read_text().splitlines()
        return ("\n".join(lines[:129]) + "\n").encode()
    return (SHARED / "instruct" / "alpaca_en_demo.json").read_bytes()


def step_times(metrics: list[dict[str, Any]], warmup: int = 2) -> list[float]:
    t = {m["step"]: m["time"] for m in metrics if m["name"] == "loss"}
    steps = sorted(t)
    return [t[b] - t[a] for a, b in zip(steps, steps[1:], strict=False) if a > warmup]


def worker(srv: ServerProcess, token: str, job: str, state: Path) -> subprocess.Popen:
    env = {**os.environ, "COTUNE_TOKEN": token, "HF_HUB_OFFLINE": "1"}
    state.mkdir(parents=True, exist_ok=True)
    log = open(state / "worker.log", "w")  # noqa: SIM115 - the worker process holds it
    return subprocess.Popen([sys.executable, "-m", "cotune.cli", "worker", "--server", srv.url, "--job", job,
                             "--state", str(state)], env=env, stdout=log, stderr=subprocess.STDOUT)


def wait(c: Client, job: str, w: subprocess.Popen | None, state: Path, timeout: float = 3600) -> dict[str, Any]:
    """The job's final record; a worker that died first is an error with its output (not an endless wait)."""
    end = time.monotonic() + timeout
    while (st := c.status(job))["status"] not in ("succeeded", "failed", "cancelled"):
        if w is not None and w.poll() not in (None, 0):
            raise RuntimeError(f"the worker of job {job} exited {w.returncode}:\n"
                               + (state / "worker.log").read_text()[-2000:])
        if time.monotonic() > end:
            raise RuntimeError(f"job {job} still {st['status']} after {timeout:.0f} s")
        time.sleep(0.5)
    return st


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run_model(model: str, a: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    rows, tokens = SHAPES[model]
    out: dict[str, Any] = {"rows": rows, "tokens": tokens, "families": {}}
    with ServerProcess(tmp / model, ["--threads", "1", "--rate-limit", "0"], model=model) as srv:
        c = Client(srv.url)
        c.register("bench")
        f = c.upload_bytes(data_for(model), "train.tsv" if model == "minilm" else "train.json")
        for fam in a.families:
            spec = {"train": {"file_id": f["id"]}, "engine": "gl", "method": fam, "adapter": ADAPTERS[fam], "task_options": NO_EVAL,
                    "steps": a.steps, "batch_size": rows, "max_length": tokens, "optim": {"lr": 1e-4}, "seed": 1}
            runs = {}
            for name, opts in (("server", {}), ("remote", {"fitter": "remote"}), ("remote bf16",
                                                                                  {"fitter": "remote", "wire_dtype": "bf16"})):
                job = c.submit({**spec, "engine_options": opts})
                state = tmp / f"{model}-{fam}-{name}"
                w = worker(srv, c.token, job["id"], state) if "remote" in name else None
                st = wait(c, job["id"], w, state)
                if w is not None:
                    w.wait(120)
                if st["status"] != "succeeded":
                    raise RuntimeError(f"{model} {fam} {name}: {st['status']} {st['error']}")
                m = c.metrics(job["id"])
                runs[name] = {"id": job["id"], "step_s": float(np.median(step_times(m)))}
                if "remote" in name:
                    for k in ("worker_bytes_out", "worker_bytes_in"):
                        runs[name][k] = float(np.median([x["value"] for x in m if x["name"] == k]))
            ads = {n: load_file(str(tmp / model / "jobs" / r["id"] / "adapter" / "adapter_model.safetensors"))
                   for n, r in runs.items()}
            rel = {n: max(float((ads[n][k] - ads["server"][k]).abs().max()) / max(float(ads["server"][k].abs().max()), 1e-12)
                          for k in ads["server"]) for n in ("remote", "remote bf16")}
            r = runs["remote"]
            wire = r["worker_bytes_out"] + r["worker_bytes_in"]
            out["families"][fam] = {
                "server_step_s": runs["server"]["step_s"], "remote_step_s": r["step_s"],
                "ratio": r["step_s"] / runs["server"]["step_s"],
                "bytes_to_worker": r["worker_bytes_out"], "bytes_from_worker": r["worker_bytes_in"],
                "bf16_bytes_to_worker": runs["remote bf16"]["worker_bytes_out"],
                "at": {bw: r["step_s"] + wire * 8 / bits for bw, bits in BANDWIDTHS.items()},
                "max_rel_diff_fp32": rel["remote"], "max_rel_diff_bf16": rel["remote bf16"],
            }
    out["memory"] = memory(model, a, tmp)
    return out


def memory(model: str, a: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """RSS of the trainer and of the API with K jobs of the last family training at once, K remote (with K workers)
    against K server-side, each in a server of its own (a process's RSS keeps its high-water mark: measured one
    after the other in one trainer, the second would read the first's peak). The median of samples taken while
    every job is between step steps/2 and step steps."""
    rows, tokens = SHAPES[model]
    fam = a.families[-1]
    res: dict[str, Any] = {"family": fam, "k": a.k}
    for name, opts in (("server", {}), ("remote", {"fitter": "remote"})):
        with ServerProcess(tmp / f"mem-{model}-{name}", ["--threads", "1", "--rate-limit", "0"], model=model) as srv:
            c = Client(srv.url)
            c.register("bench")
            f = c.upload_bytes(data_for(model), "train.tsv" if model == "minilm" else "train.json")
            while srv.trainer_pid() is None:
                time.sleep(0.2)
            idle = {"trainer": rss_mb(srv.trainer_pid()), "api": rss_mb(srv.pid)}
            spec = {"train": {"file_id": f["id"]}, "engine": "gl", "method": fam, "adapter": ADAPTERS[fam],
                    "task_options": NO_EVAL, "steps": 10_000, "batch_size": rows, "max_length": tokens, "optim": {"lr": 1e-4}}
            jobs = [c.submit({**spec, "seed": i, "engine_options": opts})["id"] for i in range(a.k)]
            ws = [worker(srv, c.token, j, tmp / f"mem-{model}-{j}") for j in jobs] if name == "remote" else []
            samples: dict[str, list[float]] = {"trainer": [], "api": []}
            end = time.monotonic() + 900
            while time.monotonic() < end:
                steps = [c.status(j)["step"] for j in jobs]
                if min(steps) >= a.steps:
                    break
                if min(steps) >= max(2, a.steps // 2):
                    samples["trainer"].append(rss_mb(srv.trainer_pid()))
                    samples["api"].append(rss_mb(srv.pid))
                time.sleep(0.5)
            for j in jobs:
                c.cancel(j)
            for w in ws:
                w.wait(60)
        res[name] = {k: float(np.median(v)) if v else float("nan") for k, v in samples.items()}
        res[name]["idle"] = idle
    return res


def main(argv: list[str]) -> int:
    a = parse(argv)
    out_dir = Path(a.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="cotune-remote-") as tmp:
        results = {m: run_model(m, a, Path(tmp)) for m in a.models}
    res = {"steps": a.steps, "smoke": a.smoke, "models": results}
    (out_dir / "results.json").write_text(json.dumps(res, indent=2))
    print(f"{'model':<8} {'family':<8} {'server s':>9} {'remote s':>9} {'ratio':>6} {'to worker':>10} "
          f"{'from worker':>11} {'@100Mbit s':>10} {'@1Gbit s':>9} {'fp32 diff':>9} {'bf16 diff':>9}")
    for m, r in results.items():
        for fam, x in r["families"].items():
            print(f"{m:<8} {fam:<8} {x['server_step_s']:>9.3f} {x['remote_step_s']:>9.3f} {x['ratio']:>6.2f} "
                  f"{x['bytes_to_worker'] / 1e6:>8.2f}MB {x['bytes_from_worker'] / 1e6:>9.2f}MB "
                  f"{x['at']['100 Mbit/s']:>10.3f} {x['at']['1 Gbit/s']:>9.3f} {x['max_rel_diff_fp32']:>9.1e} "
                  f"{x['max_rel_diff_bf16']:>9.1e}")
        mm = r["memory"]
        for name in ("server", "remote"):
            x = mm[name]
            print(f"{m}: {mm['k']} {mm['family']} jobs at once, {name + '-side fitters' if name == 'server' else 'remote workers'}"
                  f": trainer RSS {x['trainer']:.0f} MB (idle {x['idle']['trainer']:.0f}), API {x['api']:.0f} MB "
                  f"(idle {x['idle']['api']:.0f}), together {x['trainer'] + x['api']:.0f} MB")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6.5, 3.5))
        labels, srv_t, rem_t, slow = [], [], [], []
        for m, r in results.items():
            for fam, x in r["families"].items():
                labels.append(f"{m}\n{fam}")
                srv_t.append(x["server_step_s"])
                rem_t.append(x["remote_step_s"])
                slow.append(x["at"]["100 Mbit/s"])
        xs = np.arange(len(labels))
        ax.bar(xs - 0.27, srv_t, 0.27, label="server-side fitter")
        ax.bar(xs, rem_t, 0.27, label="remote worker, loopback")
        ax.bar(xs + 0.27, slow, 0.27, label="remote at 100 Mbit/s (computed)")
        ax.set_xticks(xs, labels, fontsize=7)
        ax.set_ylabel("seconds per step")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out_dir / "step_time.png", dpi=100)
        plt.close(fig)
    except Exception as e:  # the numbers are the result
        print(f"(no plot: {e})")
    return 0
