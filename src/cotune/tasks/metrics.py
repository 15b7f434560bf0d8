"""Evaluation metrics, computed by maintained libraries (scikit-learn, scipy, rouge-score), never hand-written.

Only the answer *extraction* for exact match is ours (:func:`extract_number`), because it is a convention and
not a statistic: GSM8K-style, a generation's answer is the number after its last ``####`` when it has one, else
the last number in the text; ``$``, thousands separators and a trailing period are dropped, and two answers are
equal when they are the same number (``18``, ``18.0`` and ``18.00`` match; ``1,080`` matches ``1080``).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from decimal import Decimal, InvalidOperation
from functools import lru_cache

from cotune.errors import CotuneError

#: metric name -> greater is better (for best-checkpoint selection)
GREATER_IS_BETTER = {
    "accuracy": True,
    "f1": True,
    "macro_f1": True,
    "mcc": True,
    "pearson": True,
    "spearman": True,
    "rouge_l": True,
    "exact_match": True,
    "loss": False,
    "perplexity": False,
    "mse": False,
}


def _check(pred: Sequence, ref: Sequence) -> None:
    if len(pred) != len(ref):
        raise CotuneError(f"metric inputs differ in length: {len(pred)} predictions, {len(ref)} references")
    if len(ref) == 0:
        raise CotuneError("metric of zero examples")


def accuracy(pred: Sequence[int], ref: Sequence[int]) -> float:
    """Fraction of exact label matches (``sklearn.metrics.accuracy_score``)."""
    from sklearn.metrics import accuracy_score

    _check(pred, ref)
    return float(accuracy_score(ref, pred))


def f1(pred: Sequence[int], ref: Sequence[int], average: str = "binary", labels: Sequence[int] | None = None) -> float:
    """F1 (``sklearn.metrics.f1_score``): ``binary`` (positive class 1, MRPC/QQP) or ``macro`` (FPB)."""
    from sklearn.metrics import f1_score

    _check(pred, ref)
    return float(f1_score(ref, pred, average=average, labels=labels, zero_division=0))


def mcc(pred: Sequence[int], ref: Sequence[int]) -> float:
    """Matthews correlation coefficient (``sklearn.metrics.matthews_corrcoef``), CoLA's metric."""
    from sklearn.metrics import matthews_corrcoef

    _check(pred, ref)
    return float(matthews_corrcoef(ref, pred))


def pearson(pred: Sequence[float], ref: Sequence[float]) -> float:
    """Pearson's r (``scipy.stats.pearsonr``); NaN-free: a constant input gives 0.0 (no linear association)."""
    from scipy.stats import pearsonr

    _check(pred, ref)
    if len(set(pred)) < 2 or len(set(ref)) < 2:
        return 0.0
    return float(pearsonr(pred, ref)[0])


def spearman(pred: Sequence[float], ref: Sequence[float]) -> float:
    """Spearman's rho (``scipy.stats.spearmanr``); a constant input gives 0.0."""
    from scipy.stats import spearmanr

    _check(pred, ref)
    if len(set(pred)) < 2 or len(set(ref)) < 2:
        return 0.0
    return float(spearmanr(pred, ref)[0])


def spread(pred: Sequence[float], ref: Sequence[float]) -> float:
    """The predictions' standard deviation over the references' (``statistics.pstdev``): 1.0 spreads like the
    labels, 0.0 predicts one value for every input; NaN when the references are all equal."""
    from statistics import pstdev

    _check(pred, ref)
    sd_ref = pstdev(ref)
    return pstdev(pred) / sd_ref if sd_ref > 0 else math.nan


#: ``pred_spread`` below which a regression model gives every input one value: AdaKron's lost STS-B seed reads
#: 4.4e-5 on the dev set, a head one step into training ~5e-2 (docs/RESULTS.md, AdaKron's four-epoch section).
COLLAPSED_SPREAD = 1e-3


def collapse_warning(metrics: Mapping[str, float], metric: str) -> str | None:
    """What to tell the user when an evaluation's predictions have collapsed to one value (``pred_spread`` below
    ``COLLAPSED_SPREAD``), else None. ``metric`` names the score that cannot rise until they spread again."""
    value = metrics.get("pred_spread", math.nan)
    if not value < COLLAPSED_SPREAD:
        return None
    return (f"the predictions have collapsed to one value (pred_spread {value:.1e}: their sd over the labels'): "
            f"every input gets the same output, so {metric} cannot rise until they spread again. An adapter whose "
            "output swamps its layer's does this: try a lower optim.lr or another seed")


