"""The LoRETTA method presets: ``loretta_adp`` and ``loretta_rep`` as the paper trains them.

* ``loretta_adp`` (``--tensor_layers=adapters,cls``): ``loretta_adp`` adapters + every LayerNorm / RMSNorm
  trained in place (``full``) + the classification head with its hidden×hidden dense tensorized.
* ``loretta_rep`` (``--tensor_layers=cls``): ``loretta_rep`` updates + the same head.

The head, where the model has one:

* RoBERTa-style (``classifier.dense`` + ``classifier.out_proj``) and DeBERTa-v2 (``pooler.dense`` +
  ``classifier``): the dense becomes a ``tt_linear`` (768: ``[12,8,8,8,8,12]``, 920 + 768 parameters) and the
  output projection is trained dense (``full``);
* BERT-style (``bert.pooler.dense`` + ``classifier``, e.g. MiniLM, ALBERT): the pooler is *pretrained*
  (next-sentence prediction), so by default (``tensor_head: auto``) it stays frozen and only ``classifier``
  (hidden→labels) is trained (``full``); ``tensor_head: true`` (or ``tensor_layers`` naming ``cls``) replaces
  the pooler's dense by a fresh TT layer as on RoBERTa, which is what LoRETTA's scripts do on BERT/ALBERT;
* any other model: its known task head (``score`` for Llama/GPT-2 classifiers) is trained with ``full``;
  causal LMs get no head (their ``lm_head`` stays frozen), as in the Llama-2-7B count of 876,800.

Preset options besides the adapter family's fields:

* ``train_norms`` (default true for adp, false for rep);
* ``tensor_head``: ``auto`` (default: tensorize a fresh head dense, keep a pretrained pooler), ``true``
  (tensorize the head's hidden×hidden dense on any encoder that has one), ``false`` (train it dense);
* ``tensor_layers``: LoRETTA's flag as its scripts write it (``adapters,cls`` for loretta_adp, ``cls`` for
  loretta_rep; ``None``): ``cls`` in it means ``tensor_head: true``, its absence ``tensor_head: false``.

``tt_rank`` and ``tt_mode`` also apply to the tensorized head.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from cotune.adapters.base import AdapterConfig, method
from cotune.adapters.families.full import HEAD_DEFAULT_TARGETS, FullConfig
from cotune.adapters.families.loretta import LorettaAdpConfig, LorettaRepConfig, TTLinearConfig
from cotune.adapters.naming import model_type, original_names
from cotune.errors import CotuneError

#: Every normalisation layer by name (LayerNorm, input_layernorm, post_attention_layernorm, the final
#: ``norm``; GPT-2's ln_1/ln_2/ln_f), as one full-match regex so the saved config stays short.
NORM_REGEX = r"(?i).*(norm|\.ln_\d+|\.ln_f)"


def _names(model: nn.Module | None) -> set[str]:
    return {n for n, _ in original_names(model)} if model is not None else set()


def _has(names: set[str], suffix: str) -> bool:
    return any(n == suffix or n.endswith("." + suffix) for n in names)


#: (hidden×hidden dense, output projection) of an encoder's classification head, by layout.
FRESH_HEADS = {
    "roberta": ("classifier.dense", "classifier.out_proj"),
    "deberta": ("pooler.dense", "classifier"),
    "deberta-v2": ("pooler.dense", "classifier"),
}
#: Heads whose dense is pretrained (BERT's next-sentence pooler): tensorized only when asked (``tensor_head: true``).
PRETRAINED_HEADS = [("classifier.dense", "classifier.out_proj"), ("pooler.dense", "classifier")]


def head_configs(model: nn.Module | None, tensorize: bool | str = "auto", **tt: Any) -> list[AdapterConfig]:
    """The trainable head of ``model`` for the LoRETTA presets (see the module docstring)."""
    names = _names(model)
    mt = model_type(model) if model is not None else ""
    pair = FRESH_HEADS.get(mt) if tensorize in ("auto", True) else None
    if tensorize is True and not (pair and all(_has(names, t) for t in pair)):
        # Any other encoder: the first layout it has (BERT, ALBERT, MiniLM: pooler.dense + classifier).
        pair = next((p for p in PRETRAINED_HEADS if all(_has(names, t) for t in p)), None)
        if pair is None and model is not None:
            pooled = getattr(getattr(model, "config", None), "cotune_pooling", None)
            hint = (f": its head reads the checkpoint's {pooled!r} pooling, which has no dense; train with "
                    "task.options.pooling=model for BERT's pooler.dense" if pooled else "")
            raise CotuneError("tensor_head: true (tensor_layers naming cls) tensorizes the head's hidden×hidden dense "
                              "(RoBERTa's classifier.dense, BERT's pooler.dense), and this model's head has none" + hint)
    if pair is None and tensorize is False:
        pair = FRESH_HEADS.get(mt)
    if pair is not None and all(_has(names, t) for t in pair):
        dense, out = pair
        first = TTLinearConfig.from_dict({"target_modules": [dense], **tt}, strict=True) if tensorize is not False else None
        if first is None:
            first = FullConfig.from_dict({"target_modules": [dense]}, strict=True)
        return [first, FullConfig.from_dict({"target_modules": [out]}, strict=True)]
    heads = HEAD_DEFAULT_TARGETS.get(mt, ["classifier", "score"])
    present = [t for t in heads if _has(names, t)]
    return [FullConfig.from_dict({"target_modules": present}, strict=True)] if present else []


def _tensor_head(value: Any) -> bool | str:
    """``tensor_head`` as auto | True | False (YAML may give a bool, 0/1 or a string)."""
    text = str(value).strip().lower()
    if text == "auto":
        return "auto"
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no"):
        return False
    raise CotuneError(f"tensor_head must be auto, true or false, got {value!r}")


def _tensor_layers(value: Any, allowed: set[str]) -> bool:
    """Whether LoRETTA's ``--tensor_layers`` value (``adapters,cls``; a list; ``None``) names the head."""
    if value is None or str(value).strip().lower() in ("", "none"):
        layers: set[str] = set()
    else:
        items = value if isinstance(value, list | tuple) else str(value).split(",")
        layers = {str(x).strip().lower() for x in items if str(x).strip()}
    bad = sorted(layers - allowed - {"cls"})
    if bad:
        raise CotuneError(f"tensor_layers {bad} not understood here; valid: {sorted(allowed | {'cls'})} or None")
    return "cls" in layers


