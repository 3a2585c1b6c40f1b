"""A value's rule, declared once next to what it constrains, framework-free: the bottom of
the import tree, so bench/ and strategies/ read the same rules.

Constraint: a kind and bounds or choices, on a RunSpec field (`metadata={"check":
Constraint(minimum=1)}`, bench/config/spec.py) or a `pretrained:` parameter
(bench/config/pretrained.py).
Every check reads it; none restates it.

lookup: a name in a registry, or a KeyError naming the known ones (timm's create_model).

    >>> Constraint(int, minimum=1).problem(0)
    'must be >= 1'
    >>> Constraint(float, minimum=0, exclusive=True).rule()
    'a number > 0'
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")

# how each kind reads after "must be"
KIND_WORDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


@dataclass(frozen=True)
class Constraint:
    # bool, int, float or str; None on a RunSpec field, whose annotation gives it (spec.py)
    kind: type | None = None
    minimum: float | None = None
    exclusive: bool = False  # the minimum itself is refused (lr > 0)
    maximum: float | None = None
    open_max: bool = False  # the maximum itself is refused (a fraction < 1)
    choices: tuple = ()
    also: tuple = ()  # values allowed besides the kind ("auto"), each of its own type
    unit: str = ""  # what the number counts, for messages: "a number of minutes > 0"
    help: str = ""

    def with_kind(self, kind: type) -> Constraint:
        return self if self.kind is kind else dataclasses.replace(self, kind=kind)

    def kind_ok(self, v) -> bool:
        """A bool is never a number here (TOML `true` is not `1`); an int is a float."""
        if self.kind is None:
            return True
        if self.kind is bool:
            return isinstance(v, bool)
        if isinstance(v, bool):
            return False
        if self.kind is float:
            return isinstance(v, (int, float))
        return isinstance(v, self.kind)

    def bound_ok(self, v) -> bool:
        if self.minimum is not None and not (v > self.minimum if self.exclusive
                                             else v >= self.minimum):
            return False
        return self.maximum is None or (v < self.maximum if self.open_max else v <= self.maximum)

    def bound(self) -> str:
        """`>= 1`, `> 0`, `in [0, 255]`, `in [0, 1)`; empty without bounds."""
        if self.minimum is None and self.maximum is None:
            return ""
        if self.maximum is None:
            return f"{'>' if self.exclusive else '>='} {self.minimum}"
        if self.minimum is None:
            return f"{'<' if self.open_max else '<='} {self.maximum}"
        return (f"in {'(' if self.exclusive else '['}{self.minimum}, {self.maximum}"
                f"{')' if self.open_max else ']'}")

    def rule(self) -> str:
        """The whole constraint in one phrase, for messages that state it at once:
        `an integer >= 1`, `"auto" or true or false`."""
        kind = KIND_WORDS.get(self.kind, "")
        if kind and self.unit:
            kind = f"{kind} of {self.unit}"
        words = " ".join(s for s in (kind, self.bound()) if s)
        return " or ".join([*(_toml(a) for a in self.also), words])

    def problem(self, v) -> str | None:
        """None when `v` satisfies the constraint, else the first thing it breaks."""
        if any(type(v) is type(a) and v == a for a in self.also):
            return None
        if not self.kind_ok(v):
            return f"must be {self.rule() if self.also else KIND_WORDS[self.kind]}"
        if self.choices and v not in self.choices:
            return f"allowed: {', '.join(str(c) for c in self.choices)}"
        if not self.bound_ok(v):
            return f"must be {self.rule() if self.also else self.bound()}"
        return None

    def check(self, v) -> str | None:
        """None when `v` satisfies the constraint, else the whole rule at once, for messages
        that state it: `must be an integer >= 0 (<help>)`, `allowed: "auto" or true or false`."""
        if self.problem(v) is None:
            return None
        verb = "allowed:" if self.also else "must be"
        return f"{verb} {self.rule()}" + (f" ({self.help})" if self.help else "")


def _toml(v) -> str:
    """A value as a TOML file spells it: "auto", true."""
    if isinstance(v, bool):
        return "true" if v else "false"
    return f'"{v}"' if isinstance(v, str) else str(v)


def lookup(table: Mapping[str, T], name: str, what: str,
           error: type[KeyError] = KeyError) -> T:
    """`table[name]`, or `error` saying the `what` is unknown and listing the known names."""
    try:
        return table[name]
    except KeyError:
        raise error(f"unknown {what} {name!r}; known: {', '.join(sorted(table))}") from None
