"""Tasks as objects: what a head is trained for, one file per task, chosen by name.

A :class:`~uniperc.tasks.base.Task` holds everything that depends on what the outputs mean: the loss, the
metrics and the primary one, what a prediction looks like, which heads can produce it and the baselines a model
must beat. Heads, the trainer, ``uniperc.evaluate``, ``uniperc.predict`` and the benchmarks ask the task; specs,
checkpoints and ``metrics.json`` keep storing its name. Adding a task is one file here with
``@register_task("name")`` (imported below).
"""
from . import classification, multilabel, regression  # noqa: F401  (registration side effects)
from .base import Task
from .registry import get_task, list_tasks, register_task

__all__ = ["Task", "get_task", "list_tasks", "register_task"]
