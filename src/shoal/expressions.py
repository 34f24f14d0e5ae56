"""Constraint expressions on node attributes: parsing and matching.

An expression is `ATTRIBUTE OP VALUE`:

    rack == r1              rack != r1
    arch in x86_64,aarch64  arch not in armv7l
    cpu_model =~ ^Intel     hostname !~ ^login     (regular expressions, searched)
    kernel >= 5.10          version comparisons: <, <=, >, >= (numeric parts compared as numbers;
                            a value with no version in it compares false)

A node that lacks the attribute fails every operator but `!=`, `not in` and `!~`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

_VERSION_OPS: dict[str, Callable[[tuple, tuple], bool]] = {
    "<": lambda a, b: a < b,
    "<=": lambda a, b: a <= b,
    ">": lambda a, b: a > b,
    ">=": lambda a, b: a >= b,
}
_NEGATIVE = ("!=", "not in", "!~")
_PATTERN = re.compile(r"^\s*([A-Za-z_][\w.-]*)\s+(==|!=|not\s+in|in|=~|!~|<=|>=|<|>)\s+(.+?)\s*$")


@dataclass(frozen=True, slots=True)
class Constraint:
    attribute: str
    op: str
    value: str
    values: frozenset[str] = field(default=frozenset(), compare=False)

    def __str__(self) -> str:
        return f"{self.attribute} {self.op} {self.value}"

    def matches(self, attributes: Mapping[str, str]) -> bool:
        have = attributes.get(self.attribute)
        if have is None:
            return self.op in _NEGATIVE
        match self.op:
            case "==":
                return have == self.value
            case "!=":
                return have != self.value
            case "in":
                return have in self.values
            case "not in":
                return have not in self.values
            case "=~":
                return re.search(self.value, have) is not None
            case "!~":
                return re.search(self.value, have) is None
            case _:
                ours, theirs = version_key(have), version_key(self.value)
                return bool(ours and theirs) and _VERSION_OPS[self.op](ours, theirs)


def parse(expression: str) -> Constraint:
    """A constraint from its text; ValueError saying what is wrong otherwise."""
    m = _PATTERN.match(expression)
    if m is None:
        raise ValueError(f"{expression!r} is not ATTRIBUTE OP VALUE (ops: == != in 'not in' =~ !~ < <= > >=)")
    attribute, op, value = m.group(1), " ".join(m.group(2).split()), m.group(3)
    if op in ("in", "not in"):
        items = [v.strip() for v in value.strip("[]").split(",") if v.strip()]
        if not items:
            raise ValueError(f"{expression!r}: '{op}' needs a comma-separated list of values")
        return Constraint(attribute, op, ",".join(items), frozenset(items))
    if op in ("=~", "!~"):
        try:
            re.compile(value)
        except re.error as e:
            raise ValueError(f"{expression!r}: bad regular expression: {e}") from None
    return Constraint(attribute, op, value)


def version_key(text: str) -> tuple:
    """Order versions as people do: numeric parts as numbers (5.10 > 5.9)."""
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.findall(r"\d+|[A-Za-z]+", text))
