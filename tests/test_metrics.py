"""Metrics equal scikit-learn / scipy / rouge-score computed here independently, and hand-computed values."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
from rouge_score import rouge_scorer
from scipy import stats
from sklearn import metrics as skm

from cotune.errors import CotuneError
from cotune.tasks import metrics as M

rng = random.Random(0)
REF = [rng.randrange(2) for _ in range(200)]
PRED = [y if rng.random() < 0.7 else 1 - y for y in REF]
REF3 = [rng.randrange(3) for _ in range(200)]
PRED3 = [y if rng.random() < 0.6 else rng.randrange(3) for y in REF3]
X = [rng.gauss(0, 1) for _ in range(100)]
Y = [x + rng.gauss(0, 0.8) for x in X]


def test_hand_computed_classification():
    pred, ref = [1, 0, 1, 1, 0, 1], [1, 1, 1, 0, 0, 0]
    # tp = 2 (idx 0, 2), fp = 2 (idx 3, 5), fn = 1 (idx 1), tn = 1 (idx 4)
    assert M.accuracy(pred, ref) == 3 / 6
    assert M.f1(pred, ref) == pytest.approx(2 * 2 / (2 * 2 + 2 + 1))
    assert M.mcc(pred, ref) == pytest.approx((2 * 1 - 2 * 1) / math.sqrt(4 * 3 * 3 * 2))  # = 0
    pred, ref = [1, 1, 0, 0, 1], [1, 0, 0, 0, 1]  # tp 2, fp 1, tn 2, fn 0
    assert M.mcc(pred, ref) == pytest.approx((2 * 2 - 1 * 0) / math.sqrt(3 * 2 * 3 * 2))


def test_classification_equals_sklearn():
    assert M.accuracy(PRED, REF) == skm.accuracy_score(REF, PRED)
    assert M.f1(PRED, REF) == skm.f1_score(REF, PRED)
    assert M.mcc(PRED, REF) == skm.matthews_corrcoef(REF, PRED)
    assert M.f1(PRED3, REF3, average="macro") == skm.f1_score(REF3, PRED3, average="macro")


def test_correlations_equal_numpy_and_scipy():
    assert M.pearson(X, Y) == pytest.approx(np.corrcoef(X, Y)[0, 1], abs=1e-12)
    assert M.spearman(X, Y) == pytest.approx(stats.spearmanr(X, Y).statistic, abs=1e-12)
    # hand: ranks of [1, 2, 3, 4] vs [1, 3, 2, 4] -> d = [0, 1, 1, 0], rho = 1 - 6*2/(4*15) = 0.8
    assert M.spearman([1, 2, 3, 4], [10, 30, 20, 40]) == pytest.approx(0.8)
    assert M.pearson([1, 1, 1], [1, 2, 3]) == 0.0  # constant predictions: defined as no association, not NaN


def test_spread_is_the_predictions_sd_over_the_labels():
    assert M.spread(Y, X) == pytest.approx(np.std(Y) / np.std(X), rel=1e-12)
    # hand: sd([0, 2]) = 1, sd([1, 5]) = 2
    assert M.spread([1, 5], [0, 2]) == 2.0 and M.spread([3, 3, 3], [1, 2, 3]) == 0.0
    assert math.isnan(M.spread([1, 2], [4, 4]))  # labels with no spread: no scale to compare with


def test_the_warnings_fire_on_their_thresholds_only():
    assert M.collapse_warning({"pred_spread": 4.4e-5, "pearson": 0.1}, "pearson") is not None
    for quiet in ({"pred_spread": 2e-3}, {"pred_spread": math.nan}, {}):  # spread, no label spread, classification
        assert M.collapse_warning(quiet, "pearson") is None
    assert "accuracy 0.5" in M.one_class_warning({"pred_classes": 1.0, "accuracy": 0.5}, "accuracy")
    # the class it answered, by index and, when the task has them, by name
    one = M.predicted_classes([1, 1, 1])
    assert one == {"pred_classes": 1.0, "pred_top_class": 1.0}
    assert "(class 1, 'positive')" in M.one_class_warning({**one, "accuracy": 0.5}, "accuracy", ["negative", "positive"])
    for names in (None, ["0", "1"]):  # no names, or names that only repeat the index (GLUE's TSVs)
        assert "(class 1)" in M.one_class_warning({**one, "accuracy": 0.5}, "accuracy", names)
    assert M.predicted_classes([2, 0, 2, 0, 1]) == {"pred_classes": 3.0, "pred_top_class": 0.0}  # a tie: the smaller
    # two answers, a one-class evaluation set answered right, a regression evaluation: nothing to say
    for quiet in ({"pred_classes": 2.0, "accuracy": 0.5}, {"pred_classes": 1.0, "accuracy": 1.0}, {"pearson": 0.3}):
        assert M.one_class_warning(quiet, "accuracy") is None


def test_rouge_l_hand_and_library():
    # LCS("the cat sat on the mat", "the cat is on the mat") = "the cat on the mat" = 5 tokens: P = R = F = 5/6
    assert M.rouge_l(["the cat sat on the mat"], ["the cat is on the mat"]) == pytest.approx(5 / 6)
    preds = ["The venue is in the city centre .", "Blue Spice serves coffee", "nothing alike"]
    refs = ["A coffee shop in the city centre area called Blue Spice .", "Blue Spice is a coffee shop .", "x y"]
    sc = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    want = sum(sc.score(r, p)["rougeL"].fmeasure for p, r in zip(preds, refs)) / 3
    assert M.rouge_l(preds, refs) == pytest.approx(want, abs=1e-12)
    multi = [["x y", "the venue is in the centre"], ["Blue Spice is a coffee shop ."], ["z"]]
    want = np.mean([max(sc.score(r, p)["rougeL"].fmeasure for r in rs) for p, rs in zip(preds, multi)])
    assert M.rouge_l(preds, multi) == pytest.approx(want, abs=1e-12)


@pytest.mark.parametrize(
    "text,number",
    [
        ("She makes 9 * 2 = $18 every day.\n#### 18", "18"),
        ("#### 1,080", "1080"),
        ("The answer is $18.00.", "18"),
        ("First 3, then 4, so 7.", "7"),
        ("It drops to -3.50 degrees", "-3.5"),
        ("#### 5 apples, not 6", "5"),
        ("no number at all", None),
    ],
)
def test_extract_number(text, number):
    assert M.extract_number(text) == number


def test_exact_match_on_real_gsm8k_answers(shared_data):
    rows = [json.loads(x) for x in (shared_data / "gsm8k/test.jsonl").read_text().splitlines()[:100]]
    finals = [r["answer"].split("#### ")[-1] for r in rows]
    # a model that writes the reference solution scores 1; one that writes every answer plus one scores 0
    assert M.exact_match([r["answer"] for r in rows], finals) == 1.0
    wrong = [f"#### {int(f.replace(',', '')) + 1}" for f in finals]
    assert M.exact_match(wrong, finals) == 0.0
    half = [r["answer"] if i % 2 else "I do not know" for i, r in enumerate(rows)]
    assert M.exact_match(half, finals) == 0.5


def test_errors():
    with pytest.raises(CotuneError, match="differ in length"):
        M.accuracy([1, 0], [1])
    with pytest.raises(CotuneError, match="zero examples"):
        M.rouge_l([], [])
