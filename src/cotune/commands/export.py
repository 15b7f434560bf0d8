"""``cotune export --adapter DIR --model M --out DIR``: merge an adapter into its base, save a full model.

The result is a plain transformers folder (config, safetensors weights, tokenizer) that
``AutoModel*.from_pretrained`` loads without cotune. Only mergeable families (lowrank, linear, cola, and
``full`` heads, which are copied in) can be exported; others (kron, mlp, tt) keep running as adapters, and so
does a head trained on a sentence-transformers pooling, which transformers' classification models cannot express.
"""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

from torch import nn

from cotune.errors import CotuneError

_POOLED = ("this adapter's head was trained on the checkpoint's {pooling!r} pooling (cotune.tasks.pooling), which a "
           "plain transformers model cannot express: its head reads BERT's pooler. Keep it as an adapter (cotune "
           "eval, load_adapter, the service), or train with task.options.pooling=model to export a merged model")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--adapter", required=True, help="adapter folder (RUN/adapter or a PEFT LoRA folder)")
    p.add_argument("--model", help="base model (default: the run's config / the adapter's base_model_name_or_path)")
    p.add_argument("--out", required=True, help="folder for the merged model")
    p.add_argument("--config", help="training config (default: the run's config.yaml beside the adapter)")
    p.add_argument("--task", dest="kind", help="seq_cls | causal_lm | seq2seq (default: from the config or adapter)")
    p.add_argument("--num-labels", type=int, help="labels of a classification head (default: read from the adapter)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")


def merge_into_base(model: nn.Module) -> nn.Module:
    """Fold the active adapter set into the base weights and unwrap every site: a plain transformers model."""
    from cotune.adapters import merge, sites

    try:
        merge(model)
    except CotuneError as e:
        raise CotuneError(
            f"{e}; export needs mergeable families (use `cotune eval` or load_adapter for the others)"
        ) from e
    for path, site in sites(model).items():
        parent_path, _, leaf = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        setattr(parent, leaf, site.base)  # the base now holds the merged weights
    for attr in ("_cotune_sets", "_cotune_active"):
        if hasattr(model, attr):
            delattr(model, attr)
    return model


def export(
    adapter_dir: str | os.PathLike,
    out: str | os.PathLike,
    model_spec: str | None = None,
    config: str | os.PathLike | None = None,
    kind: str | None = None,
    num_labels: int | None = None,
    overwrite: bool = False,
) -> Path:
    """Merge ``adapter_dir`` into its base and save model + tokenizer to ``out``; returns ``out``."""
    from cotune.adapters import load_adapter
    from cotune.models import load_model, load_tokenizer
    from cotune.training.saved import PEFT_TASKS, adapter_meta, head_labels, run_config_path

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise CotuneError(f"{out} already exists and is not empty; pass --overwrite or choose another --out")
        shutil.rmtree(out)
    cfg_path = config or run_config_path(adapter_dir)
    if cfg_path is not None:
        from cotune.training.saved import eval_config, load_trained

        cfg = eval_config(adapter_dir, cfg_path, model=model_spec)
        _, model = load_trained(cfg, adapter_dir)
        spec = cfg.model
    else:
        meta = adapter_meta(adapter_dir)
        if meta.get("cotune_pooling"):
            raise CotuneError(_POOLED.format(pooling=meta["cotune_pooling"]))
        spec = model_spec or meta.get("base_model_name_or_path")
        if not spec:
            raise CotuneError("the adapter does not name its base model; pass --model")
        kind = kind or PEFT_TASKS.get(str(meta.get("task_type")), "base")
        kwargs = {}
        if kind == "seq_cls":
            kwargs["num_labels"] = num_labels or head_labels(adapter_dir) or 2
        model = load_model(spec, kind, **kwargs)
        load_adapter(model, adapter_dir)
    model.eval()
    merge_into_base(model)  # first: a family that cannot merge says so whatever its head reads
    pooling = getattr(model.config, "cotune_pooling", None)
    if pooling is not None:
        raise CotuneError(_POOLED.format(pooling=pooling))
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    if not str(spec).startswith("config:"):
        load_tokenizer(spec).save_pretrained(out)
    return out


def run(args: argparse.Namespace) -> int:
    out = export(args.adapter, args.out, args.model, args.config, args.kind, args.num_labels, args.overwrite)
    print(f"merged model saved to {out} (load it with transformers' AutoModel*.from_pretrained)")
    return 0
