"""Token buckets: how many calls a caller may make, and when it may make the next. Pure:
the time is always given, so the arithmetic is tested without a clock.

A bucket fills at `rate` tokens a second up to `burst`; each call takes one. A caller
that keeps under `rate` is never refused; one that bursts may spend `burst` at once, then
`rate` a second. `Buckets` keeps one bucket per caller, at most `size` of them.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass

# Refills are sums of float products: a call spaced exactly 1/rate after the last finds a
# hair under one token. That hair is forgiven, not rounded up into a refusal.
_SLACK = 1e-9


@dataclass(slots=True)
class Bucket:
    rate: float  # tokens a second
    burst: float  # tokens held at most
    level: float  # tokens held at `stamp`
    stamp: float  # when `level` was last brought up to date

    @classmethod
    def full(cls, rate: float, burst: float, now: float) -> Bucket:
        return cls(rate, burst, burst, now)

    def _refill(self, now: float) -> None:
        # A clock that steps back gives nothing: the time is counted from the latest seen.
        if now > self.stamp:
            self.level = min(self.burst, self.level + (now - self.stamp) * self.rate)
            self.stamp = now

    def take(self, now: float) -> float:
        """Take one token: 0.0 when there was one; else the seconds until there will be,
        and nothing is taken."""
        self._refill(now)
        if self.level >= 1.0 - _SLACK:
            self.level -= 1.0
            return 0.0
        return (1.0 - self.level) / self.rate

    def empty(self, now: float) -> bool:
        """Whether a call now would be refused (nothing is taken)."""
        self._refill(now)
        return self.level < 1.0 - _SLACK


class Buckets:
    """A bucket per caller, made full at a caller's first call. Past `size` callers the
    least recently seen is forgotten (a flood of distinct callers costs bounded memory);
    a caller forgotten starts again with a full bucket."""

    def __init__(self, rate: float, burst: float, size: int) -> None:
        self.rate = rate
        self.burst = burst
        self.size = size
        self._table: OrderedDict[Hashable, Bucket] = OrderedDict()

    def __len__(self) -> int:
        return len(self._table)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._table

    def bucket(self, key: Hashable, now: float) -> Bucket:
        """`key`'s bucket, full if it had none; it becomes the most recently seen."""
        table = self._table
        found = table.get(key)
        if found is not None:
            table.move_to_end(key)
            return found
        made = table[key] = Bucket.full(self.rate, self.burst, now)
        if len(table) > self.size:
            table.popitem(last=False)
        return made

    def take(self, key: Hashable, now: float) -> float:
        """Take a token from `key`'s bucket: 0.0, or the seconds until it has one."""
        return self.bucket(key, now).take(now)

    def empty(self, key: Hashable, now: float) -> bool:
        """Whether `key`'s next call now would be refused (nothing is taken or made)."""
        found = self._table.get(key)
        return found is not None and found.empty(now)
