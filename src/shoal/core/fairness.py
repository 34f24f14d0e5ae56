"""Usage per queue and per user, and weighted dominant shares (DRF) over it.

A `UsageBook` is kept current by the ledger as tasks start and stop, so a scheduling cycle
starts from it in time proportional to the number of (queue, user) pairs, not of tasks.
A dominant share is the largest fraction of any resource of the cluster that an entity
holds, divided by its weight: the quantity weighted Dominant Resource Fairness equalizes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import TypeVar

import numpy as np

from shoal.core.cluster import NodeTable
from shoal.core.plan import Running

K = TypeVar("K")


class UsageBook:
    def __init__(self) -> None:
        self.by_user: dict[tuple[str, str], np.ndarray] = {}
        self.by_queue: dict[str, np.ndarray] = {}

    @classmethod
    def of(cls, table: NodeTable, running: Iterable[Running]) -> UsageBook:
        book = cls()
        for r in running:
            book.add(r.queue, r.user, table.vector(r.ask))
        return book

    def add(self, queue: str, user: str, amount: np.ndarray) -> None:
        _grow(self.by_user, (queue, user), amount)
        _grow(self.by_queue, queue, amount)

    def remove(self, queue: str, user: str, amount: np.ndarray) -> None:
        self.add(queue, user, -amount)


def _grow(usage: dict[K, np.ndarray], key: K, amount: np.ndarray) -> None:
    """Add `amount` to `usage[key]`, widening it to the amount's dimensions."""
    have = usage.get(key)
    if have is None or len(have) < len(amount):
        grown = np.zeros(len(amount))
        if have is not None:
            grown[: len(have)] = have
        have = usage[key] = grown
    have[: len(amount)] += amount


class _Usage(dict[K, np.ndarray]):
    """Usage by key, each entry made from the book when first read."""

    def __init__(self, make: Callable[[K], np.ndarray]) -> None:
        super().__init__()
        self._make = make

    def __missing__(self, key: K) -> np.ndarray:
        usage = self[key] = self._make(key)
        return usage


class Shares:
    """One cycle's view of usage: starts from the book, grows with the cycle's placements.
    An entry is copied from the book when the cycle first reads it: a cycle reads a few
    queues and users, the book may hold many."""

    def __init__(
        self,
        table: NodeTable,
        book: UsageBook,
        queue_weights: Mapping[str, float],
        user_weights: Mapping[str, float],
    ) -> None:
        total = table.total()
        self._total = total
        self._inverse_total = np.divide(1.0, total, out=np.zeros_like(total), where=total > 0)
        self._dims = len(total)
        self._queue_weights = queue_weights
        self._user_weights = user_weights
        self._book = book
        self.queue: _Usage[str] = _Usage(self._queue_from_book)
        self.user: _Usage[tuple[str, str]] = _Usage(self._user_from_book)

    def _user_from_book(self, key: tuple[str, str]) -> np.ndarray:
        return self._copy(self._book.by_user.get(key))

    def _queue_from_book(self, queue: str) -> np.ndarray:
        return self._copy(self._book.by_queue.get(queue))

    def _copy(self, have: np.ndarray | None) -> np.ndarray:
        usage = np.zeros(self._dims)
        if have is not None:
            usage[: min(len(have), self._dims)] += have[: self._dims]
        return usage

    def queues(self) -> set[str]:
        """Every queue that holds something, or was given something this cycle."""
        return set(self._book.by_queue) | set(self.queue)

    def add(self, queue: str, user: str, amount: np.ndarray) -> None:
        self.queue[queue][: len(amount)] += amount
        self.user[(queue, user)][: len(amount)] += amount

    def _dominant(self, usage: np.ndarray) -> float:
        return float(np.max(usage * self._inverse_total, initial=0.0))

    def of_queue(self, queue: str) -> float:
        return self.share(queue) / self._queue_weights.get(queue, 1.0)

    def share(self, queue: str) -> float:
        """The queue's dominant share of the cluster, unweighted."""
        return self._dominant(self.queue[queue])

    def room_under(self, queue: str, limit: float, ask: np.ndarray) -> int:
        """How many more `ask`s the queue may take before its dominant share passes `limit`."""
        usage = self.queue[queue]
        room = limit * self._total - usage[: len(self._total)] + 1e-9
        need = ask[: len(self._total)] > 0
        if not need.any():
            return 1 << 30
        return max(0, int(np.floor(np.min(room[need] / ask[: len(self._total)][need]))))

    def of_user(self, queue: str, user: str) -> float:
        return self.dominant(queue, user) / self._user_weights.get(user, 1.0)

    def dominant(self, queue: str, user: str) -> float:
        """A user's dominant share of the cluster within `queue`, unweighted."""
        return self._dominant(self.user[(queue, user)])
