"""``cotune client ...``: register, upload, submit, status, wait, download, predict and delete against a server.

The token is read from ``--token`` or ``$COTUNE_TOKEN``; ``register`` prints it (keep it: only its hash is
stored on the server).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from cotune.errors import CotuneError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", default=os.environ.get("COTUNE_URL", "http://127.0.0.1:8000"), help="server address")
    p.add_argument("--token", default=None, help="tenant token (default $COTUNE_TOKEN)")
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    r = sub.add_parser("register", help="register a tenant and print its token")
    r.add_argument("name")
    r.add_argument("--admin-token", default=os.environ.get("COTUNE_ADMIN_TOKEN"))
    u = sub.add_parser("upload", help="upload a data file; prints its id")
    u.add_argument("path")
    s = sub.add_parser("submit", help="submit a job: a JSON spec file, or --train-file/--data-path and options")
    s.add_argument("--spec", help="JSON file with the job spec (see the server's /docs)")
    s.add_argument("--train-file", help="upload this file and train on it")
    s.add_argument("--file-id", help="train on an already uploaded file")
    s.add_argument("--data-path", help="train on a path under one of the server's data roots")
    s.add_argument("--task", default=None, help="seq_cls or causal_lm (default: what the server's base model trains)")
    s.add_argument("--method", default="lowrank")
    s.add_argument("--engine", default="backprop", choices=("backprop", "gl", "zo"))
    s.add_argument("--fitter", default="server", choices=("server", "remote"),
                   help="gl: where the adapter's update runs; remote: on your machine, with cotune worker --job ID")
    s.add_argument("--steps", type=int, default=100)
    s.add_argument("--batch-size", type=int, default=8)
    s.add_argument("--max-length", type=int, default=128)
    s.add_argument("--lr", type=float, default=None, help="default: the method's tuned rate (1e-3 for zo and sgd)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--eval-every", type=int, default=None, help="evaluate every N steps too (default: at the end)")
    s.add_argument("--wait", action="store_true", help="wait until the job finishes")
    s.add_argument("overrides", nargs="*", metavar="key=value", help="adapter options, e.g. r=8 lora_alpha=16")
    st = sub.add_parser("status", help="a job's status (all jobs without an id)")
    st.add_argument("job_id", nargs="?")
    m = sub.add_parser("metrics", help="a job's logged metrics")
    m.add_argument("job_id")
    m.add_argument("--plot", metavar="PNG", help="also draw its learning curve (train loss, eval metric) there")
    m.add_argument("--metric", default=None, help="the eval metric to draw (default: the job's own, else loss)")
    w = sub.add_parser("wait", help="wait for a job to finish")
    w.add_argument("job_id")
    w.add_argument("--timeout", type=float, default=3600)
    c = sub.add_parser("cancel", help="cancel a job")
    c.add_argument("job_id")
    de = sub.add_parser("delete", help="delete a finished job (or, with --adapter-only, just its adapter)")
    de.add_argument("job_id")
    de.add_argument("--adapter-only", action="store_true", help="keep the job's record and metrics")
    df = sub.add_parser("delete-file", help="delete an uploaded file")
    df.add_argument("file_id")
    sub.add_parser("rotate-token", help="get a new token; the current one stops working (prints the new one)")
    d = sub.add_parser("download", help="download a finished job's adapter (PEFT format) into a folder")
    d.add_argument("job_id")
    d.add_argument("folder")
    pr = sub.add_parser("predict", help="predict with a job's adapter")
    pr.add_argument("job_id")
    pr.add_argument("inputs", nargs="+")
    pr.add_argument("--max-new-tokens", type=int, default=16)


def _print(obj: object) -> None:
    print(json.dumps(obj, indent=2))


def run(args: argparse.Namespace) -> int:
    from cotune.config import parse_overrides
    from cotune.service.client import Client

    token = args.token or os.environ.get("COTUNE_TOKEN")
    with Client(args.url, token) as c:
        if args.action != "register" and not c.token:
            raise CotuneError("no token: pass --token or set COTUNE_TOKEN (cotune client register NAME prints one)")
        if args.action == "register":
            _print(c.register(args.name, admin_token=args.admin_token))
        elif args.action == "upload":
            _print(c.upload(args.path))
        elif args.action == "submit":
            if args.spec:
                spec = json.loads(Path(args.spec).read_text())
            else:
                given = [x for x in (args.train_file, args.file_id, args.data_path) if x]
                if len(given) != 1:
                    raise CotuneError("give exactly one of --spec, --train-file, --file-id, --data-path")
                if args.train_file:
                    train = {"file_id": c.upload(args.train_file)["id"]}
                elif args.file_id:
                    train = {"file_id": args.file_id}
                else:
                    train = {"path": args.data_path}
                spec = {"train": train, "seed": args.seed, **({"task": args.task} if args.task else {}), "method": args.method, "engine": args.engine,
                        "steps": args.steps, "batch_size": args.batch_size, "max_length": args.max_length,
                        "optim": {} if args.lr is None else {"lr": args.lr}, "adapter": parse_overrides(args.overrides)}
                if args.eval_every is not None:
                    spec["eval_every"] = args.eval_every
                if args.fitter == "remote":
                    if args.engine != "gl":
                        raise CotuneError("--fitter remote is a gradient-learning option: add --engine gl")
                    spec["engine_options"] = {"fitter": "remote"}
            job = c.submit(spec)
            _print(c.wait(job["id"]) if args.wait else job)
        elif args.action == "status":
            _print(c.status(args.job_id) if args.job_id else c.jobs())
        elif args.action == "metrics":
            rows = c.metrics(args.job_id)
            _print(rows)
            if args.plot:
                from cotune.training.logging import plot_curve

                metric = args.metric or (c.status(args.job_id).get("result") or {}).get("metric") or "loss"
                png = plot_curve(curve_records(rows), args.plot, metric, title=f"job {args.job_id}")
                print(f"learning curve: {png}", file=sys.stderr)
        elif args.action == "wait":
            st = c.wait(args.job_id, timeout=args.timeout)
            _print(st)
            return 0 if st["status"] == "succeeded" else 1
        elif args.action == "cancel":
            _print(c.cancel(args.job_id))
        elif args.action == "delete":
            (c.delete_adapter if args.adapter_only else c.delete_job)(args.job_id)
            _print({"deleted": args.job_id, "adapter_only": args.adapter_only})
        elif args.action == "delete-file":
            c.delete_file(args.file_id)
            _print({"deleted": args.file_id})
        elif args.action == "rotate-token":
            _print({"token": c.rotate_token()})
        elif args.action == "download":
            print(c.download(args.job_id, args.folder))
        elif args.action == "predict":
            _print(c.predict(args.job_id, args.inputs, args.max_new_tokens))
    sys.stdout.flush()
    return 0


def curve_records(metrics: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A job's metric rows (``step``, ``name``, ``value``) as a run log's records: ``loss`` rows as ``train``
    records, the ``eval_*`` rows of each step as one ``eval`` record, so a job draws as ``cotune train`` does."""
    train = [{"type": "train", "step": m["step"], "loss": m["value"]} for m in metrics if m["name"] == "loss"]
    evals: dict[int, dict[str, Any]] = {}
    for m in metrics:
        if m["name"].startswith("eval_"):
            evals.setdefault(m["step"], {"type": "eval", "step": m["step"]})[m["name"][len("eval_"):]] = m["value"]
    return train + [evals[k] for k in sorted(evals)]
