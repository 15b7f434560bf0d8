"""Loaders: every real file in ../shared/data in its published format, splits, malformed rows, hub/offline."""

from __future__ import annotations

import gzip
import json
from collections import Counter

import numpy as np
import pytest

from cotune.errors import CotuneError
from cotune.tasks import formats as F
from cotune.tasks import make_task, resolve_data
from cotune.tasks.dataset import carve_indices

# Row counts from ../shared/data/README.md (MRPC train: see test_mrpc_train_has_3667_rows).
COUNTS = {
    "glue/SST-2": {"train": 67_349, "validation": 872, "test": 1_821},
    "glue/CoLA": {"train": 8_551, "validation": 1_043},
    "glue/MRPC": {"train": 3_667, "validation": 408, "test": 1_725},
    "glue/STS-B": {"train": 5_749, "validation": 1_500, "test": 1_379},
    "glue/RTE": {"train": 2_490, "validation": 277},
    "glue/WNLI": {"train": 635, "validation": 71},
}


@pytest.mark.parametrize("name", list(COUNTS))
def test_glue_published_splits(shared_data, name):
    ds = resolve_data(name, data_root=shared_data)
    for split, n in COUNTS[name].items():
        r = ds.split(split)
        assert len(r.rows) == n, (name, split)
        assert r.skipped == 0
    if "test" not in COUNTS[name]:  # CoLA/RTE/WNLI test.tsv carry no labels
        with pytest.raises(CotuneError, match="no labels"):
            ds.split("test")


def test_glue_field_values(shared_data):
    sst = resolve_data("glue/SST-2", data_root=shared_data)
    assert sst.split("validation").rows[0] == {
        "text": "it 's a charming and often affecting journey . ", "text_pair": None, "label": 1}
    # test_labeled.tsv has CRLF line ends: no '\r' may survive in the label or text
    t = sst.split("test").rows[0]
    assert t["label"] == 0 and t["text"] == "uneasy mishmash of styles and genres ."
    cola = resolve_data("glue/CoLA", data_root=shared_data).split("validation").rows
    # header-less; the last line of dev.tsv has no trailing newline and must still be read
    assert cola[0] == {"text": "The sailors rode the breeze clear of the rocks.", "text_pair": None, "label": 1}
    assert cola[-1]["text"].endswith("himself.")
    mrpc = resolve_data("glue/MRPC", data_root=shared_data)
    first = mrpc.split("train").rows[0]  # the BOM before "Quality" must not hide the header
    assert first["label"] == 1 and first["text"].startswith("Amrozi accused") and first["text_pair"].startswith(
        "Referring to him")
    assert mrpc.split("test").source.endswith("msr_paraphrase_test.txt")
    stsb = resolve_data("glue/STS-B", data_root=shared_data)
    assert stsb.labels.regression and stsb.split("validation").rows[1]["label"] == 4.75
    st = stsb.split("test").rows  # header-less test_labeled.tsv, 7 or 9 columns per row
    assert st[0] == {"text": "A girl is styling her hair.", "text_pair": "A girl is brushing her hair.", "label": 2.5}
    assert all(0.0 <= r["label"] <= 5.0 for r in st)
    rte = resolve_data("glue/RTE", data_root=shared_data)
    assert rte.labels.names == ["entailment", "not_entailment"] and rte.split("validation").rows[0]["label"] == 1


def test_mrpc_train_has_3667_rows(shared_data):
    """The README says 3,668, but the published train.tsv holds 3,667 pairs (3,668 lines with the header)."""
    raw = (shared_data / "glue/MRPC/train.tsv").read_bytes()
    assert raw.startswith(b"\xef\xbb\xbf") and raw.count(b"\n") == 3_668
    assert len(resolve_data("glue/MRPC", data_root=shared_data).split("train").rows) == 3_667


def test_qnli_dev_only(shared_data):
    with pytest.raises(CotuneError, match="no train.tsv"):
        resolve_data("glue/QNLI", data_root=shared_data)
    ds = resolve_data(shared_data / "glue/QNLI/dev.tsv")  # the one file: train/validation/test carved from it
    sizes = {s: len(ds.split(s).rows) for s in ("train", "validation", "test")}
    assert sum(sizes.values()) == 5_463 and sizes["validation"] > 500
    assert ds.task == "qnli" and ds.labels.names == ["entailment", "not_entailment"]


