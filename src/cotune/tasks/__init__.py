"""Tasks: data loading in the published formats, collation, losses and metrics.

``make_task(kind, data, model=None, **options)`` is the entry point; see :mod:`cotune.tasks.base` for the
interface and options, :mod:`cotune.tasks.catalog` for how ``data`` is resolved and how held-out splits are
carved (:mod:`cotune.tasks.dataset` carves them), :mod:`cotune.tasks.formats` for the file formats,
:mod:`cotune.tasks.metrics` for the metrics.
"""

from cotune.tasks.base import TASK_TYPES, Split, Task, make_task, to_device
from cotune.tasks.catalog import DataSet, resolve_data

__all__ = ["TASK_TYPES", "DataSet", "Split", "Task", "make_task", "resolve_data", "to_device"]