def predicted_classes(preds: Sequence[int]) -> dict[str, float]:
    """How a classifier's evaluation answered: ``pred_classes``, the number of distinct classes it predicted (1:
    every row got one class), and ``pred_top_class``, the class it predicted most (the smallest on a tie)."""
    counts = Counter(preds)
    top = min(counts, key=lambda c: (-counts[c], c))
    return {"pred_classes": float(len(counts)), "pred_top_class": float(top)}


def one_class_warning(metrics: Mapping[str, float], metric: str, names: Sequence[str] | None = None) -> str | None:
    """What to tell the user when a classifier's evaluation gave every row one class (``pred_classes`` 1) and
    got some wrong, else None: its score is what always answering that class scores, the majority baseline at
    best. Early in a run this is normal; it means something for the adapter a run keeps (docs/RESULTS.md's
    grid, where several methods never left MRPC's all-"paraphrase" F1). ``names`` (the task's label names, when
    it has them and they are more than its indices) names the class beside its index."""
    if metrics.get("pred_classes") != 1 or not metrics.get("accuracy", 1.0) < 1.0:
        return None
    which = ""
    if "pred_top_class" in metrics:
        k = int(metrics["pred_top_class"])
        named = names is not None and 0 <= k < len(names) and str(names[k]) != str(k)  # GLUE's TSVs say "0", "1"
        which = f" (class {k}, {names[k]!r})" if named else f" (class {k})"
    return (f"every evaluation row gets one class{which}: {metric} {metrics.get(metric, math.nan):.4g} is what "
            "always answering it scores, the majority baseline at best. Train longer, or try another optim.lr or "
            "seed")


@lru_cache(maxsize=2)
def _rouge_scorer(use_stemmer: bool):
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=use_stemmer)


def rouge_l(pred: Sequence[str], refs: Sequence[str | Sequence[str]], use_stemmer: bool = True) -> float:
    """Mean ROUGE-L F-measure (``rouge_score``, Porter stemming as in the usual reports).

    A reference may be a list of references (E2E has several per input): the best-matching one counts
    (``RougeScorer.score_multi``, the max over references).
    """
    _check(pred, refs)
    sc = _rouge_scorer(use_stemmer)
    total = 0.0
    for p, r in zip(pred, refs):
        if isinstance(r, str):
            total += sc.score(r, p)["rougeL"].fmeasure
        else:
            total += sc.score_multi(list(r), p)["rougeL"].fmeasure
    return total / len(pred)


_NUMBER = re.compile(r"-?\$?\s?\d[\d,]*(?:\.\d+)?")


def extract_number(text: str) -> str | None:
    """The final numeric answer of a text, normalised (see the module docstring); None when it has no number."""
    if text is None:
        return None
    tail = text.rsplit("####", 1)[1] if "####" in text else text
    nums = _NUMBER.findall(tail)
    if not nums:
        return None
    num = nums[0] if "####" in text else nums[-1]
    return normalize_number(num)


def normalize_number(s: str) -> str | None:
    """``'$1,080.00'`` -> ``'1080'``; a non-number gives None."""
    t = s.replace("$", "").replace(",", "").replace(" ", "").rstrip(".")
    try:
        d = Decimal(t)
    except InvalidOperation:
        return None
    if not d.is_finite():
        return None
    d = d.normalize()
    return format(d, "f") if d != d.to_integral_value() else str(int(d))


def exact_match(pred: Sequence[str], ref: Sequence[str]) -> float:
    """Fraction of generations whose extracted number equals the reference's (GSM8K-style)."""
    _check(pred, ref)
    hits = 0
    for p, r in zip(pred, ref):
        a, b = extract_number(p), normalize_number(r) if r is not None else None
        hits += int(a is not None and a == b)
    return hits / len(pred)


def perplexity(loss: float) -> float:
    """exp(mean token NLL), capped to avoid overflow."""
    return math.exp(min(loss, 50.0))
