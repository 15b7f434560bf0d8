"""Readers for the published formats of the data sets cotune knows, from any local path.

Every reader returns *native rows* of one of four shapes, so that the task types only map shapes:

* ``cls``: ``{"text": str, "text_pair": str | None, "label": int | float}`` (GLUE TSVs, FPB CSV/txt, JSON rows
  with a text and a label); ``label`` is an index into the data set's label list, or a float for regression;
* ``qa``: ``{"prompt": str, "answer": str, "final": str | None}`` (Alpaca JSON, GSM8K JSONL, E2E lines, plain text
  corpora with an empty prompt); ``final`` is GSM8K's number after ``#### ``; conversations (ShareGPT
  ``conversations`` of ``{"from", "value"}``, OpenAI ``messages`` of ``{"role", "content"}``) also carry
  ``messages``, the whole dialogue as ``[{"role": system|user|assistant, "content": str}]``, with ``prompt`` /
  ``answer`` its last user and assistant turns;
* ``mc``: ``{"question": str, "choices": [str, ...], "label": int, "subject": str}`` (MMLU JSONL);
* ``image``: ``{"image": uint8 array (H, W), "label": int}`` (MNIST-format idx files).

A malformed row (wrong column count, missing or unknown label, bad JSON, missing key) raises a
:class:`CotuneError` naming the file and line, or, with ``on_bad_row="skip"``, is skipped and counted.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import math
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cotune.errors import CotuneError

ON_BAD_ROW = ("error", "skip")


@dataclass
class Rows:
    """Rows read from one file plus what the reader learned about it."""

    rows: list[dict[str, Any]]
    source: str
    skipped: int = 0
    labelled: bool = True  # False for unlabelled test files (GLUE test.tsv)
    info: dict[str, Any] = field(default_factory=dict)


class _Sink:
    """Collects rows; a bad row either raises (file + line in the message) or is counted."""

    def __init__(self, source: Path | str, on_bad_row: str = "error"):
        if on_bad_row not in ON_BAD_ROW:
            raise CotuneError(f"on_bad_row must be one of {ON_BAD_ROW}, not {on_bad_row!r}")
        self.source = str(source)
        self.on_bad_row = on_bad_row
        self.rows: list[dict[str, Any]] = []
        self.skipped = 0

    def bad(self, line: int | str, msg: str) -> None:
        where = f"line {line}" if isinstance(line, int) else line
        if self.on_bad_row == "skip":
            self.skipped += 1
            return
        raise CotuneError(f"{self.source}, {where}: {msg} (pass on_bad_row='skip' to skip and count such rows)")

    def result(self, **kw: Any) -> Rows:
        return Rows(self.rows, self.source, self.skipped, **kw)


# --------------------------------------------------------------------------------------------- text and lines


def read_text(path: Path, encoding: str | None = None) -> str:
    """The file's text: UTF-8 (a BOM is dropped, as in MRPC's files), else Latin-1.

    The Financial PhraseBank's ``all-data.csv`` is not UTF-8 (a few Latin-1 bytes such as ``0xD1``), which is why
    the fallback exists; Latin-1 decodes any byte, and for this file it agrees with cp1252. ``encoding`` forces one.
    """
    data = path.read_bytes()
    if path.suffix == ".gz":
        data = gzip.decompress(data)
    if encoding:
        return data.decode(encoding)
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def numbered_lines(text: str) -> Iterator[tuple[int, str]]:
    """(1-based line number, line) for non-blank lines; splits on ``\\n`` only (``str.splitlines`` would also
    split on form feeds and Unicode separators inside sentences) and drops a trailing ``\\r`` (CRLF files)."""
    for i, line in enumerate(text.split("\n"), start=1):
        line = line.removesuffix("\r")
        if line.strip():
            yield i, line


# --------------------------------------------------------------------------------------------- classification tables

#: (text column, pair column) pairs recognised in headers, most specific first (case-insensitive).
TEXT_COLUMNS: list[tuple[str, str | None]] = [
    ("sentence1", "sentence2"),
    ("question1", "question2"),
    ("#1 string", "#2 string"),
    ("question", "sentence"),
    ("premise", "hypothesis"),
    ("sentence", None),
    ("text", None),
    ("content", None),
]
LABEL_COLUMNS = ["label", "quality", "score", "gold_label", "is_duplicate", "labels", "sentiment"]


@dataclass
class LabelSpec:
    """How a label value becomes the row's label: an index into ``names``, or a float when ``regression``."""

    names: list[str] | None = None
    regression: bool = False

    def parse(self, value: Any) -> int | float:
        if value is None or (isinstance(value, str) and not value.strip()):
            raise ValueError("missing label")
        if self.regression:
            x = float(value)
            if not math.isfinite(x):
                raise ValueError(f"label {value!r} is not a finite number")
            return x
        if isinstance(value, bool):
            value = int(value)
        key = str(value).strip()
        if self.names is None:  # label list not known yet: the catalog collects raw values from the train file
            return key  # type: ignore[return-value]
        if key in self.names:
            return self.names.index(key)
        if isinstance(value, int) and 0 <= value < len(self.names):  # hub ClassLabel ids
            return value
        raise ValueError(f"unknown label {key!r}; expected one of {self.names}")


