"""Rules written beside the schema's fields, as dataclass field metadata:

    window_size: int = field(default=64, metadata=above(0))
    mechanism: str = field(default="window_linear", metadata=choices(Registry("linearize.attention", "MECHANISMS")))

`linearize.config.validate` reads them off the typed config. A name set is read from the one registry that
declares it (`Registry`): those live in higher layers that import torch, so the schema names them by
module path and they are imported only when a config is validated, never when the schema is.
"""
from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Optional

RULES = "rules"  # the metadata key


@dataclass(frozen=True)
class Registry:
    """The names of registry `attr` in module `module` (a mapping, a sequence, or a function returning
    one), then `extra` values."""

    module: str
    attr: str
    extra: tuple = ()

    def load(self) -> Any:
        """The registry object itself (e.g. a dict of name → entry)."""
        return getattr(importlib.import_module(self.module), self.attr)

    def __call__(self) -> tuple:
        names = self.load()
        return tuple(names() if callable(names) else names) + self.extra


def _shown(value: Any) -> str:
    return "null" if value is None else str(value)


def _items(value: Any, each: bool) -> Iterable[Any]:
    return (value or ()) if each else (value,)


@dataclass(frozen=True)
class Choices:
    """The value (each item, for a list) is one of `names()`."""

    names: Callable[[], Iterable[Any]]
    each: bool = False

    def problem(self, value: Any) -> Optional[str]:
        valid = tuple(self.names())
        for item in _items(value, self.each):
            if item not in valid:
                what = "name" if self.each else "value"
                return f"unknown {what} {item!r}; valid: {', '.join(map(_shown, valid))}"
        return None


@dataclass(frozen=True)
class Range:
    """low ≤ value ≤ high (strict where `*_open`); either end may be absent. For a list, each item."""

    low: Optional[float] = None
    high: Optional[float] = None
    low_open: bool = False
    high_open: bool = False
    each: bool = False

    def text(self) -> str:
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        if self.low is None:
            return f"{'<' if self.high_open else '<='} {self.high:g}"
        return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"

    def holds(self, x: float) -> bool:
        low_ok = self.low is None or (x > self.low if self.low_open else x >= self.low)
        high_ok = self.high is None or (x < self.high if self.high_open else x <= self.high)
        return low_ok and high_ok

    def problem(self, value: Any) -> Optional[str]:
        for item in _items(value, self.each):
            if item is not None and not self.holds(item):
                return f"must be {self.text()}, got {item}"
        return None


def rules(*parts: Any) -> dict:
    """Field metadata holding these rules (checked in order; the first broken one is reported)."""
    return {RULES: parts}


def choices(names: Callable[[], Iterable[Any]] | tuple, each: bool = False) -> dict:
    """One of a set of names: a tuple written here (the one declaration), or a `Registry`."""
    return rules(Choices(names if callable(names) else (lambda: names), each))


def above(low: float, each: bool = False) -> dict:
    return rules(Range(low, low_open=True, each=each))


def at_least(low: float, each: bool = False) -> dict:
    return rules(Range(low, each=each))


def in_range(low: float, high: float, *, low_open: bool = False, high_open: bool = False, each: bool = False) -> dict:
    return rules(Range(low, high, low_open, high_open, each))


def field_rules(metadata: Any) -> tuple:
    return tuple(metadata.get(RULES, ()))


def not_finite(value: Any) -> bool:
    """A float that is nan or ±inf (bools and ints are always finite)."""
    return isinstance(value, float) and not math.isfinite(value)