def _split(
    overrides: dict[str, Any], train_norms: bool, layers: set[str]
) -> tuple[bool, bool | str, dict[str, Any], dict[str, Any]]:
    train_norms = bool(overrides.pop("train_norms", train_norms))
    tensorize = _tensor_head(overrides.pop("tensor_head", "auto"))
    if "tensor_layers" in overrides:
        from_flag = _tensor_layers(overrides.pop("tensor_layers"), layers)
        if tensorize != "auto" and tensorize != from_flag:
            raise CotuneError(f"tensor_layers says tensor_head={from_flag}, but tensor_head={tensorize} was given")
        tensorize = from_flag
    tt = {k: overrides[k] for k in ("tt_rank", "tt_mode") if k in overrides}
    return train_norms, tensorize, overrides, tt


@method("loretta_adp", family="loretta_adp")
def loretta_adp(model: nn.Module | None = None, **overrides: Any) -> list[AdapterConfig]:
    """TT bottleneck adapters + trainable norms + tensorized classifier (LoRETTA_adp)."""
    train_norms, tensorize, rest, tt = _split(dict(overrides), True, {"adapters"})
    configs = [LorettaAdpConfig.from_dict(rest, strict=True)]
    if train_norms:
        configs.append(FullConfig.from_dict({"target_modules": NORM_REGEX}, strict=True))
    return configs + head_configs(model, tensorize, **tt)


@method("loretta_rep", family="loretta_rep")
def loretta_rep(model: nn.Module | None = None, **overrides: Any) -> list[AdapterConfig]:
    """TT-factored parallel updates of query/value + tensorized classifier (LoRETTA_rep)."""
    train_norms, tensorize, rest, tt = _split(dict(overrides), False, set())
    configs = [LorettaRepConfig.from_dict(rest, strict=True)]
    if train_norms:
        configs.append(FullConfig.from_dict({"target_modules": NORM_REGEX}, strict=True))
    return configs + head_configs(model, tensorize, **tt)
