"""ColA run names (``--control_name glue-sst2_roberta-base_sc_cola-lowrank-1_32``) as cotune configs.

Grammar (ColA's ``make.py``): ``<data>_<model>_<task>_<method>_<batch>[_col]`` where

* ``data``: ``glue-<name>`` (sst2, cola, mrpc, stsb, rte, wnli, qnli, mnli, qqp), ``fpb-sa``, ``gsm8k``, ``e2e``,
  ``mmlu``, ``alpaca``, ``fashion-mnist`` / ``fmnist`` (local folders under the data root), or ColA's
  ``dolly-15k``, ``wikisql``, ``samsum``, ``webnlg-2017``, ``dart``, ``MNIST``, ``CIFAR10`` (hub names, online);
* ``model``: a model name (``roberta-base``, ``gpt2``, ``minilm``, ``smollm2``, a local folder);
* ``task``: ``sc`` (sequence classification), ``clm`` (causal LM), ``s2s`` (seq2seq), ``ic`` (image
  classification), ``mc`` (multiple choice, a cotune extension);
* ``method``: ``full`` (every parameter trained), ``lora`` (backprop low rank), or ``cola-<aux>-<I>``:
  gradient learning with auxiliary family ``aux`` (``lowrank`` | ``linear`` | ``mlp``, several joined by
  ``~`` for a collaboration of users with different families) and update interval ``I``;
* ``batch``: the batch size; a trailing ``_col`` asks for ColA's collaborative merged mode.

``~`` combinations and ``_col`` describe several users sharing one base: they become a config with ``users``
(one adapter family per user) that ``cotune train`` runs as one collaboration through the tenant bank
(``cotune.training.collaboration``); ``_col`` also turns on ColA's collaborative merged mode.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from cotune.errors import CotuneError

GLUE = {
    "sst2": "SST-2",
    "cola": "CoLA",
    "mrpc": "MRPC",
    "stsb": "STS-B",
    "rte": "RTE",
    "wnli": "WNLI",
    "qnli": "QNLI",
    "mnli": "MNLI",
    "qqp": "QQP",
}
#: ColA data names -> cotune data names (found under ``data_root``, ``$COTUNE_DATA``, ``./data``, ``../shared/data``).
DATA = {
    **{f"glue-{k}": f"glue/{v}" for k, v in GLUE.items()},
    "fpb-sa": "fpb",
    "fpb": "fpb",
    "gsm8k": "gsm8k",
    "e2e": "e2e",
    "mmlu": "mmlu",
    "alpaca": "instruct/alpaca_en_demo.json",
    "fashion-mnist": "fashion-mnist",
    "fmnist": "fashion-mnist",
    "e2enlg": "e2e",
}
#: ColA data sets with no local copy here: the Hugging Face hub names (they load only when online).
HUB_DATA = {
    "dolly-15k": "databricks/databricks-dolly-15k",
    "wikisql": "wikisql",
    "samsum": "samsum",
    "webnlg-2017": "web_nlg",
    "dart": "dart",
    "MNIST": "mnist",
    "CIFAR10": "cifar10",
}
TASKS = {"sc": "seq_cls", "clm": "causal_lm", "s2s": "seq2seq", "ic": "image_cls", "mc": "multiple_choice"}
AUX = ("lowrank", "linear", "mlp")
#: ColA's low-rank auxiliary model: r = 8 with scale 1 (lora_alpha = r).
LOWRANK_DEFAULTS = {"r": 8, "lora_alpha": 8}


@dataclass(frozen=True)
class ControlName:
    """The fields of a ColA run name."""

    data: str
    model: str
    task: str
    method: str  # full | lora | cola
    aux: tuple[str, ...] = ()
    interval: int = 1
    batch_size: int = 32
    collaboration: bool = False

    @property
    def text(self) -> str:
        m = self.method if self.method != "cola" else f"cola-{'~'.join(self.aux)}-{self.interval}"
        return f"{self.data}_{self.model}_{self.task}_{m}_{self.batch_size}" + ("_col" if self.collaboration else "")


_METHOD = re.compile(r"^cola-(?P<aux>[a-z~]+)-(?P<i>\d+)$")


def parse_control_name(name: str) -> ControlName:
    """Split a ColA run name into its fields; every malformed part is named in the error."""
    parts = name.strip().split("_")
    col = False
    if parts and parts[-1] == "col":
        col, parts = True, parts[:-1]
    if len(parts) != 5:
        raise CotuneError(
            f"control name {name!r} has {len(parts)} '_'-separated fields; expected "
            "<data>_<model>_<task>_<method>_<batch>[_col], e.g. glue-sst2_roberta-base_sc_cola-lowrank-1_32"
        )
    data, model, task, method, batch = parts
    if data not in DATA and data not in HUB_DATA:
        known = ", ".join(sorted(DATA)) + "; online only: " + ", ".join(sorted(HUB_DATA))
        raise CotuneError(f"control name {name!r}: unknown data {data!r}; known: {known}")
    if task not in TASKS:
        raise CotuneError(f"control name {name!r}: unknown task {task!r}; known: {', '.join(TASKS)}")
    if not batch.isdigit() or int(batch) < 1:
        raise CotuneError(f"control name {name!r}: batch size {batch!r} is not a positive integer")
    aux: tuple[str, ...] = ()
    interval = 1
    if method in ("full", "lora"):
        kind = method
    else:
        m = _METHOD.match(method)
        if not m:
            raise CotuneError(
                f"control name {name!r}: unknown method {method!r}; expected full, lora or cola-<aux>-<I> "
                f"with aux in {'|'.join(AUX)} (several joined by '~') and I the update interval"
            )
        kind, aux, interval = "cola", tuple(m["aux"].split("~")), int(m["i"])
        bad = [a for a in aux if a not in AUX]
        if bad:
            raise CotuneError(f"control name {name!r}: unknown auxiliary model(s) {bad}; known: {', '.join(AUX)}")
        if interval < 1:
            raise CotuneError(f"control name {name!r}: the update interval must be >= 1")
    return ControlName(data, model, task, kind, aux, interval, int(batch), col)


def control_name_config(name: str | ControlName) -> dict[str, Any]:
    """The config dict (``TrainConfig`` layout) a ColA run name stands for; overrides apply on top."""
    cn = parse_control_name(name) if isinstance(name, str) else name
    if cn.collaboration and cn.method != "cola":
        raise CotuneError(f"control name {cn.text!r}: '_col' (collaboration) needs a cola-<aux>-<I> method")
    cfg: dict[str, Any] = {
        "model": cn.model,
        "task": {"kind": TASKS[cn.task], "data": DATA.get(cn.data) or HUB_DATA[cn.data]},
        "batch_size": cn.batch_size,
        "output_dir": f"runs/{cn.text}",
    }
    if cn.method == "full":
        # Full fine-tuning: every parameterised leaf module is trained in place ("all" is resolved by the trainer).
        cfg["method"] = {"name": "full", "options": {"target_modules": "all"}, "train_head": False}
        cfg["engine"] = {"name": "backprop"}
    elif cn.method == "lora":
        cfg["method"] = {"name": "lowrank", "options": dict(LOWRANK_DEFAULTS)}
        cfg["engine"] = {"name": "backprop"}
    else:
        aux = cn.aux[0]
        cfg["method"] = {"name": aux, "options": dict(LOWRANK_DEFAULTS) if aux == "lowrank" else {}}
        cfg["engine"] = {"name": "gl", "options": {"interval": cn.interval}}
        if len(cn.aux) > 1 or cn.collaboration:
            # Several users on one base (training.collaboration): one per auxiliary model; '_col' alone means
            # two users of the same family, in ColA's collaborative merged mode (W + mean_k ΔW_k).
            cfg["users"] = list(cn.aux) if len(cn.aux) > 1 else [aux, aux]
            if cn.collaboration:
                cfg["engine"]["options"]["merged"] = True
    return cfg
