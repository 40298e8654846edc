"""The task registry: every task registers itself here in one line (``@register``), like methods."""

from __future__ import annotations

from ..errors import DeltatuneError
from .base import Task

_TASKS: dict[str, type[Task]] = {}


def register(cls: type[Task]) -> type[Task]:
    """Class decorator: ``@register`` makes the task available by its ``name``."""
    if cls.name in _TASKS:
        raise ValueError(f"task {cls.name!r} registered twice")
    _TASKS[cls.name] = cls
    return cls


def get(name: str) -> type[Task]:
    """The task class (its attributes answer what differs between tasks; instances bind settings)."""
    if name not in _TASKS:
        raise DeltatuneError(f"unknown task {name!r}; available: {', '.join(names())}")
    return _TASKS[name]


def names() -> list[str]:
    return list(_TASKS)


def unregister(name: str) -> None:
    """Remove a task (tests that register a toy task clean up with this)."""
    _TASKS.pop(name, None)
