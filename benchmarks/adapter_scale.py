"""How large a trained adapter's output is beside the frozen layer's, and whether the token states it feeds collapsed.

``python -m benchmarks adapter_scale --adapter RUN/adapter [--adapter ...] [--rows 64]`` rebuilds each run's model
and task from its ``config.yaml`` (as ``cotune eval`` does), runs the first ``--rows`` validation rows and prints,
per adapted module, the median per-token norm of the frozen layer's output and of what the adapter adds to it;
per layer, the mean pairwise cosine of 300 (centred) token states: 1.0 means every token, so every sentence, is
the same vector and the head can only predict a constant; and the spread of the head's predictions. Written to
find why a seed never leaves the constant prediction (AdaKron's seed 5 at 3e-3, docs/RESULTS.md). Writes
``results.json`` and ``table.md`` under ``--out`` (default ``runs/bench/adapter_scale``).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from benchmarks._common import machine, markdown_table, out_dir, set_offline, write_json


def probe(adapter: str | Path, rows: int = 64) -> dict[str, Any]:
    """Per adapted module ``(base, adapter)`` median token norms, per layer the token-state cosine, and the
    head's prediction spread on the first ``rows`` validation rows of the run that saved ``adapter``."""
    import torch

    from cotune.adapters.site import AdaptedModule
    from cotune.training.saved import eval_config, load_trained

    cfg = eval_config(adapter)
    task, model = load_trained(cfg, adapter)
    model.eval()
    batch = task.collate(task.load(cfg.val_split).rows[:rows])
    if "attention_mask" not in batch:
        raise SystemExit(f"{adapter}: adapter_scale reads token states; this run's task ({cfg.task.kind}) has none")
    mask = batch["attention_mask"].bool()
    norms: dict[str, tuple[float, float]] = {}

    def hook(site: AdaptedModule, inputs: tuple, out: torch.Tensor) -> None:
        base = site.base(inputs[0])  # the frozen layer alone, on the same input
        norms[site.path] = (base[mask].norm(dim=-1).median().item(), (out - base)[mask].norm(dim=-1).median().item())

    handles = [m.register_forward_hook(hook) for m in model.modules()  # a replaced layer has no frozen output
               if isinstance(m, AdaptedModule) and m.current() is not None and m.current().site != "replace"]
    with torch.no_grad():
        out = model(**{k: v for k, v in batch.items() if k != "labels"}, output_hidden_states=True)
    for h in handles:
        h.remove()
    pick = torch.randperm(int(mask.sum()), generator=torch.Generator().manual_seed(0))[:300]
    cosines = []
    for states in out.hidden_states[1:]:
        x = torch.nn.functional.normalize((s := states[mask][pick]) - s.mean(-1, keepdim=True), dim=-1)
        c = x @ x.T
        cosines.append(((c.sum() - c.diagonal().sum()) / (len(x) * (len(x) - 1))).item())
    preds = out.logits.squeeze(-1).float()
    labels = batch["labels"].float()
    return {"adapter": str(adapter), "rows": len(labels),
            "sites": {k: {"base": b, "adapter": a, "ratio": a / b} for k, (b, a) in norms.items()},
            "token_cosine": cosines, "prediction_sd": preds.std(0).mean().item(), "label_sd": labels.std().item()}


def table(results: list[dict[str, Any]]) -> str:
    lines = []
    for r in results:
        lines += [f"### {r['adapter']}", "",
                  f"head: prediction sd {r['prediction_sd']:.4f} against label sd {r['label_sd']:.3f} "
                  f"({r['rows']} validation rows); token cosine after each layer: "
                  + " / ".join(f"{c:.3f}" for c in r["token_cosine"]), "",
                  markdown_table(["adapted module", "frozen output (median token norm)", "adapter adds", "ratio"],
                                 [[k, f"{s['base']:.2f}", f"{s['adapter']:.2f}", f"{s['ratio']:.2f}"]
                                  for k, s in r["sites"].items()]), ""]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks adapter_scale", description=__doc__.splitlines()[0])
    p.add_argument("--adapter", action="append", required=True, help="a run's adapter folder (repeat for several)")
    p.add_argument("--rows", type=int, default=64)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    set_offline()
    results = [probe(path, a.rows) for path in a.adapter]
    out = out_dir("adapter_scale", False, a.out)
    write_json(out / "results.json", {"results": results, "machine": machine()})
    text = table(results)
    (out / "table.md").write_text(text)
    print(text)
    print(f"wrote {out}/results.json, table.md")
    return 0
