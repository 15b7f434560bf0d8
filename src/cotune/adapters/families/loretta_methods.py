"""The LoRETTA method presets: ``loretta_adp`` and ``loretta_rep`` as the paper trains them.

* ``loretta_adp`` (``--tensor_layers=adapters,cls``): ``loretta_adp`` adapters + every LayerNorm / RMSNorm
  trained in place (``full``) + the classification head with its hidden×hidden dense tensorized.
* ``loretta_rep`` (``--tensor_layers=cls``): ``loretta_rep`` updates + the same head.

The head, where the model has one:

* RoBERTa-style (``classifier.dense`` + ``classifier.out_proj``) and DeBERTa-v2 (``pooler.dense`` +
  ``classifier``): the dense becomes a ``tt_linear`` (768: ``[12,8,8,8,8,12]``, 920 + 768 parameters) and the
  output projection is trained dense (``full``);
* BERT-style (``bert.pooler.dense`` + ``classifier``, e.g. MiniLM): the pooler is *pretrained*
  (next-sentence prediction), so replacing it by a fresh TT layer would throw that away; the pooler stays
  frozen and only ``classifier`` (hidden→labels) is trained (``full``);
* any other model: its known task head (``score`` for Llama/GPT-2 classifiers) is trained with ``full``;
  causal LMs get no head (their ``lm_head`` stays frozen), as in the Llama-2-7B count of 876,800.

Preset options besides the adapter family's fields: ``train_norms`` (default true for adp, false for rep)
and ``tensor_head`` (default true: tensorize the head's dense where there is one; false trains it dense).
``tt_rank`` and ``tt_mode`` also apply to the tensorized head.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from cotune.adapters.attach import _original_names, model_type
from cotune.adapters.base import AdapterConfig, make_config
from cotune.adapters.families.full import HEAD_DEFAULT_TARGETS
from cotune.adapters.methods import method

#: Every normalisation layer by name (LayerNorm, input_layernorm, post_attention_layernorm, the final
#: ``norm``; GPT-2's ln_1/ln_2/ln_f), as one full-match regex so the saved config stays short.
NORM_REGEX = r"(?i).*(norm|\.ln_\d+|\.ln_f)"


def _names(model: nn.Module | None) -> set[str]:
    return {n for n, _ in _original_names(model)} if model is not None else set()


def _has(names: set[str], suffix: str) -> bool:
    return any(n == suffix or n.endswith("." + suffix) for n in names)


def head_configs(model: nn.Module | None, tensorize: bool = True, **tt: Any) -> list[AdapterConfig]:
    """The trainable head of ``model`` for the LoRETTA presets (see the module docstring)."""
    names = _names(model)
    pairs = {
        "roberta": ("classifier.dense", "classifier.out_proj"),
        "deberta": ("pooler.dense", "classifier"),
        "deberta-v2": ("pooler.dense", "classifier"),
    }
    mt = model_type(model) if model is not None else ""
    if mt in pairs and all(_has(names, t) for t in pairs[mt]):
        dense, out = pairs[mt]
        first = make_config("tt_linear", target_modules=[dense], **tt) if tensorize else None
        if first is None:
            first = make_config("full", target_modules=[dense])
        return [first, make_config("full", target_modules=[out])]
    heads = HEAD_DEFAULT_TARGETS.get(mt, ["classifier", "score"])
    present = [t for t in heads if _has(names, t)]
    return [make_config("full", target_modules=present)] if present else []


def _split(overrides: dict[str, Any], train_norms: bool) -> tuple[bool, bool, dict[str, Any], dict[str, Any]]:
    train_norms = bool(overrides.pop("train_norms", train_norms))
    tensorize = bool(overrides.pop("tensor_head", True))
    tt = {k: overrides[k] for k in ("tt_rank", "tt_mode") if k in overrides}
    return train_norms, tensorize, overrides, tt


@method("loretta_adp")
def loretta_adp(model: nn.Module | None = None, **overrides: Any) -> list[AdapterConfig]:
    """TT bottleneck adapters + trainable norms + tensorized classifier (LoRETTA_adp)."""
    train_norms, tensorize, rest, tt = _split(dict(overrides), True)
    configs = [make_config("loretta_adp", **rest)]
    if train_norms:
        configs.append(make_config("full", target_modules=NORM_REGEX))
    return configs + head_configs(model, tensorize, **tt)


@method("loretta_rep")
def loretta_rep(model: nn.Module | None = None, **overrides: Any) -> list[AdapterConfig]:
    """TT-factored parallel updates of query/value + tensorized classifier (LoRETTA_rep)."""
    train_norms, tensorize, rest, tt = _split(dict(overrides), False)
    configs = [make_config("loretta_rep", **rest)]
    if train_norms:
        configs.append(make_config("full", target_modules=NORM_REGEX))
    return configs + head_configs(model, tensorize, **tt)
