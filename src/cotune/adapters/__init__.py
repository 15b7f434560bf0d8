"""Adapter families, the site contract, and attach / merge / save / load."""

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
from cotune.adapters.base import Adapter, AdapterConfig, register
from cotune.adapters.io import load_adapter, read_adapter_config, save_adapter

# Loading the subpackage ``cotune.adapters.families`` (registry.py does, at its top) binds it as an attribute of
# this package; this import runs after that and rebinds the name to the function.
from cotune.adapters.registry import families, get_family, make_config
from cotune.adapters.site import AdaptedModule

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
