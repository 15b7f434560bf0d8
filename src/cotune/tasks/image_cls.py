"""Image classification on MNIST-format data (Fashion-MNIST idx files) with ColA's Linear / MLP / CNN bases.

Rows: ``{"image": uint8 array (H, W) or (H, W, C), "label": int}``. Pixels are scaled to [0, 1] and normalised by
the mean and standard deviation of all pixels of the training file (for Fashion-MNIST these are 0.2860 and
0.3530, the constants the ColA code hard-codes). Batches: ``pixel_values`` (B, C, H, W) float32 and ``labels``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cotune.errors import CotuneError
from cotune.tasks import metrics as M
from cotune.tasks.base import TaskBase, batches, eval_mode, logits_of, model_device, to_device
from cotune.tasks.image_models import IMAGE_MODELS, build_image_model


class ImageClsTask(TaskBase):
    """``make_task("image_cls", "fashion-mnist")`` then ``build_model("cnn")``."""

    kind = "image_cls"
    shapes = ("image",)

    def __init__(self, data, model=None, *, num_classes: int | None = None, mean: float | None = None,
                 std: float | None = None, **kw: Any):
        super().__init__(data, model, **kw)
        self._num_classes = num_classes
        self._mean, self._std = mean, std
        self._shape: tuple[int, ...] | None = None

    def default_metric(self) -> str:
        return "accuracy"

    def _stats(self) -> None:
        """Mean/std of the training pixels and the image shape, from the whole training source (deterministic)."""
        train = self.data.read(self.data.carve_from or "train", self.on_bad_row)
        imgs = train.info.get("images")
        if imgs is None:
            imgs = np.stack([r["image"] for r in train.rows])
        if self._mean is None or self._std is None:
            # exact population mean/std from the pixel-value histogram (no float copy of 47M pixels)
            counts = np.bincount(np.asarray(imgs, dtype=np.uint8).ravel(), minlength=256).astype(np.float64)
            v = np.arange(256, dtype=np.float64) / 255.0
            n = counts.sum()
            mean = float((counts * v).sum() / n)
            self._mean, self._std = mean, float(np.sqrt((counts * (v - mean) ** 2).sum() / n))
        self._shape = (1, *imgs.shape[1:3]) if imgs.ndim == 3 else (imgs.shape[3], *imgs.shape[1:3])
        if self._num_classes is None:
            self._num_classes = int(max(r["label"] for r in train.rows)) + 1

    @property
    def mean(self) -> float:
        if self._mean is None or self._std is None or self._shape is None:
            self._stats()
        return self._mean

    @property
    def std(self) -> float:
        self.mean  # noqa: B018 - computes the statistics once
        return self._std

    @property
    def num_classes(self) -> int:
        self.mean  # noqa: B018
        return self._num_classes

    def build_model(self, model: str | None = None, **kw: Any) -> nn.Module:
        """``linear`` | ``mlp`` | ``cnn`` (ColA's shapes), sized to the data's image shape and classes."""
        name = model or self.model_spec or "linear"
        if name not in IMAGE_MODELS:
            raise CotuneError(f"image_cls models are built in code: {', '.join(IMAGE_MODELS)}; got {name!r}")
        self.mean  # noqa: B018
        return build_image_model(name, self._shape, self._num_classes, **kw)

    def collate(self, rows: list[dict]) -> dict[str, Any]:
        if not rows:
            raise CotuneError("collate of an empty batch")
        x = torch.from_numpy(np.stack([r["image"] for r in rows]).astype(np.float32) / 255.0)
        x = x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2)
        x = (x - self.mean) / self.std
        return {"pixel_values": x, "labels": torch.tensor([r["label"] for r in rows], dtype=torch.long)}

    def loss(self, model: nn.Module, batch: dict) -> torch.Tensor:
        return F.cross_entropy(logits_of(model(batch["pixel_values"])).float(), batch["labels"])

    def evaluate(self, model: nn.Module, rows: list[dict], batch_size: int = 256, limit: int | None = None):
        rows = rows[:limit] if limit is not None else rows
        if not rows:
            raise CotuneError("evaluate needs at least one row")
        dev = model_device(model)
        preds: list[int] = []
        loss_sum = 0.0
        with eval_mode(model):
            for chunk in batches(rows, batch_size, desc="eval"):
                b = to_device(self.collate(chunk), dev)
                logits = logits_of(model(b["pixel_values"])).float()
                loss_sum += F.cross_entropy(logits, b["labels"], reduction="sum").item()
                preds += logits.argmax(-1).tolist()
        out = {"accuracy": M.accuracy(preds, [r["label"] for r in rows]), "loss": loss_sum / len(rows),
               **M.predicted_classes(preds)}
        return self.check_metrics(out)