def _pick_columns(header: list[str], text_key: str | None, pair_key: str | None, label_key: str | None):
    low = [h.strip().lower() for h in header]

    def col(name: str) -> int:
        if name.lower() not in low:
            raise CotuneError(f"column {name!r} not in the header {header}")
        return low.index(name.lower())

    if text_key:
        t, p = col(text_key), (col(pair_key) if pair_key else None)
    else:
        for a, b in TEXT_COLUMNS:
            if a in low and (b is None or b in low):
                t, p = low.index(a), (low.index(b) if b else None)
                break
        else:
            raise CotuneError(f"no text column recognised in the header {header}; pass text_key= (and text_pair_key=)")
    if label_key:
        lab = col(label_key)
    else:
        lab = next((low.index(n) for n in LABEL_COLUMNS if n in low), None)
    return t, p, lab


def _has_header(first: list[str]) -> bool:
    low = {c.strip().lower() for c in first}
    names = {a for a, _ in TEXT_COLUMNS} | {b for _, b in TEXT_COLUMNS if b} | set(LABEL_COLUMNS) | {"index"}
    return bool(low & names)


def _is_float(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def headerless_layout(first: list[str]) -> tuple[int, int | None, int, tuple[int, ...]] | None:
    """(text, pair, label, allowed column counts) of the header-less published layouts, from a first row.

    * CoLA train/dev: ``source, label, orig-label, sentence`` (label 0/1 in column 2);
    * STS-B ``test_labeled.tsv``: ``genre, file, year, old_index, score, sentence1, sentence2[, src1, src2]``;
    * FPB without header (the Kaggle original): ``label,content``.
    """
    if len(first) == 4 and first[1] in ("0", "1"):
        return 3, None, 1, (4,)
    if len(first) in (7, 9) and _is_float(first[4]) and not _is_float(first[5]):
        return 5, 6, 4, (7, 9)  # the two optional trailing columns are the sentences' sources
    if len(first) == 2 and first[0].strip().lower() in ("positive", "negative", "neutral"):
        return 1, None, 0, (2,)
    return None


def read_table(
    path: Path,
    labels: LabelSpec,
    *,
    delimiter: str = "\t",
    text_key: str | None = None,
    text_pair_key: str | None = None,
    label_key: str | None = None,
    encoding: str | None = None,
    on_bad_row: str = "error",
) -> Rows:
    """A GLUE-style TSV (quotes are literal text: ``QUOTE_NONE``) or a CSV (quoted fields) of text(s) + label.

    The header, when there is one, names the columns (see ``TEXT_COLUMNS`` / ``LABEL_COLUMNS``); CoLA's and
    STS-B ``test_labeled``'s header-less layouts are recognised by shape. A file without a label column
    (GLUE's unlabelled ``test.tsv``) comes back with ``labelled=False`` and rows without labels.
    """
    sink = _Sink(path, on_bad_row)
    text = read_text(path, encoding)
    if delimiter == "\t":
        records = ((n, line.split("\t")) for n, line in numbered_lines(text))
    else:
        reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
        records = ((reader.line_num, row) for row in reader if any(c.strip() for c in row))
    first_n, first = next(records, (0, None))
    if first is None:
        raise CotuneError(f"{path} is empty")
    forced = text_key is not None
    if _has_header(first):
        t, p, lab = _pick_columns(first, text_key, text_pair_key, label_key)
        allowed: tuple[int, ...] = (len(first),)
        pending: list[tuple[int, list[str]]] = []
    else:
        layout = None if forced else headerless_layout(first)
        if layout is None:
            raise CotuneError(
                f"{path}, line {first_n}: no header and not a known header-less layout (CoLA, STS-B test_labeled, "
                f"FPB); add a header line naming the text and label columns, or pass text_key=/label_key="
            )
        t, p, lab, allowed = layout
        pending = [(first_n, first)]
    labelled = lab is not None
    sep_name = "tab" if delimiter == "\t" else repr(delimiter)
    for n, cols in _chain(pending, records):
        if len(cols) not in allowed:
            want = " or ".join(map(str, allowed))
            sink.bad(n, f"expected {want} {sep_name}-separated columns, found {len(cols)}")
            continue
        row: dict[str, Any] = {"text": cols[t], "text_pair": cols[p] if p is not None else None}
        if not row["text"].strip():
            sink.bad(n, "empty text")
            continue
        if labelled:
            try:
                row["label"] = labels.parse(cols[lab])
            except ValueError as e:
                sink.bad(n, str(e))
                continue
        sink.rows.append(row)
    return sink.result(labelled=labelled)


def _chain(first: list, rest: Iterator) -> Iterator:
    yield from first
    yield from rest


def read_fpb_txt(path: Path, labels: LabelSpec, encoding: str | None = None, on_bad_row: str = "error") -> Rows:
    """FPB's original distribution (``Sentences_50Agree.txt``): ``sentence@label`` per line, Latin-1."""
    sink = _Sink(path, on_bad_row)
    for n, line in numbered_lines(read_text(path, encoding)):
        sent, sep, lab = line.rpartition("@")
        if not sep or not sent.strip():
            sink.bad(n, "expected 'sentence@label'")
            continue
        try:
            sink.rows.append({"text": sent, "text_pair": None, "label": labels.parse(lab)})
        except ValueError as e:
            sink.bad(n, str(e))
    return sink.result()


# --------------------------------------------------------------------------------------------- JSON and JSONL


def iter_jsonl(path: Path, sink: _Sink) -> Iterator[tuple[int, dict]]:
    """(line, object) per JSON line; bad JSON or a non-object line is a bad row."""
    for n, line in numbered_lines(read_text(path)):
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            sink.bad(n, f"bad JSON ({e.msg} at column {e.colno})")
            continue
        if not isinstance(obj, dict):
            sink.bad(n, f"expected a JSON object, got {type(obj).__name__}")
            continue
        yield n, obj


def iter_json_array(path: Path, sink: _Sink) -> Iterator[tuple[int, dict]]:
    """(line where the item starts, object) per item of a top-level JSON array (Alpaca format).

    Items are decoded one by one with ``raw_decode`` so that a bad item's message can name its line. A syntax
    error inside the array cannot be skipped safely (the rest of the file is unparseable), so it always raises.
    """
    text = read_text(path)
    dec = json.JSONDecoder()
    i = _skip_ws(text, 0)
    if i >= len(text) or text[i] != "[":
        raise CotuneError(f"{path}: expected a JSON array of objects (Alpaca format: instruction/input/output)")
    i = _skip_ws(text, i + 1)
    if i < len(text) and text[i] == "]":
        return
    while True:
        line = text.count("\n", 0, i) + 1
        try:
            obj, i = dec.raw_decode(text, i)
        except json.JSONDecodeError as e:
            raise CotuneError(f"{path}, line {e.lineno}: bad JSON ({e.msg} at column {e.colno})") from None
        if isinstance(obj, dict):
            yield line, obj
        else:
            sink.bad(line, f"expected a JSON object, got {type(obj).__name__}")
        i = _skip_ws(text, i)
        if i < len(text) and text[i] == ",":
            i = _skip_ws(text, i + 1)
            continue
        if i < len(text) and text[i] == "]":
            return
        raise CotuneError(f"{path}, line {text.count(chr(10), 0, i) + 1}: bad JSON (expected ',' or ']')")


def _skip_ws(text: str, i: int) -> int:
    while i < len(text) and text[i] in " \t\r\n":
        i += 1
    return i


def record_format(keys: set[str]) -> str:
    """Which native shape a JSON object's keys describe (used for JSON/JSONL files and hub rows)."""
    if {"instruction", "output"} <= keys:
        return "alpaca"
    if {"question", "answer_a", "answer_b", "correct_answer"} <= keys:
        return "mmlu"
    if {"question", "choices", "answer"} <= keys:
        return "mmlu_hf"
    if {"question", "answer"} <= keys:
        return "gsm8k"
    if {"meaning_representation", "human_reference"} <= keys:
        return "e2e"
    if "conversations" in keys:
        return "sharegpt"
    if "messages" in keys:
        return "messages"
    if {"prompt"} <= keys and keys & {"completion", "response", "answer"}:
        return "prompt"
    if {"image", "label"} <= keys or {"img", "label"} <= keys:
        return "image"
    if any(a in keys for a, _ in TEXT_COLUMNS) and keys & set(LABEL_COLUMNS):
        return "cls"
    if "text" in keys:
        return "text"
    raise CotuneError(
        f"unrecognised record keys {sorted(keys)}; expected Alpaca (instruction/input/output), GSM8K "
        f"(question/answer), MMLU (question/answer_a..d/correct_answer/topic), prompt/completion, ShareGPT "
        f"(conversations), OpenAI messages, text, or a text column plus a label"
    )


#: ShareGPT's speaker tags (LLaMA-Factory's ``from`` values) and OpenAI's roles -> the chat template's roles.
CHAT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
#: Per format: (key of the turn list, key of a turn's speaker, key of its text).
CHAT_KEYS = {"sharegpt": ("conversations", "from", "value"), "messages": ("messages", "role", "content")}


def chat_row(fmt: str, obj: dict) -> dict:
    """A ShareGPT or OpenAI-messages object -> a ``qa`` row with ``messages`` (see the module docstring).

    Raises ``ValueError`` naming the turn for a turn without a speaker or text, an unknown speaker, an empty
    assistant turn, or a dialogue that does not end with an assistant turn (nothing to learn from).
    """
    list_key, who_key, text_key = CHAT_KEYS[fmt]
    turns = obj[list_key]
    if not isinstance(turns, list) or not turns:
        raise ValueError(f"{list_key!r} must be a non-empty list of turns")
    if fmt == "sharegpt" and isinstance(obj.get("system"), str) and obj["system"].strip():
        turns = [{who_key: "system", text_key: obj["system"]}, *turns]  # LLaMA-Factory's separate system column
    messages = []
    for i, turn in enumerate(turns, 1):
        if not isinstance(turn, dict) or who_key not in turn:
            raise ValueError(f"turn {i} of {list_key!r} has no {who_key!r}")
        who = str(turn[who_key]).strip().lower()
        if who not in CHAT_ROLES:
            raise ValueError(f"turn {i}: unknown {who_key} {turn[who_key]!r}; valid: {', '.join(CHAT_ROLES)}")
        content = turn.get(text_key)
        if isinstance(content, list):  # OpenAI content parts: keep the text ones
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
        if not isinstance(content, str):
            raise ValueError(f"turn {i} ({who}) has no {text_key!r} string")
        role = CHAT_ROLES[who]
        if role == "assistant" and not content.strip():
            raise ValueError(f"turn {i}: empty assistant turn")
        messages.append({"role": role, "content": content})
    if messages[-1]["role"] != "assistant":
        raise ValueError(f"the last turn ({messages[-1]['role']}) is not an assistant turn: nothing to learn")
    users = [m["content"] for m in messages if m["role"] == "user"]
    return {"prompt": users[-1] if users else "", "answer": messages[-1]["content"], "final": None,
            "messages": messages}


GSM8K_SEP = "#### "
MMLU_LETTERS = "ABCD"


def gsm8k_final(answer: str) -> str | None:
    """GSM8K's final answer: the text after the last ``#### `` with thousands separators removed."""
    if GSM8K_SEP not in answer:
        return None
    return answer.rsplit(GSM8K_SEP, 1)[1].strip().replace(",", "")


def convert_record(fmt: str, obj: dict, labels: LabelSpec | None = None, keys: dict | None = None) -> dict:
    """One JSON object -> one native row; raises ``KeyError``/``ValueError`` with a short reason when malformed."""
    keys = keys or {}

    def text(k: str, allow_empty: bool = False) -> str:
        if k not in obj:
            raise KeyError(f"missing key {k!r}")
        v = obj[k]
        if not isinstance(v, str):
            raise ValueError(f"{k!r} must be a string, got {type(v).__name__}")
        if not allow_empty and not v.strip():
            raise ValueError(f"empty {k!r}")
        return v

    if fmt == "alpaca":
        ins, inp, out = text("instruction"), obj.get("input") or "", text("output")
        if not isinstance(inp, str):
            raise ValueError("'input' must be a string")
        prompt = f"{ins}\n\n{inp}" if inp.strip() else ins
        return {"prompt": prompt, "answer": out, "final": None, "instruction": ins, "input": inp}
    if fmt == "gsm8k":
        q, a = text("question"), text("answer")
        final = gsm8k_final(a)
        if final is None:
            raise ValueError(f"answer has no final '{GSM8K_SEP.strip()} N' line")
        return {"prompt": q, "answer": a, "final": final}
    if fmt == "prompt":
        ak = next(k for k in ("completion", "response", "answer") if k in obj)
        return {"prompt": text("prompt"), "answer": text(ak), "final": None}
    if fmt in CHAT_KEYS:
        return chat_row(fmt, obj)
    if fmt == "e2e":
        return {"prompt": text("meaning_representation"), "answer": text("human_reference"), "final": None}
    if fmt == "text":
        return {"prompt": "", "answer": text(keys.get("text_key") or "text"), "final": None}
    if fmt == "mmlu":
        ans = text("correct_answer").strip()
        if ans not in MMLU_LETTERS:
            raise ValueError(f"correct_answer {ans!r} is not one of A, B, C, D")
        choices = [text(f"answer_{c.lower()}", allow_empty=True) for c in MMLU_LETTERS]
        return {"question": text("question"), "choices": choices, "label": MMLU_LETTERS.index(ans),
                "subject": text("topic")}
    if fmt == "mmlu_hf":
        ch = obj["choices"]
        if not isinstance(ch, list) or len(ch) < 2:
            raise ValueError("'choices' must be a list of at least 2 strings")
        lab = obj["answer"]
        lab = MMLU_LETTERS.index(lab) if isinstance(lab, str) and lab in MMLU_LETTERS else int(lab)
        if not 0 <= lab < len(ch):
            raise ValueError(f"answer {lab} out of range for {len(ch)} choices")
        return {"question": text("question"), "choices": [str(c) for c in ch], "label": lab,
                "subject": str(obj.get("subject", ""))}
    if fmt == "cls":
        t, p, lab = _pick_columns(list(obj), keys.get("text_key"), keys.get("text_pair_key"), keys.get("label_key"))
        names = list(obj)
        if lab is None:
            raise KeyError("no label key")
        value = obj[names[lab]]
        if labels is None:
            raise ValueError("no label list")
        return {"text": text(names[t]), "text_pair": text(names[p]) if p is not None else None,
                "label": labels.parse(value)}
    if fmt == "image":
        img = np.asarray(obj.get("image", obj.get("img")))
        return {"image": img.astype(np.uint8), "label": int(obj["label"])}
    raise CotuneError(f"unknown record format {fmt!r}")


# MMLU's published JSONL repeats its header line ("question", "answer_a", ..., correct_answer "answer") twice
# inside the data (once for elementary and once for college mathematics): those two rows are artefacts, not
# questions, and are dropped without being counted as bad rows.
def is_mmlu_header_row(obj: dict) -> bool:
    return obj.get("correct_answer") == "answer" and obj.get("question") == "question"


def read_records(
    path: Path,
    fmt: str | None = None,
    labels: LabelSpec | None = None,
    keys: dict | None = None,
    on_bad_row: str = "error",
    max_rows: int | None = None,
) -> Rows:
    """JSONL (one object a line) or a JSON array (Alpaca), each object converted to a native row."""
    sink = _Sink(path, on_bad_row)
    it = iter_json_array(path, sink) if _is_json_array(path) else iter_jsonl(path, sink)
    dropped = 0
    for n, obj in it:
        if fmt is None:
            fmt = record_format(set(obj))
        if fmt == "mmlu" and is_mmlu_header_row(obj):
            dropped += 1
            continue
        try:
            sink.rows.append(convert_record(fmt, obj, labels, keys))
        except (KeyError, ValueError, TypeError) as e:
            sink.bad(n, e.args[0] if e.args else str(e))
        if max_rows is not None and len(sink.rows) >= max_rows:
            break
    return sink.result(info={"format": fmt, "dropped_header_rows": dropped})


def _is_json_array(path: Path) -> bool:
    with (gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")) as f:
        head = f.read(64).lstrip(b"\xef\xbb\xbf \t\r\n")
    return head.startswith(b"[")


# --------------------------------------------------------------------------------------------- E2E and plain text


def read_e2e(path: Path, on_bad_row: str = "error") -> Rows:
    """E2E NLG in the line format ``name : X | area : Y ||reference`` (as used by the LoRA/GPT-2 NLG code).

    The meaning representation (MR) becomes the prompt with the space before ``||`` stripped; the reference is the
    answer with its trailing space stripped (the files tokenise punctuation, ``"centre . "``, and keep it).
    """
    sink = _Sink(path, on_bad_row)
    for n, line in numbered_lines(read_text(path)):
        mr, sep, ref = line.partition("||")
        if not sep or not mr.strip() or not ref.strip():
            sink.bad(n, "expected 'attribute : value | ... ||reference'")
            continue
        if " : " not in mr:
            sink.bad(n, "the meaning representation has no 'attribute : value' pair")
            continue
        sink.rows.append({"prompt": mr.strip(), "answer": ref.strip(), "final": None})
    return sink.result()


def read_e2e_csv(path: Path, on_bad_row: str = "error") -> Rows:
    """The official E2E CSV release (``trainset.csv``: columns ``mr,ref``)."""
    sink = _Sink(path, on_bad_row)
    reader = csv.reader(io.StringIO(read_text(path), newline=""))
    header = [h.strip().lower() for h in next(reader, [])]
    if header[:2] != ["mr", "ref"]:
        raise CotuneError(f"{path}: expected an E2E CSV with header 'mr,ref', got {header}")
    for row in reader:
        if len(row) != 2 or not row[0].strip() or not row[1].strip():
            sink.bad(reader.line_num, "expected 2 non-empty columns mr,ref")
            continue
        sink.rows.append({"prompt": row[0].strip(), "answer": row[1].strip(), "final": None})
    return sink.result()


def read_plain_text(path: Path) -> Rows:
    """A plain text corpus (``wiki_demo.txt``): one document per non-blank line, for language modelling."""
    rows = [{"prompt": "", "answer": line.strip(), "final": None} for _, line in numbered_lines(read_text(path))]
    return Rows(rows, str(path))


def looks_like_e2e(path: Path) -> bool:
    for _, line in numbered_lines(read_text(path)[:4096]):
        return "||" in line and " : " in line.partition("||")[0]
    return False


def looks_like_fpb_txt(path: Path) -> bool:
    for _, line in numbered_lines(read_text(path)[:4096]):
        return bool(re.search(r"@(positive|negative|neutral)\s*$", line))
    return False


# --------------------------------------------------------------------------------------------- MNIST-format idx

IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: Path) -> np.ndarray:
    """An idx file (MNIST / Fashion-MNIST, optionally gzipped): magic ``0 0 type ndim``, big-endian int32 dims."""
    data = path.read_bytes()
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in IDX_DTYPES:
        raise CotuneError(f"{path}: not an idx file (bad magic number {data[:4].hex()})")
    ndim = data[3]
    dims = struct.unpack(f">{ndim}i", data[4 : 4 + 4 * ndim])
    dtype = np.dtype(IDX_DTYPES[data[2]])
    body = data[4 + 4 * ndim :]
    need = math.prod(dims) * dtype.itemsize
    if len(body) != need:
        raise CotuneError(f"{path}: idx header says {dims} ({need} bytes) but the file has {len(body)} bytes of data")
    return np.frombuffer(body, dtype=dtype).reshape(dims)


def read_idx_pair(images: Path, labels: Path) -> Rows:
    """Rows ``{"image": (H, W) uint8 view, "label": int}`` from an images idx3 and a labels idx1 file."""
    x, y = read_idx(images), read_idx(labels)
    if x.ndim != 3 or y.ndim != 1:
        raise CotuneError(f"{images} / {labels}: expected (N, H, W) images and (N,) labels, got {x.shape}, {y.shape}")
    if len(x) != len(y):
        raise CotuneError(f"{images} has {len(x)} images but {labels} has {len(y)} labels")
    rows = [{"image": x[i], "label": int(y[i])} for i in range(len(x))]
    return Rows(rows, str(images), info={"images": x, "labels": y})
