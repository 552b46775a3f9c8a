"""A tiny generic registry: register named things with metadata, get them back, list them, build them.

Attacks, objectives, heatmaps, defenses, model builders and tokenizer kinds register here, so that the
page, the command lines and the tests pick up a new entry from its one registration
(docs/ARCHITECTURE.md, "Registries").
"""
from __future__ import annotations

import inspect
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

    def describe(self, name: str) -> str:
        """``label (paper)`` from the entry's metadata, for help texts (its name when it has no label)."""
        meta = self.meta(name)
        return meta.get("label", name) + (f" ({meta['paper']})" if meta.get("paper") else "")

    def parameters(self, name: str) -> list[str]:
        """The keyword settings the entry ``name`` takes (its constructor's or function's parameters)."""
        item = self.get(name)
        return [p.name for p in inspect.signature(item).parameters.values()
                if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]

    def build(self, name: str, /, **settings: Any) -> Any:
        """Call the entry ``name`` with the settings it takes; settings it does not take are left out, so
        one set of settings (say, a page's attack controls) serves every entry (FGSM takes no ``steps``).

        >>> attacks = Registry("attack")
        >>> _ = attacks.register("step", lambda eps, steps=1: (eps, steps))
        >>> attacks.build("step", eps=0.1, steps=3, seed=0)
        (0.1, 3)
        """
        item = self.get(name)
        if any(p.kind is p.VAR_KEYWORD for p in inspect.signature(item).parameters.values()):
            return item(**settings)  # an entry with **kwargs takes them all
        takes = self.parameters(name)
        return item(**{k: v for k, v in settings.items() if k in takes})

    def unregister(self, name: str) -> None:
        """Remove ``name`` (for throw-away entries in tests)."""
        key = str(name).lower()
        self._items.pop(key, None)
        self._meta.pop(key, None)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)
