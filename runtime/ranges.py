"""Numeric ranges of settings, each written once: a config dataclass checks its fields against theirs in
`__post_init__` (whoever builds it, the command line or a caller's code), and the command line parses the flag
that sets a field through the same range (an argparse type), so a bad flag still gets argparse's own error and
the config and the flag refuse the same values in the same words."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

from runtime.errors import BadInputError

RANGE = "range"  # the field metadata key that holds a field's Range


@dataclass(frozen=True)
class Range:
    flag: str  # the flag that sets the value (a setting no flag sets: its name), named in every message
    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False  # `low` itself is refused: the value must be greater

    def problem(self, value: float) -> str | None:
        """What is wrong with `value` (the words that follow it in a message), or None."""
        if math.isnan(value):
            return "is not a number"
        if self.low_open and not value > self.low:
            return f"must be greater than {self.low:g}"
        if value < self.low:
            return f"is too small; give {self.low:g} or more"
        if value > self.high:
            return f"is too large; give {self.high:g} or less"
        return None

    def check(self, value: float) -> None:
        problem = self.problem(value)
        if problem:
            raise BadInputError(f"{self.flag} {value:g} {problem}")

    def parser(self, kind: type = int) -> Callable[[str], Any]:
        """The flag's argparse type: text -> a `kind` within the range, else argparse's error for the flag."""
        def parse(text: str):
            try:
                value = kind(text)
            except ValueError:
                raise argparse.ArgumentTypeError(
                    f"{text!r} is not a{'n integer' if kind is int else ' number'}") from None
            problem = self.problem(value)
            if problem:
                raise argparse.ArgumentTypeError(f"{text} {problem}")
            return value
        return parse


def ranged(default: Any, flag: str, **bounds: Any) -> Any:
    """A dataclass field with a default and the range its values must keep (None always passes: unset)."""
    return field(default=default, metadata={RANGE: Range(flag, **bounds)})


def range_of(config_class: type, name: str) -> Range:
    """The range of one field, for the command line to parse its flag with."""
    return next(f.metadata[RANGE] for f in fields(config_class) if f.name == name)


def check_ranges(config: Any) -> None:
    """Every ranged field of a config dataclass within its range; BadInputError naming the flag otherwise."""
    for item in fields(config):
        value = getattr(config, item.name)
        if RANGE in item.metadata and value is not None:
            item.metadata[RANGE].check(value)
