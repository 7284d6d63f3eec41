"""The task registry: every task a head can be trained for, chosen by the name stored in specs and checkpoints."""
from __future__ import annotations

from .._registry import register_into
from .base import Task

_TASKS: dict[str, type[Task]] = {}


def register_task(name: str):
    """Class decorator: make a :class:`~uniperc.tasks.base.Task` subclass available under ``name`` (which it
    gets as its ``name``), for heads, training, evaluation, prediction and the benchmarks alike."""

    def wrap(cls: type[Task]) -> type[Task]:
        register_into(_TASKS, "task", name)(cls)
        cls.name = name
        return cls

    return wrap


def get_task(name: str) -> Task:
    """The task registered under ``name``; ``ValueError`` listing the registered names otherwise."""
    if name not in _TASKS:
        raise ValueError(f"unknown task {name!r}; registered tasks: {list_tasks()}")
    return _TASKS[name]()


def list_tasks() -> list[str]:
    return sorted(_TASKS)
