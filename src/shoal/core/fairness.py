"""Usage per queue and per user, and weighted dominant shares (DRF) over it.

A `UsageBook` is kept current by the ledger as tasks start and stop, so a scheduling cycle
starts from it in time proportional to the number of (queue, user) pairs, not of tasks.
A dominant share is the largest fraction of any resource of the cluster that an entity
holds, divided by its weight: the quantity weighted Dominant Resource Fairness equalizes.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping

import numpy as np

from shoal.core.cluster import NodeTable
from shoal.core.plan import Running


class UsageBook:
    def __init__(self) -> None:
        self.by_user: dict[tuple[str, str], np.ndarray] = {}

    @classmethod
    def of(cls, table: NodeTable, running: Iterable[Running]) -> UsageBook:
        book = cls()
        for r in running:
            book.add(r.queue, r.user, table.vector(r.ask))
        return book

    def add(self, queue: str, user: str, amount: np.ndarray) -> None:
        have = self.by_user.get((queue, user))
        if have is None or len(have) < len(amount):
            grown = np.zeros(len(amount))
            if have is not None:
                grown[: len(have)] = have
            have = self.by_user[(queue, user)] = grown
        have[: len(amount)] += amount

    def remove(self, queue: str, user: str, amount: np.ndarray) -> None:
        self.add(queue, user, -amount)


class Shares:
    """One cycle's view of usage: starts from the book, grows with the cycle's placements."""

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
        self.queue: dict[str, np.ndarray] = defaultdict(lambda: np.zeros(self._dims))
        self.user: dict[tuple[str, str], np.ndarray] = defaultdict(lambda: np.zeros(self._dims))
        for (queue, user), amount in book.by_user.items():
            self.add(queue, user, amount[: self._dims])

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
