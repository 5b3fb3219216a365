"""A tiny named registry with "did you mean" lookups, used for methods, importances and backends."""
from __future__ import annotations

import difflib
from typing import Callable, Generic, TypeVar

from compressor.errors import CompressorError, UsageError

T = TypeVar("T")


def did_you_mean(name: str, choices: list[str] | tuple[str, ...]) -> str:
    """A ' (did you mean X?)' suffix for a misspelt name, or an empty string."""
    close = difflib.get_close_matches(str(name), list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


class Registry(Generic[T]):
    """Maps names to objects; `get` of an unknown name raises an error listing the known ones."""

    def __init__(self, kind: str, error: type[CompressorError] = UsageError) -> None:
        self.kind = kind
        self.error = error
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def decorate(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._items[name] = obj
            if isinstance(obj, type) and "name" not in vars(obj):
                obj.name = name  # a registered class knows the name it is registered under
            return obj

        return decorate

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            known = ", ".join(sorted(self._items))
            raise self.error(
                f"unknown {self.kind} {name!r}{did_you_mean(name, tuple(self._items))}; known: {known}."
            ) from None

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items
