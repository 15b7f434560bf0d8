"""Adapter families, the site contract, and attach / merge / save / load."""

import importlib

from cotune.adapters.attach import (
    active_set,
    adapter_sets,
    adapters,
    attach,
    default_targets,
    detach,
    match_targets,
    merge,
    parameter_report,
    set_active,
    sites,
    trainable_parameters,
    unmerge,
)
from cotune.adapters.base import Adapter, AdapterConfig, get_family, make_config, register
from cotune.adapters.io import load_adapter, read_adapter_config, save_adapter
from cotune.adapters.site import AdaptedModule

# Importing the built-in family modules binds the subpackage ``cotune.adapters.families`` as an attribute of
# this package, shadowing the function of that name; load them first, then bind the function.
importlib.import_module("cotune.adapters.families")
from cotune.adapters.base import families  # noqa: E402

__all__ = [
    "AdaptedModule",
    "Adapter",
    "AdapterConfig",
    "active_set",
    "adapter_sets",
    "adapters",
    "attach",
    "default_targets",
    "detach",
    "families",
    "get_family",
    "load_adapter",
    "make_config",
    "match_targets",
    "merge",
    "parameter_report",
    "read_adapter_config",
    "register",
    "save_adapter",
    "set_active",
    "sites",
    "trainable_parameters",
    "unmerge",
]