def test_fpb_latin1_csv(shared_data):
    rows = F.read_table(shared_data / "fpb/all-data.csv", F.LabelSpec(names=F_LABELS), delimiter=",").rows
    assert len(rows) == 4_846
    assert Counter(F_LABELS[r["label"]] for r in rows) == {"neutral": 2_879, "positive": 1_363, "negative": 604}
    klabin = next(r["text"] for r in rows if "Klabin" in r["text"])
    assert "Tel+\u00d1\u00f3aco" in klabin  # bytes D1 F3 decoded as Latin-1, not a UnicodeDecodeError
    ds = resolve_data("fpb", data_root=shared_data)
    sizes = {s: len(ds.split(s).rows) for s in ("train", "validation", "test")}
    # stratified by label: round(0.1 * 2879) + round(0.1 * 1363) + round(0.1 * 604) = 288 + 136 + 60
    assert sum(sizes.values()) == 4_846 and sizes["validation"] == sizes["test"] == 484


F_LABELS = ["negative", "neutral", "positive"]


def test_gsm8k(shared_data):
    ds = resolve_data("gsm8k", data_root=shared_data)
    tr, va, te = (ds.split(s).rows for s in ("train", "validation", "test"))
    assert len(tr) + len(va) == 7_473 and len(te) == 1_319 and len(va) == 747
    raw = [json.loads(x) for x in (shared_data / "gsm8k/train.jsonl").read_text().splitlines()]
    by_q = {r["question"]: r["answer"].split("#### ")[-1].replace(",", "") for r in raw}
    assert all(by_q[r["prompt"]] == r["final"] for r in tr[:200] + va[:200])
    assert te[0]["final"] == "18" and te[0]["prompt"].startswith("Janet\u2019s ducks")
    assert any(r["final"] == "1080" for r in tr + va)  # '#### 1,080' loses its thousands separator


def test_e2e(shared_data):
    ds = resolve_data("e2e", data_root=shared_data)
    tr, va, te = (ds.split(s).rows for s in ("train", "validation", "test"))
    assert len(tr) + len(va) == 4_672 and len(te) == 4_693
    assert not {r["prompt"] for r in tr} & {r["prompt"] for r in va}  # carved by MR: no MR in both
    assert te[0] == {"prompt": "name : Blue Spice | Type : coffee shop | area : city centre",
                     "answer": "A coffee shop in the city centre area called Blue Spice .", "final": None}


def test_instruct_demo_files(shared_data):
    alp = resolve_data("instruct/alpaca_en_demo.json", data_root=shared_data)
    rows = alp.read("train", "error").rows
    assert len(rows) == 999 and alp.shape == "qa"
    raw = json.loads((shared_data / "instruct/alpaca_en_demo.json").read_text())
    with_input = next(i for i, r in enumerate(raw) if r["input"])
    assert rows[with_input]["prompt"] == raw[with_input]["instruction"] + "\n\n" + raw[with_input]["input"]
    assert rows[0] == {"prompt": "Describe a process of making crepes.", "answer": raw[0]["output"], "final": None,
                       "instruction": raw[0]["instruction"], "input": ""}
    c4 = resolve_data("c4", data_root=shared_data).read("train", "error").rows
    assert len(c4) == 300 and c4[0]["prompt"] == "" and c4[0]["answer"].startswith("Don\u2019t think you need")
    wiki = resolve_data("wiki", data_root=shared_data).read("train", "error").rows
    assert len(wiki) == 30 and wiki[0]["answer"].startswith("Anarchism is a political philosophy")


def test_mmlu(shared_data):
    r = F.read_records(shared_data / "mmlu/mmlu_test.jsonl")
    assert len(r.rows) == 14_042 and r.info["dropped_header_rows"] == 2 and r.skipped == 0
    assert len({x["subject"] for x in r.rows}) == 57
    first = r.rows[0]
    assert first["label"] == 3 and first["choices"][3] == "Not wrong, Not wrong" and first["subject"] == "moral scenarios"
    ds = resolve_data("mmlu", data_root=shared_data)
    parts = {s: ds.split(s).rows for s in ("train", "validation", "test")}
    assert sum(map(len, parts.values())) == 14_042
    # stratified by subject: every subject appears in every part
    for rows in parts.values():
        assert len({x["subject"] for x in rows}) == 57


def _idx_reference(path, offset):
    return np.frombuffer(gzip.open(path).read(), dtype=np.uint8, offset=offset)


