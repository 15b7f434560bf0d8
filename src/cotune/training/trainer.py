"""The training loop: task data -> engine steps -> periodic validation, best-checkpoint selection, resume.

``train(cfg)`` is what ``cotune train`` calls. Its guarantees:

* the data order is a pure function of ``(seed, epoch)`` (``cotune.tasks.order.epoch_order``), so a resumed
  run skips ahead to exactly the batch it stopped at;
* checkpoints hold adapter, engine, trainer and RNG state, and evaluation does not touch the training
  RNG streams, so a run stopped and resumed ends with the same adapter as one that never stopped;
* the best adapter is chosen on the validation split only; the test split is used once, at the end, on
  the best adapter (``test: true``).
"""

from __future__ import annotations

import contextlib
import math
import random
import re
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cotune.adapters import attach, parameter_report, save_adapter, sites
from cotune.adapters.attach import (
    copy_adapter_weights,
    default_targets,
    format_parameter_report,
    head_modules,
    match_targets,
)
from cotune.adapters.base import AdapterConfig
from cotune.adapters.io import load_weights
from cotune.adapters.methods import method_configs
from cotune.adapters.registry import make_config
from cotune.engines.base import make_engine
from cotune.errors import CotuneError
from cotune.tasks.base import ALIASES
from cotune.tasks.metrics import collapse_warning, one_class_warning
from cotune.tasks.order import step_rows
from cotune.tasks.progress import progress
from cotune.training.checkpoint import (
    TrainerState,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
    set_rng_state,
)
from cotune.training.config import TrainConfig, read_yaml, save_config
from cotune.training.consistency import consistency_weight, with_consistency
from cotune.training.logging import JsonlLogger, plot_learning_curve
from cotune.training.reporting import make_reporters

#: ``callback(trainer, step, result)`` after each step (and its checkpoint); raising stops the run.
Callback = Callable[["Trainer", int, Any], None]
#: Task kinds whose models get a new, untrained head that must be trained with the adapters.
HEAD_TASKS = ("seq_cls",)
#: Config keys that must not change when a run is resumed (they define the data order and the model).
RESUME_KEYS = ("model", "task", "method", "engine", "seed", "batch_size", "train_limit", "val_size", "val_split")


@dataclass
class TrainResult:
    """What a finished run reports (also written to ``output_dir/results.json``)."""

    output_dir: Path
    steps: int
    best_step: int | None
    best_metric: float | None
    metric: str
    validation: dict[str, float] = field(default_factory=dict)
    test: dict[str, float] | None = None
    trainable_parameters: int = 0
    seconds: float = 0.0
    train_seconds: float = 0.0


# -- which rows train (their order in each epoch: cotune.tasks.order.epoch_order) -------------------------------
def _subset(n: int, seed: int, tag: int) -> np.ndarray:
    return np.random.default_rng([seed, tag]).permutation(n)


def split_rows(train_rows: Sequence[Any], cfg: TrainConfig) -> tuple[list[Any], list[Any] | None]:
    """Train rows after ``val_size`` hold-out and ``train_limit``; the held-out rows (or None)."""
    rows = list(train_rows)
    held: list[Any] | None = None
    if cfg.val_size is not None:
        k = int(round(cfg.val_size * len(rows))) if cfg.val_size < 1 else int(cfg.val_size)
        if not 0 < k < len(rows):
            raise CotuneError(f"val_size={cfg.val_size} holds out {k} of {len(rows)} train rows; need 0 < k < rows")
        perm = _subset(len(rows), cfg.seed, 1_000_001)
        held = [rows[i] for i in sorted(perm[:k])]
        rows = [rows[i] for i in sorted(perm[k:])]
    if cfg.train_limit is not None and cfg.train_limit < len(rows):
        perm = _subset(len(rows), cfg.seed, 1_000_003)
        rows = [rows[i] for i in sorted(perm[: cfg.train_limit])]
    if not rows:
        raise CotuneError("the train split has no rows")
    return rows, held


