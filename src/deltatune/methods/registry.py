"""The method registry: every adaptation method registers itself here in one line."""

from __future__ import annotations

from .base import Method

_METHODS: dict[str, Method] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: ``@register`` makes the method available by its ``name``."""
    if cls.name in _METHODS:
        raise ValueError(f"method {cls.name!r} registered twice")
    _METHODS[cls.name] = cls()
    return cls


def get(name: str) -> Method:
    from ..errors import DeltatuneError

    if name not in _METHODS:
        raise DeltatuneError(f"unknown method {name!r}; available: {', '.join(names())}")
    return _METHODS[name]


def names() -> list[str]:
    return list(_METHODS)


def unregister(name: str) -> None:
    """Remove a method (tests that register a toy method clean up with this)."""
    _METHODS.pop(name, None)