def test_fashion_mnist(shared_data):
    d = shared_data / "fashion-mnist"
    ds = resolve_data("fashion-mnist", data_root=shared_data)
    tr, va, te = (ds.split(s).rows for s in ("train", "validation", "test"))
    assert len(tr) + len(va) == 60_000 and len(va) == 6_000 and len(te) == 10_000
    # independent parse: 16-byte header for images, 8-byte header for labels
    ref_x = _idx_reference(d / "t10k-images-idx3-ubyte.gz", 16).reshape(-1, 28, 28)
    ref_y = _idx_reference(d / "t10k-labels-idx1-ubyte.gz", 8)
    assert np.array_equal(te[123]["image"], ref_x[123]) and te[123]["label"] == ref_y[123]
    assert Counter(r["label"] for r in te) == {k: 1000 for k in range(10)}
    assert Counter(r["label"] for r in va) == {k: 600 for k in range(10)}  # stratified carve


def test_carving_is_deterministic_disjoint_and_complete(shared_data):
    ds = resolve_data("fpb", data_root=shared_data)
    rows = ds.read("train", "error").rows
    a = carve_indices(rows, {"validation": 0.1, "test": 0.1}, seed=0, by=lambda r: ("stratum", r["label"]))
    b = carve_indices(rows, {"validation": 0.1, "test": 0.1}, seed=0, by=lambda r: ("stratum", r["label"]))
    c = carve_indices(rows, {"validation": 0.1, "test": 0.1}, seed=1, by=lambda r: ("stratum", r["label"]))
    assert a == b and a["validation"] != c["validation"]
    allidx = a["train"] + a["validation"] + a["test"]
    assert sorted(allidx) == list(range(len(rows)))
    # the task-level split is the same carve
    assert [rows[i] for i in a["validation"]] == ds.split("validation", seed=0).rows
    assert make_task("seq_cls", "fpb", data_root=str(shared_data), seed=1).load("validation").rows == [
        rows[i] for i in c["validation"]]


# --------------------------------------------------------------------------------------------- malformed rows


def test_tsv_bad_rows(tmp_path):
    f = tmp_path / "SST-2" / "train.tsv"
    f.parent.mkdir()
    f.write_text("sentence\tlabel\ngood film\t1\nbad\tfilm\t0\nno label here\t\nfine\t7\nok\t0\n")
    spec = F.LabelSpec(names=["0", "1"])
    with pytest.raises(CotuneError, match=r"train\.tsv, line 3: expected 2 tab-separated columns, found 3"):
        F.read_table(f, spec)
    r = F.read_table(f, spec, on_bad_row="skip")
    assert [x["text"] for x in r.rows] == ["good film", "ok"] and r.skipped == 3
    f.write_text("sentence\tlabel\ngood film\t1\nno label here\t\n")
    with pytest.raises(CotuneError, match="line 3: missing label"):
        F.read_table(f, spec)
    f.write_text("sentence\tlabel\ngood film\t1\nfine\t7\n")
    with pytest.raises(CotuneError, match=r"line 3: unknown label '7'"):
        make_task("seq_cls", str(f.parent)).load("train")
    split = make_task("seq_cls", str(f.parent), on_bad_row="skip").load("train")
    assert split.skipped == 1 and len(split.rows) == 1


def test_csv_and_jsonl_bad_rows(tmp_path):
    f = tmp_path / "fpb.csv"
    f.write_text('label,content\npositive,"Up, and up."\nbogus,"x"\n')
    with pytest.raises(CotuneError, match=r"fpb\.csv, line 3: unknown label 'bogus'"):
        F.read_table(f, F.LabelSpec(names=F_LABELS), delimiter=",")
    j = tmp_path / "gsm.jsonl"
    j.write_text('{"question": "1+1?", "answer": "2\\n#### 2"}\n{"question": "x", "answer": \n'
                 '{"question": "y"}\n{"question": "z", "answer": "no final line"}\n')
    with pytest.raises(CotuneError, match=r"gsm\.jsonl, line 2: bad JSON"):
        F.read_records(j)
    r = F.read_records(j, on_bad_row="skip")
    assert len(r.rows) == 1 and r.skipped == 3
    j.write_text('{"question": "1+1?", "answer": "2\\n#### 2"}\n\n{"question": "y"}\n')
    with pytest.raises(CotuneError, match=r"line 3: missing key 'answer'"):
        F.read_records(j)