# -- model and adapters --------------------------------------------------------------------------------------------
def _all_leaves_regex(model: nn.Module) -> str:
    """A full-match regex naming every module that owns parameters (full fine-tuning as ``full`` adapters)."""
    paths = [n for n, m in model.named_modules() if n and any(True for _ in m.parameters(recurse=False))]
    return "|".join(re.escape(p) for p in paths)


def _covered_paths(model: nn.Module, configs: Sequence[AdapterConfig]) -> list[str]:
    out: list[str] = []
    for c in configs:
        targets = c.target_modules if c.target_modules is not None else default_targets(c.family, model)
        out += match_targets(model, targets)
    return out


def adapter_configs(model: nn.Module, cfg: TrainConfig) -> list[AdapterConfig]:
    """The method's configs, plus a trainable ``full`` head for classification when the method lacks one."""
    options = dict(cfg.method.options)
    if cfg.method.name == "full" and options.get("target_modules") == "all":
        options["target_modules"] = _all_leaves_regex(model)
    configs = list(method_configs(cfg.method.name, model, **options))
    want = str(cfg.method.train_head).lower()
    if want == "false" or (want == "auto" and cfg.task.kind not in HEAD_TASKS):
        return configs
    try:
        heads = head_modules(model)
    except CotuneError as e:
        raise CotuneError(
            f"cannot find the classification head to train ({e}); set method.train_head=false, or add a "
            "'full' config with the head's target_modules to the method"
        ) from e
    covered = _covered_paths(model, configs)
    # The head counts as covered when a config adapts it, a module inside it (a tensorized dense), or a parent.
    if any(p == h or p.startswith(h + ".") or h.startswith(p + ".") for p in covered for h in heads):
        return configs
    return [*configs, make_config("full", target_modules=default_targets("full", model))]


def check_model_available(spec: str, kind: str | None = None) -> None:
    """Fail early, and suggest the packaged models, when ``spec`` cannot be loaded (e.g. offline hub names).

    ``kind``: the task kind; image_cls builds its bases in code from a name (``linear``, ``mlp``, ``cnn``), which
    is no folder or hub name to resolve.
    """
    if spec.startswith("config:"):
        return
    if kind is not None and ALIASES.get(kind, kind) == "image_cls":
        from cotune.tasks.image_models import IMAGE_MODELS

        if spec in IMAGE_MODELS:
            return
    from cotune.models import resolve

    try:
        resolve(spec)
    except CotuneError as e:
        raise CotuneError(
            f"{e}. To substitute a packaged model, add the override model=minilm (encoder) or "
            "model=smollm2 (causal LM), or model=PATH for a local folder"
        ) from e


def engine_options(cfg: TrainConfig) -> dict[str, Any]:
    """``engine.options``, plus the run's ``seed`` for engines with their own random stream (zo)."""
    from cotune.engines.base import ENGINES

    opts = dict(cfg.engine.options)
    if "seed" not in opts and cfg.engine.name in ENGINES:
        import importlib
        import inspect

        mod, _, cls = ENGINES[cfg.engine.name].partition(":")
        if "seed" in inspect.signature(getattr(importlib.import_module(mod), cls)).parameters:
            opts["seed"] = cfg.seed
    return opts


