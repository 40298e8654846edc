"""Which method trains which task: the one place that asks both sides.

Methods and tasks sit side by side in one layer and do not import each other; each says, from
the other's attributes, what it cannot work with (``Method.accepts``, ``Task.accepts``). This
module sits above both and combines the answers for config validation, `deltatune methods`
and tests.
"""

from __future__ import annotations

from .methods.base import Method
from .tasks import registry as tasks
from .tasks.base import Task


def supports(method: Method, task: type[Task]) -> str | None:
    """Why ``method`` (from ``methods.registry``) cannot train ``task`` (a class from
    ``tasks.registry``), or None when it can."""
    return method.accepts(task) or task.accepts(method)


def tasks_of(method: Method) -> list[str]:
    """The names of the registered tasks ``method`` can train, in registry order."""
    return [name for name in tasks.names() if supports(method, tasks.get(name)) is None]

