"""cotune: parameter-efficient and collaborative fine-tuning (ColA, CoLA, AdaKron, LoRETTA) on one frozen base."""

from cotune.adapters import (
    Adapter,
    AdapterConfig,
    attach,
    families,
    load_adapter,
    merge,
    register,
    save_adapter,
    set_active,
    trainable_parameters,
    unmerge,
)
from cotune.errors import CotuneError

__version__ = "0.1.0"

__all__ = [
    "Adapter",
    "AdapterConfig",
    "CotuneError",
    "attach",
    "families",
    "load_adapter",
    "merge",
    "register",
    "save_adapter",
    "set_active",
    "trainable_parameters",
    "unmerge",
]