def test_alpaca_json_item_lines(tmp_path):
    f = tmp_path / "alpaca.json"
    items = [{"instruction": "a", "input": "", "output": "b"}, {"instruction": "c", "input": "d"},
             {"instruction": "e", "input": "", "output": "f"}]
    f.write_text(json.dumps(items, indent=2))
    line = f.read_text().split("\n").index("  {", 6) + 1  # where the second item starts
    with pytest.raises(CotuneError, match=rf"alpaca\.json, line {line}: missing key 'output'"):
        F.read_records(f)
    r = F.read_records(f, on_bad_row="skip")
    assert [x["answer"] for x in r.rows] == ["b", "f"] and r.skipped == 1
    f.write_text('[{"instruction": "a", "output": "b"},\n {"instruction": }]')
    with pytest.raises(CotuneError, match=r"line 2: bad JSON"):
        F.read_records(f, on_bad_row="skip")  # a syntax error inside the array cannot be skipped


def test_e2e_and_mmlu_bad_rows(tmp_path):
    f = tmp_path / "valid.txt"
    f.write_text("name : A | area : B||A is in B .\nno separator here\nname : C||\n")
    with pytest.raises(CotuneError, match=r"valid\.txt, line 2"):
        F.read_e2e(f)
    assert F.read_e2e(f, "skip").skipped == 2
    m = tmp_path / "mmlu.jsonl"
    row = {"question": "q", "answer_a": "1", "answer_b": "2", "answer_c": "3", "answer_d": "4", "topic": "t"}
    hdr = {k: k for k in row} | {"correct_answer": "answer"}
    m.write_text("\n".join(json.dumps(x) for x in [row | {"correct_answer": "B"}, hdr, row | {"correct_answer": "E"}]))
    with pytest.raises(CotuneError, match=r"line 3: correct_answer 'E'"):
        F.read_records(m)
    r = F.read_records(m, on_bad_row="skip")
    assert r.skipped == 1 and r.info["dropped_header_rows"] == 1 and r.rows[0]["label"] == 1


def test_idx_errors(tmp_path):
    f = tmp_path / "train-images-idx3-ubyte"
    f.write_bytes(b"\x00\x00\x08\x03" + (2).to_bytes(4, "big") + (2).to_bytes(4, "big") * 2 + b"\x00" * 7)
    with pytest.raises(CotuneError, match="8 bytes\\) but the file has 7"):
        F.read_idx(f)
    f.write_bytes(b"PK\x03\x04")
    with pytest.raises(CotuneError, match="not an idx file"):
        F.read_idx(f)


# --------------------------------------------------------------------------------------------- resolution


def test_offline_hub_names_fail_at_once(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("COTUNE_DATA", raising=False)
    monkeypatch.chdir(tmp_path)  # no ./data and no ../shared/data from here
    with pytest.raises(CotuneError, match="HF_HUB_OFFLINE=1 forbids.*'nyu-mll/glue'.*local file or folder"):
        make_task("seq_cls", "nyu-mll/glue:sst2")
    with pytest.raises(CotuneError, match=r"'openai/gsm8k'.*<root>/gsm8k"):
        make_task("causal_lm", "gsm8k")


def test_hub_rows_are_converted(monkeypatch, tmp_path):
    """The hub path (online) through a fake ``load_dataset`` returning a real DatasetDict."""
    import datasets

    feats = datasets.Features({"sentence": datasets.Value("string"),
                               "label": datasets.ClassLabel(names=["negative", "positive"])})
    dd = datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"sentence": ["good", "bad", "fine"], "label": [1, 0, 1]}, features=feats),
        "validation": datasets.Dataset.from_dict({"sentence": ["meh"], "label": [0]}, features=feats),
        "test": datasets.Dataset.from_dict({"sentence": ["?"], "label": [-1]}, features=feats),
    })
    asked = []
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: asked.append(a) or dd)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.chdir(tmp_path)
    task = make_task("seq_cls", "someone/reviews:plain")
    assert asked == [("someone/reviews", "plain")]
    assert task.label_names == ["negative", "positive"]
    assert task.load("train").rows[0] == {"text": "good", "text_pair": None, "label": 1}
    assert len(task.load("validation").rows) == 1
    with pytest.raises(CotuneError, match="no labels"):
        task.load("test")


def test_option_and_shape_errors(shared_data):
    with pytest.raises(CotuneError, match="unknown option.*n_shots.*valid:"):
        make_task("multiple_choice", "mmlu", data_root=str(shared_data), n_shots=5)
    with pytest.raises(CotuneError, match="holds cls rows.*use seq_cls"):
        make_task("causal_lm", "glue/SST-2", data_root=str(shared_data))
    with pytest.raises(CotuneError, match="unknown task type"):
        make_task("regression", "fpb")
    with pytest.raises(CotuneError, match="does not exist"):
        make_task("seq_cls", "./nowhere/train.tsv")
