"""The problem registry: ``register(name)``, ``get(name, **kwargs)``, ``available()``."""

from __future__ import annotations

from collections.abc import Callable

from .base import Problem

__all__ = ["register", "get", "available"]

_REGISTRY: dict[str, type[Problem]] = {}


def register(name: str) -> Callable[[type[Problem]], type[Problem]]:
    """Class decorator: registers a :class:`Problem` subclass under ``name``.

    Raises ``ValueError`` if the name is taken by another class, ``TypeError`` if the
    class is not a ``Problem``.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"problem name must be a non-empty string, got {name!r}")

    def decorator(cls: type[Problem]) -> type[Problem]:
        if not (isinstance(cls, type) and issubclass(cls, Problem)):
            raise TypeError(f"register({name!r}) expects a Problem subclass, got {cls!r}")
        other = _REGISTRY.get(name)
        if other is not None and other.__qualname__ != cls.__qualname__:
            raise ValueError(f"problem name {name!r} is already registered to {other.__qualname__}")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorator


def get(name: str, **kwargs) -> Problem:
    """An instance of the problem registered as ``name``, built with ``kwargs``.

    Raises ``KeyError`` naming the available problems when ``name`` is unknown.
    """
    try:
        cls = _REGISTRY[name]
    except KeyError:
        raise KeyError(f"no problem registered as {name!r}; available: {available()}") from None
    return cls(**kwargs)


def available() -> list[str]:
    """Sorted names of the registered problems."""
    return sorted(_REGISTRY)
