"""A resolved data set (:class:`DataSet`): how to read each split, and the deterministic carve of missing ones.

Both ways of resolving data build these: local files and short names (:mod:`cotune.tasks.catalog`) and hub
names (:mod:`cotune.tasks.hub`); the catalog's docstring says which splits are carved and how.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cotune.errors import CotuneError
from cotune.tasks.formats import LabelSpec, Rows

SPLITS = ("train", "validation", "test")


@dataclass
class DataSet:
    """A resolved data set: how to read each split as native rows (see :mod:`cotune.tasks.formats`)."""

    name: str
    shape: str  # cls | qa | mc | image
    sources: dict[str, Callable[[str], Rows]]  # split -> read(on_bad_row)
    labels: LabelSpec | None = None
    task: str | None = None  # e.g. "cola", "fpb", "gsm8k", "e2e": picks the default metric
    carve_from: str | None = None  # the split the missing ones are carved from ("train")
    carve: tuple[str, ...] = ()  # splits carved from ``carve_from``
    unavailable: dict[str, str] = field(default_factory=dict)  # split -> why it cannot be had
    where: str = ""  # for messages
    _cache: dict[tuple[str, str], Rows] = field(default_factory=dict, repr=False)

    def read(self, source_split: str, on_bad_row: str) -> Rows:
        key = (source_split, on_bad_row)
        if key not in self._cache:
            self._cache[key] = self.sources[source_split](on_bad_row)
        return self._cache[key]

    def split(
        self,
        split: str,
        *,
        on_bad_row: str = "error",
        seed: int = 0,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
    ) -> Rows:
        """Native rows of ``split``: a published split, or a deterministic carve of ``carve_from``."""
        if split not in SPLITS:
            raise CotuneError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}")
        if split in self.unavailable:
            raise CotuneError(f"{self.name}: no {split} split: {self.unavailable[split]}")
        if split not in self.carve and split != self.carve_from:
            if split not in self.sources:
                raise CotuneError(f"{self.name}: no {split} split in {self.where}")
            r = self.read(split, on_bad_row)
            if not r.labelled:
                raise CotuneError(f"{r.source} has no labels, so it cannot serve as the {split} split")
            return r
        base = self.read(self.carve_from, on_bad_row)
        fractions = {"validation": val_fraction, "test": test_fraction}
        parts = carve_indices(
            base.rows, {s: fractions[s] for s in self.carve}, seed, by=carve_key(self.shape, self.task)
        )
        idx = parts.get(split, parts["train"] if split == self.carve_from else [])
        return Rows([base.rows[i] for i in idx], base.source, base.skipped, base.labelled, base.info)


def carve_key(shape: str, task: str | None) -> Callable[[dict], Any] | None:
    """What rows are grouped/stratified by when carving: E2E by MR, MMLU by subject, classification by label."""
    if task == "e2e":
        return lambda r: ("group", r["prompt"])
    if shape == "mc":
        return lambda r: ("stratum", r["subject"])
    if shape in ("cls", "image"):
        return lambda r: ("stratum", r.get("label"))
    return None


def carve_indices(
    rows: list[dict], fractions: dict[str, float], seed: int, by: Callable[[dict], Any] | None = None
) -> dict[str, list[int]]:
    """Deterministically split row indices into ``train`` plus the named held-out parts.

    ``by(row)`` returning ``("group", g)`` keeps all rows of a group together; ``("stratum", s)`` carves each
    stratum separately (same fractions, rounded per stratum). Indices in every part stay in file order.
    """
    for name, f in fractions.items():
        if not 0.0 <= f < 1.0:
            raise CotuneError(f"{name} fraction must be in [0, 1), got {f}")
    if sum(fractions.values()) >= 1.0:
        raise CotuneError(f"held-out fractions {fractions} leave no training rows")
    rng = random.Random(seed)
    buckets: dict[Any, list[list[int]]] = {}  # stratum -> list of groups (lists of indices)
    groups: dict[Any, list[int]] = {}
    for i, r in enumerate(rows):
        kind, key = by(r) if by else ("row", i)
        if kind == "group":
            if key not in groups:
                groups[key] = []
                buckets.setdefault(None, []).append(groups[key])
            groups[key].append(i)
        else:
            buckets.setdefault(key if kind == "stratum" else None, []).append([i])
    parts: dict[str, list[int]] = {"train": [], **{k: [] for k in fractions}}
    for stratum in sorted(buckets, key=repr):  # sorted: the draw must not depend on dict order
        items = buckets[stratum]
        order = list(range(len(items)))
        rng.shuffle(order)
        start = 0
        for name, f in fractions.items():
            n = round(f * len(items))
            for j in order[start : start + n]:
                parts[name].extend(items[j])
            start += n
        for j in order[start:]:
            parts["train"].extend(items[j])
    return {k: sorted(v) for k, v in parts.items()}


def carve_missing(srcs: dict[str, Any]) -> dict[str, Any]:
    """Carve validation (and test, when also missing) from train when the folder lacks them."""
    missing = tuple(s for s in ("validation", "test") if not srcs.get(s))
    if not srcs.get("train"):
        return {}
    if missing == ("test",):
        return {"unavailable": {"test": "the folder has no labelled test file"}}
    return {"carve_from": "train", "carve": missing} if missing else {}
