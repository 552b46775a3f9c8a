"""A tiny generic registry: register named things with metadata, get them back, list them.

Attacks, objectives and (later) defenses register here so that the CLI, the UI dropdowns and
the tests pick up a new entry from one import line.
"""
from __future__ import annotations

from typing import Any, Callable, Generic, Iterator, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Name -> object, with free-form metadata used for filtering.

    >>> attacks = Registry("attack")
    >>> @attacks.register("fgsm", family="gradient")
    ... class FGSM: ...
    >>> attacks.get("FGSM") is FGSM
    True
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}
        self._meta: dict[str, dict[str, Any]] = {}

    def register(self, name: str, obj: T | None = None, **meta: Any) -> Callable[[T], T] | T:
        """Register ``obj`` under ``name`` (case-insensitive); usable as a decorator."""

        def add(item: T) -> T:
            key = name.lower()
            if key in self._items and self._items[key] is not item:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._items[key] = item
            self._meta[key] = dict(meta)
            return item

        return add if obj is None else add(obj)

    def get(self, name: str) -> T:
        key = str(name).lower()
        if key not in self._items:
            raise ValueError(f"unknown {self.kind} {name!r}; valid: {', '.join(self.list())}")
        return self._items[key]

    def meta(self, name: str) -> dict[str, Any]:
        self.get(name)
        return dict(self._meta[str(name).lower()])

    def list(self, **filters: Any) -> list[str]:
        """Registered names whose metadata equals every given filter (``None`` filters are ignored)."""
        return [
            k
            for k, m in self._meta.items()
            if all(v is None or m.get(f) == v for f, v in filters.items())
        ]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)
