"""ColA's image-classification base models, built in code: Linear, MLP, CNN.

Shapes follow the ColA reference configuration (``process_control`` in its ``utils.py``):

* ``linear``: flatten, ``Linear(C·H·W, classes)`` (module ``linear``);
* ``mlp``: flatten, ``blocks.0 = Linear(C·H·W, 128)``, ReLU, ``blocks.2 = Linear(128, 256)``, ReLU, then
  ``linear = Linear(256, classes)`` (hidden 128, scale factor 2, two layers; the reference config names ReLU
  although its code had the activation commented out, which makes its "MLP" a linear map; we keep the ReLU);
* ``cnn``: ``[Conv3x3(p=1) → ReLU → MaxPool2]`` blocks with widths 64, 128, 256, 512, the last without pooling,
  then global average pooling and ``linear = Linear(512, classes)``.

``forward(pixel_values)`` returns logits. The layers are plain ``nn.Linear`` / ``nn.Conv2d`` so adapters attach to
them by name (``linear``, ``blocks.0``, ...).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from cotune.errors import CotuneError


class LinearNet(nn.Module):
    def __init__(self, in_shape: tuple[int, ...], num_classes: int):
        super().__init__()
        self.linear = nn.Linear(math.prod(in_shape), num_classes)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.linear(pixel_values.flatten(1))


class MLPNet(nn.Module):
    def __init__(self, in_shape: tuple[int, ...], num_classes: int, hidden: int = 128, scale: float = 2,
                 num_layers: int = 2):
        super().__init__()
        layers: list[nn.Module] = []
        d = math.prod(in_shape)
        for _ in range(num_layers):
            layers += [nn.Linear(d, hidden), nn.ReLU()]
            d, hidden = hidden, int(hidden * scale)
        self.blocks = nn.Sequential(*layers)
        self.linear = nn.Linear(d, num_classes)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.linear(self.blocks(pixel_values.flatten(1)))


class CNNNet(nn.Module):
    def __init__(self, in_shape: tuple[int, ...], num_classes: int, hidden: tuple[int, ...] = (64, 128, 256, 512)):
        super().__init__()
        layers: list[nn.Module] = []
        c = in_shape[0]
        for h in hidden:
            layers += [nn.Conv2d(c, h, 3, 1, 1), nn.ReLU(), nn.MaxPool2d(2)]
            c = h
        layers = layers[:-1]  # no pooling after the last block
        self.blocks = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.linear = nn.Linear(c, num_classes)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.linear(self.blocks(pixel_values))


IMAGE_MODELS = {"linear": LinearNet, "mlp": MLPNet, "cnn": CNNNet}


def build_image_model(name: str, in_shape: tuple[int, ...] = (1, 28, 28), num_classes: int = 10, **kw) -> nn.Module:
    """One of ``linear`` | ``mlp`` | ``cnn`` for images of ``in_shape`` (C, H, W)."""
    if name not in IMAGE_MODELS:
        raise CotuneError(f"unknown image model {name!r}; valid: {', '.join(IMAGE_MODELS)}")
    return IMAGE_MODELS[name](tuple(in_shape), num_classes, **kw)
