"""A value's constraint, declared once next to what it constrains: a RunSpec field
(`metadata={"check": Constraint(minimum=1)}`, bench/spec.py) or a `pretrained:` parameter
(bench/pretrain.py). Every check reads it; none restates it.

    >>> Constraint(int, minimum=1).problem(0)
    'must be >= 1'
    >>> Constraint(float, minimum=0, exclusive=True).rule()
    'a number > 0'
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

# how each kind reads after "must be"
KIND_WORDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


@dataclass(frozen=True)
class Constraint:
    # bool, int, float or str; None on a RunSpec field, whose annotation gives it (spec.py)
    kind: type | None = None
    minimum: float | None = None
    exclusive: bool = False  # the minimum itself is refused (lr > 0)
    choices: tuple = ()
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
        if self.minimum is None:
            return True
        return v > self.minimum if self.exclusive else v >= self.minimum

    def bound(self) -> str:
        """`>= 1`, `> 0`; empty without a minimum."""
        if self.minimum is None:
            return ""
        return f"{'>' if self.exclusive else '>='} {self.minimum}"

    def rule(self) -> str:
        """The whole constraint in one phrase, for messages that state it at once:
        `an integer >= 1`."""
        return " ".join(s for s in (KIND_WORDS.get(self.kind, ""), self.bound()) if s)

    def problem(self, v) -> str | None:
        """None when `v` satisfies the constraint, else the first thing it breaks."""
        if not self.kind_ok(v):
            return f"must be {KIND_WORDS[self.kind]}"
        if self.choices and v not in self.choices:
            return f"allowed: {', '.join(str(c) for c in self.choices)}"
        if not self.bound_ok(v):
            return f"must be {self.bound()}"
        return None
