"""Backfill's view of the future: the room each node will have, as time limits tell.

A `Profile` is the free room of every node from now on, as a step function of time. What
holds room now gives it back at its expected end (its start plus its time limit); what a
cycle starts holds room from now to its own expected end; a reservation holds room from its
start to its end. A task of duration `d` may start now on a node only if the node has room
for it over the whole window [now, now + d): then it delays no reservation, which is EASY's
rule (a job either ends before the reservation starts or uses only room the reserved job
will not need) and conservative backfill's alike.

The profile is a matrix of breakpoints by nodes by resource dimensions, with a running
minimum over time beside it, so the room a window leaves is one lookup whatever the window.
Pure: no I/O, no clock.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

_EPS = 1e-9


@dataclass(frozen=True, slots=True)
class Slot:
    """Where a reservation holds room: `count` tasks of one ask on table row `row`."""

    row: int
    count: int


class Profile:
    def __init__(
        self,
        now: float,
        free: np.ndarray,
        releases: Iterable[tuple[float, int, np.ndarray]],
        dims: np.ndarray,
    ) -> None:
        """`free`: the room on every row now (rows by the table's dims); `releases`: (when,
        row, amount) for everything that holds room and has an expected end. Only `dims`
        are followed: those someone waiting asks for (no other can keep anyone waiting)."""
        later = [(max(when, now), row, amount) for when, row, amount in releases if math.isfinite(when)]
        self.now = now
        self.dims = dims
        self.times = np.unique(np.array([now] + [when for when, _, _ in later]))
        steps = np.zeros((len(self.times), len(free), len(dims)))
        if later:
            at = np.searchsorted(self.times, [when for when, _, _ in later])
            rows = np.fromiter((row for _, row, _ in later), np.int64, len(later))
            np.add.at(steps, (at, rows), np.array([amount[dims] for _, _, amount in later]))
        self.room = free[:, dims][np.newaxis] + np.cumsum(steps, axis=0)
        self._floor: np.ndarray | None = None  # the running minimum of `room` over time

    @property
    def floor(self) -> np.ndarray:
        """Breakpoint k's row: the least room each node has from now to that step's end. Made
        again after a hold, once: a cycle asks it for every job it serves, and holds seldom."""
        if self._floor is None:
            self._floor = np.minimum.accumulate(self.room, axis=0)
        return self._floor

    def _index(self, when: float) -> int:
        """The breakpoint at or before `when`."""
        return int(np.searchsorted(self.times, when, side="right")) - 1

    def _split(self, when: float) -> int:
        """The index of a breakpoint at `when`, made if missing (it repeats the step it cuts)."""
        k = self._index(when)
        if self.times[k] == when:
            return k
        self.times = np.insert(self.times, k + 1, when)
        self.room = np.insert(self.room, k + 1, self.room[k], axis=0)
        return k + 1

    def room_for(self, duration: float) -> np.ndarray:
        """The room on every row over [now, now + duration), in the followed dims: what a task
        may use now. A view."""
        if math.isinf(duration):
            return self.floor[-1]
        return self.floor[max(0, int(np.searchsorted(self.times, self.now + duration, side="left")) - 1)]

    def hold(
        self, rows: Iterable[tuple[int, int]], amount: np.ndarray, start: float, duration: float
    ) -> None:
        """Take `count` x `amount` on each (row, count) over [start, start + duration)."""
        first = self._split(start)
        last = len(self.times) if math.isinf(duration) else self._split(start + duration)
        amount = amount[self.dims]
        for row, count in rows:
            self.room[first:last, row] -= count * amount
        self._floor = None

    def earliest(
        self, ask: np.ndarray, count: int, duration: float, rows: np.ndarray, room: np.ndarray
    ) -> tuple[float, list[Slot]] | None:
        """The first breakpoint from which `count` tasks of `ask` fit for `duration` on the
        candidate `rows` (each row holding at most `room[row]` more of them), and where;
        None if they never do (what holds room without an end holds it forever)."""
        ask = ask[self.dims]
        need = np.flatnonzero(ask > _EPS)
        if len(need) == 0 or len(rows) == 0:
            return None if len(rows) == 0 else (self.now, [Slot(int(rows[0]), count)])
        per = ask[need]
        # Tasks each breakpoint's room holds on each row: an upper bound for any window from it.
        fits = np.floor(np.min((self.room[:, rows][:, :, need] + _EPS) / per, axis=2))
        fits = np.minimum(fits, room[rows])
        for k in np.flatnonzero(fits.sum(axis=1) >= count):
            start = float(self.times[k])
            end = len(self.times) if math.isinf(duration) else self._index_before(start + duration) + 1
            window = self.room[k:end][:, rows][:, :, need].min(axis=0)
            held = np.minimum(np.floor(np.min((window + _EPS) / per, axis=1)), room[rows])
            if held.sum() >= count:
                return start, _slots(rows, held, count)
        return None

    def _index_before(self, when: float) -> int:
        """The last breakpoint strictly before `when`."""
        return int(np.searchsorted(self.times, when, side="left")) - 1


def _slots(rows: np.ndarray, held: np.ndarray, count: int) -> list[Slot]:
    """`count` tasks on the rows that hold the most (fewest rows held), ties by row."""
    order = np.argsort(-held, kind="stable")
    before = np.cumsum(held[order]) - held[order]  # tasks the rows ahead of each take
    used = order[before < count]
    takes = np.minimum(held[used], count - before[: len(used)])
    return [Slot(int(rows[j]), int(k)) for j, k in zip(used, takes, strict=True)]