def to_device(batch: Any, device: torch.device | str) -> Any:
    """Move the tensors of a (nested) batch to ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, list | tuple):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@contextlib.contextmanager
def isolated_rng() -> Iterator[None]:
    """Run a block (evaluation) without advancing the python, numpy or torch generators training uses."""
    py, npy = random.getstate(), np.random.get_state()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(npy)


# -- the trainer ---------------------------------------------------------------------------------------------------
class Trainer:
    """One training run. ``Trainer(cfg).train()``; ``callbacks`` see every step (tests stop runs with them)."""

    def __init__(self, cfg: TrainConfig, callbacks: Sequence[Callback] = (), verbose: bool = True) -> None:
        self.cfg = cfg
        self.callbacks = list(callbacks)
        self.verbose = verbose
        self.out = Path(cfg.output_dir)
        self.state = TrainerState()
        self.engine: Any = None

    def say(self, msg: str) -> None:
        if self.verbose:
            print(msg, flush=True)

    # -- setup ---------------------------------------------------------------------------------------------
    def _prepare_output(self) -> Path | None:
        """Create/clear the output folder; return the checkpoint to resume from (if any)."""
        out, cfg = self.out, self.cfg
        nonempty = out.is_dir() and any(out.iterdir())
        if out.exists() and not out.is_dir():
            raise CotuneError(f"output_dir {out} is a file; choose a folder")
        if cfg.resume:
            ckpts = list_checkpoints(out)
            if ckpts:
                self._check_resume_config()
                return ckpts[-1]
            if nonempty:
                self._refuse_foreign(out)
                self.say(f"resume: no checkpoint in {out}; starting from step 0")
                shutil.rmtree(out)
        elif nonempty:
            if not cfg.overwrite:
                raise CotuneError(
                    f"output_dir {out} already exists and is not empty; pass --overwrite (overwrite=true) to "
                    "replace it, --resume (resume=true) to continue it, or choose another output_dir"
                )
            self._refuse_foreign(out)
            shutil.rmtree(out)
        out.mkdir(parents=True, exist_ok=True)
        return None

    @staticmethod
    def _refuse_foreign(out: Path) -> None:
        # Never delete a folder cotune did not create: a run folder always holds config.yaml.
        if not (out / "config.yaml").is_file():
            raise CotuneError(
                f"refusing to replace {out}: it is not a cotune run folder (no config.yaml); delete it yourself "
                "or choose another output_dir"
            )

    def _check_resume_config(self) -> None:
        saved_path = self.out / "config.yaml"
        if not saved_path.is_file():
            return
        saved, now = read_yaml(saved_path), self.cfg.to_dict()
        diff = [k for k in RESUME_KEYS if saved.get(k) != now.get(k)]
        opt_s, opt_n = dict(saved.get("optim", {})), dict(now["optim"])
        opt_s.pop("total_steps", None)
        opt_n.pop("total_steps", None)
        if opt_s != opt_n:
            diff.append("optim")
        if diff:
            raise CotuneError(
                f"cannot resume {self.out}: {', '.join(diff)} differ from the saved config.yaml; resuming needs the "
                "same model, data, method, engine, optimizer, seed and batch size (max_steps/epochs/eval may change)"
            )

    def setup(self) -> None:
        """Build the task, model, adapters and data; restore a checkpoint when resuming."""
        cfg = self.cfg
        check_model_available(cfg.model, cfg.task.kind)  # before touching output_dir
        from cotune.tasks import make_task

        resume_from = self._prepare_output()
        self.log = JsonlLogger(self.out / "log.jsonl", make_reporters(cfg.report_to, self.out, cfg.to_dict()))
        seed_everything(cfg.seed)  # before the model is built: a new head's init depends on it
        self.task = make_task(cfg.task.kind, cfg.task.data, model=cfg.model, **cfg.task_options())
        self.device = torch.device(cfg.device_name())
        model = self.task.build_model(cfg.model)
        model.to(self.device)
        self.configs = adapter_configs(model, cfg)
        attach(model, self.configs)
        weight = consistency_weight(self.configs)
        self.loss_fn = with_consistency(self.task, weight) if weight > 0 else self.task.loss
        self.model = model
        rows, total, base = parameter_report(model)
        self.trainable = total
        self.say(format_parameter_report(rows, total, base))

        train = self.task.load("train")
        self.train_rows, held = split_rows(train.rows, cfg)
        if held is not None:
            self.val_rows: list[Any] | None = held
        elif cfg.val_split:
            self.val_rows = list(self.task.load(cfg.val_split).rows)
        else:
            self.val_rows = None
        self.steps_per_epoch = math.ceil(len(self.train_rows) / cfg.batch_size)
        total_steps = cfg.max_steps or math.ceil(cfg.epochs * self.steps_per_epoch)
        self.state.total_steps = total_steps

        optim = cfg.optim
        if optim.total_steps is None:
            # The schedule counts optimizer updates: one per ``interval`` (gl) / ``grad_accum`` (backprop) micro-batches.
            opts = cfg.engine.options
            interval = int(opts.get("interval") or opts.get("grad_accum") or 1)
            optim = replace(optim, total_steps=math.ceil(total_steps / interval))
        self.optim = optim
        save_config(replace(cfg, optim=optim, overwrite=False, resume=False), self.out / "config.yaml")

        engine_state = rng = None
        if resume_from is not None:
            self.state, engine_state, rng = load_checkpoint(resume_from, model)
            self.state.total_steps = total_steps
            self.log.truncate_after(self.state.step)
            self.say(f"resumed from {resume_from} (step {self.state.step} of {total_steps})")
        self.engine = make_engine(cfg.engine.name, model, optim, **engine_options(cfg))
        if engine_state is not None:
            self.engine.load_state_dict(engine_state)
        if rng is not None:
            set_rng_state(rng)
        self.log.log(
            {
                "type": "start",
                "step": self.state.step,
                "train_rows": len(self.train_rows),
                "val_rows": len(self.val_rows) if self.val_rows is not None else 0,
                "steps_per_epoch": self.steps_per_epoch,
                "total_steps": total_steps,
                "trainable_parameters": total,
                "base_parameters": base,
            }
        )

    # -- pieces of the loop ----------------------------------------------------------------------------------
    def batch_rows(self, step: int) -> list[Any]:
        """The rows of 0-based ``step`` (a pure function of seed, epoch and position)."""
        idx = step_rows(len(self.train_rows), self.cfg.batch_size, self.cfg.seed, step)
        return [self.train_rows[i] for i in idx]

    def evaluate(self, rows: Sequence[Any], limit: int | None) -> dict[str, float]:
        """The task's metrics on ``rows`` with the current adapters (eval mode, no grad, RNG untouched)."""
        was_training = self.model.training
        self.model.eval()
        try:
            with isolated_rng(), torch.no_grad(), progress(self.cfg.progress):
                metrics = self.task.evaluate(self.model, list(rows), self.cfg.eval_batch_size, limit)
        finally:
            self.model.train(was_training)
        return {k: float(v) for k, v in metrics.items()}

    def _better(self, value: float) -> bool:
        best = self.state.best_metric
        if best is None:
            return True
        if not math.isfinite(value):
            return False
        if not math.isfinite(best):
            return True
        return value > best if self.task.greater_is_better else value < best

    def validate(self) -> dict[str, float]:
        """Evaluate on the validation rows; save the adapter to ``adapter/`` when it is the best so far."""
        assert self.val_rows is not None
        metrics = self.evaluate(self.val_rows, self.cfg.eval_limit)
        metric = self.task.metric
        if metric not in metrics:
            raise CotuneError(f"task {self.task.name!r} reported {sorted(metrics)} but selects on {metric!r}")
        step = self.state.step
        self.state.evals.append({"step": step, **metrics})
        self.log.log({"type": "eval", "step": step, "split": "validation", **metrics})
        # A regression head that gives every input one value has lost the run: say so while it trains.
        self._warn(step, collapse_warning(metrics, metric))
        if self._better(metrics[metric]):
            self.state.best_metric, self.state.best_step = metrics[metric], step
            save_adapter(self.model, self.out / "adapter")
        return metrics

    def _warn(self, step: int, msg: str | None) -> None:
        if msg is not None:
            self.log.log({"type": "warning", "step": step, "message": msg})
            self.say(f"warning: step {step}: {msg}")

    # -- the loop --------------------------------------------------------------------------------------------------
    def train(self) -> TrainResult:
        """Run (or resume) the whole training; returns the summary also written to ``results.json``."""
        t0 = time.perf_counter()
        self.setup()
        try:
            try:
                self._loop()
            finally:
                if self.engine is not None:
                    self.engine.close()
            return self._finish(time.perf_counter() - t0)
        finally:
            self.log.close()  # report_to sinks: flush TensorBoard, finish the W&B run

    def _loop(self) -> None:
        from tqdm.auto import tqdm

        cfg, st = self.cfg, self.state
        window: list[float] = []
        stats: dict[str, list[float]] = {}
        pending_save, last_saved = False, st.step
        bar = tqdm(total=st.total_steps, initial=st.step, desc="train", disable=not cfg.progress, dynamic_ncols=True)
        self.model.train()
        try:
            while st.step < st.total_steps:
                t_step = time.perf_counter()
                batch = to_device(self.task.collate(self.batch_rows(st.step)), self.device)
                result = self.engine.step(self.loss_fn, batch)
                st.train_seconds += time.perf_counter() - t_step
                st.step += 1
                bar.update(1)
                if result.skipped:
                    st.skipped_steps += 1
                if math.isfinite(result.loss):
                    window.append(result.loss)
                for k, v in (result.stats or {}).items():
                    stats.setdefault(k, []).append(float(v))
                if cfg.log_every and (st.step % cfg.log_every == 0 or st.step == st.total_steps):
                    rec: dict[str, Any] = {
                        "type": "train",
                        "step": st.step,
                        "epoch": st.step / self.steps_per_epoch,
                        "loss": float(np.mean(window)) if window else float("nan"),
                        "skipped": st.skipped_steps,
                    }
                    rec.update({k: float(np.mean(v)) for k, v in stats.items()})
                    self.log.log(rec)
                    bar.set_postfix(loss=f"{rec['loss']:.4f}")
                    window, stats = [], {}
                if self.val_rows is not None and cfg.eval_every and st.step % cfg.eval_every == 0:
                    m = self.validate()
                    bar.set_postfix(loss=f"{result.loss:.4f}", **{self.task.metric: f"{m[self.task.metric]:.4f}"})
                if cfg.save_every and st.step % cfg.save_every == 0:
                    pending_save = True
                # A buffered micro-batch (ColA interval I > 1) waits for its update before it is checkpointed.
                if pending_save and result.updated:
                    save_checkpoint(self.out, self.model, self.engine, st, cfg.keep_checkpoints)
                    pending_save, last_saved = False, st.step
                for cb in self.callbacks:
                    cb(self, st.step, result)
        finally:
            bar.close()
        if self.val_rows is not None and (not st.evals or st.evals[-1]["step"] != st.step):
            self.validate()
        if last_saved != st.step or not list_checkpoints(self.out):
            save_checkpoint(self.out, self.model, self.engine, st, cfg.keep_checkpoints)

    def _finish(self, seconds: float) -> TrainResult:
        cfg, st = self.cfg, self.state
        if self.val_rows is None:
            save_adapter(self.model, self.out / "adapter")  # no validation: the final adapter is the result
        best = next((e for e in st.evals if e["step"] == st.best_step), {})
        # one class early in a run is normal; for the adapter the run keeps it is the result
        names = getattr(self.task, "label_names", None)  # a seq_cls task's; other task types have none
        self._warn(st.best_step or st.step, one_class_warning(best, self.task.metric, names))
        test = None
        if cfg.test:
            self.load_best()
            test = self.evaluate(self.task.load(cfg.test_split).rows, cfg.test_limit)
            self.log.log({"type": "test", "step": st.best_step or st.step, "split": cfg.test_split, **test})
        result = TrainResult(
            output_dir=self.out,
            steps=st.step,
            best_step=st.best_step,
            best_metric=st.best_metric,
            metric=self.task.metric,
            validation={k: v for k, v in best.items() if k != "step"},
            test=test,
            trainable_parameters=self.trainable,
            seconds=seconds,
            train_seconds=st.train_seconds,
        )
        import json

        summary = {**result.__dict__, "output_dir": str(self.out)}
        (self.out / "results.json").write_text(json.dumps(summary, indent=1))
        self.log.log({"type": "end", "step": st.step, "seconds": seconds})
        plot_learning_curve(self.out / "log.jsonl", self.out / "learning_curve.png", self.task.metric, self.out.name)
        return result

    def load_best(self) -> None:
        """Put the best adapter's weights (``output_dir/adapter``) back into the model."""
        copy_adapter_weights(self.model, load_weights(self.out / "adapter"))
        for site in sites(self.model).values():
            site.refresh_merge()  # merged engines fold weights into the base: fold the best ones


def train(cfg: TrainConfig, callbacks: Sequence[Callback] = (), verbose: bool = True) -> TrainResult:
    """Train ``cfg`` (see ``TrainConfig``); the public entry point behind ``cotune train``."""
    return Trainer(cfg, callbacks, verbose).train()
