"""Where MAdaKron's mixture stands after training: each trained run scored as the expert soup it serves (the
experts' weight average, AdaMix's inference level 3), as each expert alone, and routed one expert per sequence
(level 1), beside how far its experts drifted apart.

    python -m benchmarks expert_soup RUN [RUN ...] --out DIR   # RUN: a `cotune train` / `quality` run folder
    python -m benchmarks expert_soup --smoke                   # trains a 2-step mixture on RTE, then the above

If single experts scored above the soup, averaging would be what the mixture loses to plain AdaKron; if they
score alike, the loss is in training. ``spread`` is, per expert group, the mean over layers of
``mean_e ‖W_e − W̄‖ / ‖W̄‖`` (0: the experts are still the copies they start as).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from benchmarks._common import DATA, machine, markdown_table, out_dir, set_offline, write_json


def experts(model: Any) -> list[Any]:
    """The model's Kron adapters that hold a mixture."""
    from cotune.adapters import sites
    from cotune.adapters.families.kron import Kron

    ads = [a for s in sites(model).values() for a in s.adapters.values() if isinstance(a, Kron)]
    return [a for a in ads if a.config.experts > 1]


def spread(ads: list[Any]) -> dict[str, float]:
    """Per expert group: mean over layers of ``mean_e ‖W_e − W̄‖ / ‖W̄‖``."""
    out: dict[str, list[float]] = {}
    for ad in ads:
        for name in ("down_a", "down_v"):
            factor = getattr(ad, name)
            if len(factor) > 1:  # a group with experts, as ``score`` picks them
                w = factor.stacked()[0].detach()
                mean = w.mean(0)
                out.setdefault(name, []).append(float((w - mean).flatten(1).norm(dim=1).mean() / mean.norm()))
    return {k: sum(v) / len(v) for k, v in out.items()}


def score(run: Path, limit: int | None) -> dict[str, Any]:
    """The run's dev metrics for every way of combining its experts, and their spread."""
    import torch

    from cotune.training.saved import eval_config, load_trained
    from cotune.training.trainer import isolated_rng

    adapter = run / "adapter"
    cfg = eval_config(adapter, None, [])
    task, model = load_trained(cfg, adapter)
    model.eval()
    ads = experts(model)
    if not ads:
        raise SystemExit(f"{run}: no MAdaKron mixture in this adapter (method.options.mixture=partial|full)")
    rows = list(task.load("validation").rows)
    # (factor, trained weight, trained bias) of every expert group, to set each expert in turn and restore after
    groups = [(f, *(t.detach().clone() for t in f.stacked())) for ad in ads for f in (ad.down_a, ad.down_v) if len(f) > 1]
    n_exp = ads[0].config.experts

    def evaluate() -> dict[str, float]:
        with isolated_rng(), torch.no_grad():
            return {k: float(v) for k, v in task.evaluate(model, rows, cfg.eval_batch_size, limit).items()}

    res: dict[str, Any] = {"run": str(run), "mixture": ads[0].config.mixture, "experts": n_exp, "spread": spread(ads),
                           "soup": evaluate()}
    def set_experts(e: int | None) -> None:
        """Every group set to its e-th expert (the soup of copies is that expert); None: the trained experts back."""
        with torch.no_grad():
            for f, w, b in groups:
                for i in range(len(f)):
                    f.weight[i].copy_(w[i if e is None else e])
                    f.bias[i].copy_(b[i if e is None else e])

    for e in range(n_exp):
        set_experts(e)
        res[f"expert {e}"] = evaluate()
    set_experts(None)
    for ad in ads:
        ad.config.inference_level = 1
    res["routed per sequence"] = evaluate()
    res["metric"] = task.metric
    return res


def smoke_run(out: Path) -> Path:
    from cotune.training.config import config_from_dict
    from cotune.training.trainer import train

    cfg = config_from_dict({
        "model": "minilm", "task": {"kind": "seq_cls", "data": str(DATA / "glue" / "RTE"),
                                    "options": {"max_length": 64}},
        "method": {"name": "kron", "options": {"r": 16, "mixture": "full", "num_experts": 2}},
        "optim": {"lr": 1e-2}, "seed": 0, "batch_size": 4, "max_steps": 2, "train_limit": 8, "eval_limit": 8,
        "save_every": 0, "overwrite": True, "progress": False, "output_dir": str(out / "runs" / "rte_kron_full"),
    })
    train(cfg, verbose=False)
    return Path(cfg.output_dir)


def table(results: list[dict[str, Any]]) -> str:
    """One row per run: the dev metric (×100) of each way of combining the experts, and their spread."""
    ways = [k for k in results[0] if k == "soup" or k.startswith("expert ") or k == "routed per sequence"]
    rows = [[r["run"], r["mixture"], r["metric"], *(f"{100 * r[w][r['metric']]:.1f}" for w in ways),
             " / ".join(f"{k} {v:.2f}" for k, v in r["spread"].items())] for r in results]
    return markdown_table(["run", "mixture", "metric", *ways, "spread"], rows)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks expert_soup", description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="*", help="training run folders (each with adapter/ and config.yaml)")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--limit", type=int, default=None, help="dev rows scored (default: all)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    set_offline()
    import torch

    torch.set_num_threads(a.threads)
    out = out_dir("expert_soup", a.smoke, a.out)
    runs = [Path(r) for r in a.runs] or ([smoke_run(out)] if a.smoke else [])
    if not runs:
        p.error("name at least one run folder (or --smoke)")
    results = [score(r, 16 if a.smoke and a.limit is None else a.limit) for r in runs]
    write_json(out / "results.json", {"machine": machine(), "args": vars(a), "results": results})
    text = table(results)
    (out / "table.md").write_text(text + "\n")
    print(text)
    print(json.dumps({"wrote": str(out)}))
    return 0
