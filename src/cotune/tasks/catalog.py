"""From a ``data=`` string to a :class:`DataSet`: local files and folders, known short names, hub names.

Resolution order for ``data``:

1. an existing local file or folder (any path), its format recognised from its name and content;
2. a known short name (``glue/SST-2``, ``sst2``, ``fpb``, ``gsm8k``, ``mmlu``, ``e2e``, ``alpaca``, ``c4``, ``wiki``,
   ``fashion-mnist``) or a relative path (``instruct/alpaca_en_demo.json``) looked up under the data roots:
   the ``data_root`` option, then ``$COTUNE_DATA`` (``os.pathsep``-separated), ``./data``, ``../shared/data``; a
   path through a folder named ``data`` (``../shared/data/glue/SST-2``) is also looked up there as its tail
   (``glue/SST-2``), so an example config keeps working away from the repository;
3. a Hugging Face hub name, ``owner/name`` or ``owner/name:config`` (a known short name not found locally falls
   back to its hub equivalent), loaded with ``datasets.load_dataset`` -- online only: with ``HF_HUB_OFFLINE=1``
   (or ``HF_DATASETS_OFFLINE=1``) this fails at once with a message naming the local alternative.

Splits. Published splits are used as they are (GLUE ``dev.tsv`` is ``validation``; labelled test files such as
SST-2's ``test_labeled.tsv``, MRPC's ``msr_paraphrase_test.txt`` and STS-B's ``test_labeled.tsv`` are ``test``).
Where a data set has no validation split, one is **carved deterministically** from its training rows:
``val_fraction`` (default 0.1) of them, chosen by ``random.Random(seed)`` (default seed 0), stratified by label
for classification, by subject for MMLU, and grouped by meaning representation for E2E (all references of one MR
land in the same split, so validation MRs are unseen in training). A single file with no published splits
(FPB ``all-data.csv``, MMLU ``mmlu_test.jsonl``, Alpaca, C4, wiki, or any one TSV/JSONL) is carved into
train / validation / test with ``val_fraction`` and ``test_fraction`` (default 0.1 each). E2E's folder here has
only ``valid.txt`` and ``test.txt``: ``valid.txt`` is the training source (validation carved from it) and
``test.txt`` is test. Fashion-MNIST's validation is carved from its 60,000 training images. Model selection
therefore always happens on validation, never on test.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cotune.errors import CotuneError
from cotune.tasks import formats as F
from cotune.tasks.dataset import DataSet, carve_missing
from cotune.tasks.formats import LabelSpec, Rows
from cotune.tasks.hub import from_hub, hub_offline

GLUE_TASKS: dict[str, dict[str, Any]] = {
    # task key: folder name as published, label values, hub config
    "cola": {"folder": "CoLA", "labels": ["0", "1"], "hub": "cola"},
    "sst2": {"folder": "SST-2", "labels": ["0", "1"], "hub": "sst2"},
    "mrpc": {"folder": "MRPC", "labels": ["0", "1"], "hub": "mrpc"},
    "stsb": {"folder": "STS-B", "labels": None, "hub": "stsb"},  # regression, scores 0-5
    "qqp": {"folder": "QQP", "labels": ["0", "1"], "hub": "qqp"},
    "mnli": {"folder": "MNLI", "labels": ["entailment", "neutral", "contradiction"], "hub": "mnli"},
    "qnli": {"folder": "QNLI", "labels": ["entailment", "not_entailment"], "hub": "qnli"},
    "rte": {"folder": "RTE", "labels": ["entailment", "not_entailment"], "hub": "rte"},
    "wnli": {"folder": "WNLI", "labels": ["0", "1"], "hub": "wnli"},
}
FPB_LABELS = ["negative", "neutral", "positive"]

#: short name -> (path under a data root, hub name, hub config)
KNOWN: dict[str, tuple[str, str, str | None]] = {
    **{f"glue-{k}": (f"glue/{v['folder']}", "nyu-mll/glue", v["hub"]) for k, v in GLUE_TASKS.items()},
    "fpb": ("fpb/all-data.csv", "takala/financial_phrasebank", "sentences_50agree"),
    "gsm8k": ("gsm8k", "openai/gsm8k", "main"),
    "mmlu": ("mmlu/mmlu_test.jsonl", "cais/mmlu", "all"),
    "e2e": ("e2e", "tuetschek/e2e_nlg", None),
    "alpaca": ("instruct/alpaca_en_demo.json", "tatsu-lab/alpaca", None),
    "c4": ("instruct/c4_demo.jsonl", "", None),  # demo excerpts: no hub fallback (the full corpora are huge)
    "wiki": ("instruct/wiki_demo.txt", "", None),
    "fashion-mnist": ("fashion-mnist", "zalando-datasets/fashion_mnist", None),
}
ALIASES = {
    **{k: f"glue-{k}" for k in GLUE_TASKS},
    **{f"glue/{v['folder'].lower()}": f"glue-{k}" for k, v in GLUE_TASKS.items()},
    **{v["folder"].lower(): f"glue-{k}" for k, v in GLUE_TASKS.items()},
    "sts-b": "glue-stsb",
    "financial_phrasebank": "fpb",
    "fashion_mnist": "fashion-mnist",
    "fmnist": "fashion-mnist",
    "e2e_nlg": "e2e",
}


# --------------------------------------------------------------------------------------------- resolution


def data_roots(data_root: str | os.PathLike | None = None) -> list[Path]:
    roots: list[Path] = []
    if data_root:
        roots.append(Path(data_root).expanduser())
    for p in os.environ.get("COTUNE_DATA", "").split(os.pathsep):
        if p:
            roots.append(Path(p).expanduser())
    roots += [Path("data"), Path("..") / "shared" / "data"]
    return roots


def resolve_data(data: str | os.PathLike, *, data_root: str | None = None, **opts: Any) -> DataSet:
    """The :class:`DataSet` for ``data`` (a path, a known short name, or a hub name); see the module docstring."""
    s = str(data)
    p = Path(s).expanduser()
    if p.exists():
        return from_path(p, **opts)
    key = ALIASES.get(s.lower().rstrip("/"), s.lower().rstrip("/"))
    roots = data_roots(data_root)
    rel = KNOWN[key][0] if key in KNOWN else s
    # A path that runs through a folder named ``data`` (``../shared/data/glue/SST-2``: an example config used away
    # from the repository) is also looked up as its tail (``glue/SST-2``) under the data roots.
    parts = Path(s).parts
    tails = [Path(*parts[i + 1 :]) for i, part in enumerate(parts[:-1]) if part == "data"]
    for root in roots:
        hit = next((root / t for t in [rel, *tails] if (root / t).exists()), None)
        if hit is not None:
            ds = from_path(hit, **opts)
            if key in KNOWN:
                ds.name = key
                ds.task = ds.task or key.removeprefix("glue-")
            return ds
    if s.startswith(("/", "./", "../", "~")) or Path(s).suffix in (".tsv", ".csv", ".json", ".jsonl", ".txt", ".gz"):
        raise CotuneError(
            f"data file or folder {s!r} does not exist (also looked under {', '.join(map(str, roots))}); "
            "set data_root=/path/to/data or point task.data at your copy"
        )
    if key in KNOWN:
        hub, config = KNOWN[key][1], KNOWN[key][2]
        local_hint = f"put the published files at <root>/{rel} under a data root ({', '.join(map(str, roots))})"
        if not hub:
            raise CotuneError(f"data {s!r} not found: {local_hint}")
    else:
        hub, _, config = s.partition(":")
        config = config or None
        local_hint = "give a local file or folder in a published format, or one of: " + ", ".join(
            ["glue/SST-2", "glue/CoLA", "fpb", "gsm8k", "mmlu", "e2e", "alpaca", "c4", "wiki", "fashion-mnist"]
        )
    if hub_offline():
        raise CotuneError(
            f"data {s!r} is not a local file or folder and HF_HUB_OFFLINE=1 forbids loading {hub!r} from the hub; "
            f"{local_hint}"
        )
    return from_hub(hub, config, name=key if key in KNOWN else s, **opts)


def from_path(p: Path, **opts: Any) -> DataSet:
    """A data set from a local file or folder in one of the published formats."""
    if p.is_dir():
        return _from_folder(p, **opts)
    return _from_file(p, **opts)


def _table_kwargs(opts: dict) -> dict:
    return {k: opts[k] for k in ("text_key", "text_pair_key", "label_key", "encoding") if opts.get(k)}


def _labelspec(task: str | None, opts: dict, default: list[str] | None = None) -> LabelSpec:
    if opts.get("labels"):
        return LabelSpec(names=[str(x) for x in opts["labels"]])
    if task == "stsb" or opts.get("regression"):
        return LabelSpec(regression=True)
    if task in GLUE_TASKS:
        return LabelSpec(names=GLUE_TASKS[task]["labels"])
    return LabelSpec(names=default)


def _glue_task(folder: Path) -> str | None:
    name = folder.name.lower().replace("-", "").replace("_", "")
    return name if name in GLUE_TASKS else None


def _from_folder(d: Path, **opts: Any) -> DataSet:
    files = {f.name: f for f in d.iterdir() if f.is_file()}
    idx = sorted(n for n in files if "idx3-ubyte" in n)
    if idx:
        return _idx_folder(d, files)
    if "train.tsv" in files or "dev.tsv" in files or "dev_matched.tsv" in files:
        return _glue_folder(d, files, **opts)
    if any(n in files for n in ("valid.txt", "train.txt")) and F.looks_like_e2e(files.get("valid.txt") or files["train.txt"]):
        return _e2e_folder(d, files)
    if "trainset.csv" in files:
        srcs = {"train": files["trainset.csv"], "validation": files.get("devset.csv"),
                "test": files.get("testset_w_refs.csv")}
        return DataSet("e2e", "qa", {s: (lambda ob, f=f: F.read_e2e_csv(f, ob)) for s, f in srcs.items() if f},
                       task="e2e", where=str(d), **carve_missing(srcs))
    recs = {s: files.get(f"{s}.jsonl") or files.get(f"{s}.json") for s in ("train", "validation", "test")}
    recs["validation"] = recs["validation"] or files.get("dev.jsonl") or files.get("valid.jsonl")
    if recs["train"]:
        shape, task, fmt = _records_kind(recs["train"])
        labels = _labelspec(task, opts) if shape == "cls" else None
        keys = _table_kwargs(opts)
        srcs = {s: (lambda ob, f=f: F.read_records(f, fmt, labels, keys, ob)) for s, f in recs.items() if f}
        ds = DataSet(task or d.name, shape, srcs, labels, task, where=str(d), **carve_missing(recs))
        return _infer_labels(ds, opts)
    data_files = [f for n, f in sorted(files.items()) if not n.startswith(".") and n.upper() not in ("README.MD", "LICENSE", "COPYRIGHT")]
    if len(data_files) == 1:
        return _from_file(data_files[0], **opts)
    raise CotuneError(
        f"{d}: cannot tell the format of this folder (files: {', '.join(sorted(files)) or 'none'}); expected GLUE "
        f"TSVs (train.tsv/dev.tsv), E2E (valid.txt/test.txt), JSONL splits (train.jsonl/test.jsonl), MNIST idx "
        f"files, or give one data file"
    )


def _glue_folder(d: Path, files: dict[str, Path], **opts: Any) -> DataSet:
    task = _glue_task(d)
    labels = _labelspec(task, opts)
    kw = _table_kwargs(opts)
    paths = {
        "train": files.get("train.tsv"),
        "validation": files.get("dev.tsv") or files.get("dev_matched.tsv"),
        "test": files.get("test_labeled.tsv") or files.get("msr_paraphrase_test.txt") or files.get("test.tsv"),
    }
    if paths["train"] is None:
        only = paths["validation"] or paths["test"]
        raise CotuneError(
            f"{d} has no train.tsv (only {', '.join(sorted(files))}); to train on what is there, give the one file, "
            f"e.g. data={only}, and train/validation/test are carved from it"
        )
    srcs = {s: (lambda ob, f=f: F.read_table(f, labels, on_bad_row=ob, **kw)) for s, f in paths.items() if f}
    ds = DataSet(f"glue-{task}" if task else d.name, "cls", srcs, labels, task, where=str(d))
    if paths["validation"] is None:
        ds.carve_from, ds.carve = "train", ("validation",)
    if paths["test"] is None:
        ds.unavailable["test"] = f"{d} has no test file"
    elif paths["test"].name == "test.tsv" and not _table_labelled(paths["test"], labels, kw):
        ds.unavailable["test"] = f"{paths['test']} has no labels (GLUE's test labels are not public); use validation"
    return _infer_labels(ds, opts)


def _table_labelled(path: Path, labels: LabelSpec, kw: dict) -> bool:
    head = F.read_text(path, kw.get("encoding")).split("\n", 1)[0].split("\t")
    if F._has_header(head):
        return F._pick_columns(head, kw.get("text_key"), kw.get("text_pair_key"), kw.get("label_key"))[2] is not None
    return F.headerless_layout(head) is not None


def _e2e_folder(d: Path, files: dict[str, Path]) -> DataSet:
    srcs = {"train": files.get("train.txt"), "validation": files.get("valid.txt"), "test": files.get("test.txt")}
    if srcs["train"] is None:  # the folder here: valid.txt is the training source, validation carved from it
        srcs["train"], srcs["validation"] = srcs["validation"], None
    readers = {s: (lambda ob, f=f: F.read_e2e(f, ob)) for s, f in srcs.items() if f}
    return DataSet("e2e", "qa", readers, task="e2e", where=str(d), **carve_missing(srcs))


def _idx_folder(d: Path, files: dict[str, Path]) -> DataSet:
    def pair(prefix: str) -> tuple[Path, Path] | None:
        im = next((f for n, f in sorted(files.items()) if n.startswith(prefix) and "images-idx3" in n), None)
        lb = next((f for n, f in sorted(files.items()) if n.startswith(prefix) and "labels-idx1" in n), None)
        return (im, lb) if im and lb else None

    tr, te = pair("train"), pair("t10k") or pair("test")
    if tr is None:
        raise CotuneError(f"{d}: expected train-images-idx3-ubyte[.gz] and train-labels-idx1-ubyte[.gz]")
    srcs = {"train": lambda ob: F.read_idx_pair(*tr)}
    if te:
        srcs["test"] = lambda ob: F.read_idx_pair(*te)
    name = d.name.lower().replace("_", "-")
    return DataSet(name, "image", srcs, task=name, carve_from="train",
                   carve=("validation",) if te else ("validation", "test"), where=str(d))


def _single(name: str, shape: str, read: Callable[[str], Rows], labels=None, task=None, where="") -> DataSet:
    return DataSet(name, shape, {"train": read}, labels, task, carve_from="train", carve=("validation", "test"),
                   where=where)


def _from_file(p: Path, **opts: Any) -> DataSet:
    name, suf = p.name.lower(), "".join(p.suffixes[-2:]).lower()
    kw = _table_kwargs(opts)
    if "idx3-ubyte" in name:
        lab = p.with_name(p.name.replace("images-idx3", "labels-idx1"))
        if not lab.exists():
            raise CotuneError(f"{p}: the matching labels file {lab.name} is not beside it")
        return _single(p.parent.name.lower(), "image", lambda ob: F.read_idx_pair(p, lab), where=str(p))
    if suf.endswith((".jsonl", ".json", ".jsonl.gz", ".json.gz")):
        shape, task, fmt = _records_kind(p)
        labels = _labelspec(task, opts) if shape == "cls" else None
        ds = _single(task or p.stem, shape, lambda ob: F.read_records(p, fmt, labels, kw, ob), labels, task, str(p))
        return _infer_labels(ds, opts)
    if suf.endswith(".tsv") or (suf.endswith(".txt") and F.read_text(p)[:200].lstrip().startswith("Quality\t")):
        task = _glue_task(p.parent)
        labels = _labelspec(task, opts)
        ds = _single(f"glue-{task}" if task else p.stem, "cls",
                     lambda ob: F.read_table(p, labels, on_bad_row=ob, **kw), labels, task, str(p))
        return _infer_labels(ds, opts)
    if suf.endswith(".csv"):
        head = F.read_text(p, kw.get("encoding"))[:100].split("\n", 1)[0].strip().lower()
        if head.startswith("mr,ref"):
            return _single("e2e", "qa", lambda ob: F.read_e2e_csv(p, ob), task="e2e", where=str(p))
        task = "fpb" if (p.parent.name.lower() == "fpb" or head in ("label,content", "sentiment,content")) else None
        labels = _labelspec(task, opts, FPB_LABELS if task == "fpb" else None)
        ds = _single(task or p.stem, "cls", lambda ob: F.read_table(p, labels, delimiter=",", on_bad_row=ob, **kw),
                     labels, task, str(p))
        return _infer_labels(ds, opts)
    if suf.endswith(".txt"):
        if F.looks_like_e2e(p):
            return _single("e2e", "qa", lambda ob: F.read_e2e(p, ob), task="e2e", where=str(p))
        if F.looks_like_fpb_txt(p):
            labels = _labelspec("fpb", opts, FPB_LABELS)
            return _single("fpb", "cls", lambda ob: F.read_fpb_txt(p, labels, kw.get("encoding"), ob), labels, "fpb",
                           str(p))
        return _single(p.stem, "qa", lambda ob: F.read_plain_text(p), task="text", where=str(p))
    raise CotuneError(
        f"{p}: unknown data file type {suf or '(none)'}; expected .tsv, .csv, .txt, .json, .jsonl or idx files"
    )


def _records_kind(p: Path) -> tuple[str, str | None, str]:
    """(shape, task, record format) of a JSON/JSONL file from its first object."""
    sink = F._Sink(p, "skip")
    it = F.iter_json_array(p, sink) if F._is_json_array(p) else F.iter_jsonl(p, sink)
    first = next(it, None)
    if first is None:
        raise CotuneError(f"{p}: no JSON objects found")
    fmt = F.record_format(set(first[1]))
    shape = {"alpaca": "qa", "gsm8k": "qa", "prompt": "qa", "e2e": "qa", "text": "qa", "mmlu": "mc",
             "mmlu_hf": "mc", "cls": "cls", "image": "image", "sharegpt": "qa", "messages": "qa"}[fmt]
    task = {"gsm8k": "gsm8k", "mmlu": "mmlu", "mmlu_hf": "mmlu", "alpaca": "alpaca", "text": "text",
            "e2e": "e2e", "sharegpt": "chat", "messages": "chat"}.get(fmt)
    return shape, task, fmt


def _infer_labels(ds: DataSet, opts: dict) -> DataSet:
    """For classification data with no known label list: the sorted distinct labels of the training source."""
    if ds.shape != "cls" or ds.labels is None or ds.labels.regression or ds.labels.names is not None:
        return ds
    src = ds.carve_from or "train"
    raw = ds.sources[src]("skip")  # names None -> raw label strings
    values = sorted({r["label"] for r in raw.rows if "label" in r}, key=lambda v: (not v.lstrip("-").isdigit(), int(v) if v.lstrip("-").isdigit() else 0, v))
    if not values:
        raise CotuneError(f"{raw.source}: no labels found; pass labels=[...] or label_key=")
    ds.labels.names = values  # the readers hold this same LabelSpec object
    ds._cache.clear()
    return ds
