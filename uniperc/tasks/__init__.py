"""Tasks as objects: what a head is trained for, one file per task, chosen by name.

A :class:`~uniperc.tasks.base.Task` holds everything that depends on what the outputs mean: the loss, the
metrics and the primary one, what a prediction looks like, which heads can produce it and the baselines a model
must beat. Heads, the trainer, ``uniperc.evaluate``, ``uniperc.predict`` and the benchmarks ask the task; specs,
checkpoints and ``metrics.json`` keep storing its name. Adding a task is one file in this package defining a
:class:`Task` subclass under ``@register_task("name")``: every module here is imported (and so registered) with
the package.
"""
import importlib as _importlib
import pkgutil as _pkgutil

from .base import Task
from .registry import get_task, list_tasks, register_task

for _module in _pkgutil.iter_modules(__path__):
    if _module.name not in ("base", "registry") and not _module.name.startswith("_"):
        _importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["Task", "get_task", "list_tasks", "register_task"]
