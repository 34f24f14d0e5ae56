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
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np

from shoal.core.cluster import NodeTable
from shoal.core.plan import Running

_EPS = 1e-9
STEPS = 512  # most distinct release times a profile keeps (more are rounded up onto these)


class Releases:
    """When what holds room is expected to give it back: per holder (a task, or the copy a
    move is starting), its row, amount, start (NaN until it starts) and time limit (NaN: its
    queue's default). The ledger keeps it as tasks change, so that a cycle's profile is a
    few array operations rather than a walk over every task."""

    def __init__(self) -> None:
        self._slot: dict[str, int] = {}
        self._spare: list[int] = []
        self._queues: dict[str, int] = {}
        self.row = np.zeros(0, np.int64)
        self.start = np.zeros(0)
        self.limit = np.zeros(0)
        self.queue = np.zeros(0, np.int64)
        self.amount = np.zeros((0, 0))
        self.used = np.zeros(0, bool)

    @classmethod
    def of(cls, table: NodeTable, running: Iterable[Running]) -> Releases:
        book = cls()
        for i, r in enumerate(running):
            if (row := table.index.get(r.node)) is not None:
                book.put(str(i), row, table.vector(r.ask), r.started_at, r.time_limit, r.queue)
        return book

    def __len__(self) -> int:
        return len(self._slot)

    def put(
        self,
        key: str,
        row: int,
        amount: np.ndarray,
        started_at: float | None,
        limit: float | None,
        queue: str,
    ) -> None:
        """Record (or replace) what holder `key` holds."""
        slot = self._slot.get(key)
        if slot is None:
            slot = self._slot[key] = self._spare.pop() if self._spare else self._grow()
        if len(amount) > self.amount.shape[1]:
            wider = np.zeros((len(self.amount), len(amount)))
            wider[:, : self.amount.shape[1]] = self.amount
            self.amount = wider
        self.row[slot] = row
        self.amount[slot] = 0.0
        self.amount[slot, : len(amount)] = amount
        self.start[slot] = math.nan if started_at is None else started_at
        self.limit[slot] = math.nan if limit is None else limit
        self.queue[slot] = self._queues.setdefault(queue, len(self._queues))
        self.used[slot] = True

    def get(self, key: str) -> tuple[int, float | None] | None:
        """Holder `key`'s row and start, if the book has it."""
        if (slot := self._slot.get(key)) is None:
            return None
        start = float(self.start[slot])
        return int(self.row[slot]), None if math.isnan(start) else start

    def drop(self, key: str) -> None:
        if (slot := self._slot.pop(key, None)) is not None:
            self.used[slot] = False
            self._spare.append(slot)

    def _grow(self) -> int:
        size = len(self.used)
        more = max(64, size)
        self.row = np.concatenate([self.row, np.zeros(more, np.int64)])
        self.start = np.concatenate([self.start, np.zeros(more)])
        self.limit = np.concatenate([self.limit, np.zeros(more)])
        self.queue = np.concatenate([self.queue, np.zeros(more, np.int64)])
        self.amount = np.concatenate([self.amount, np.zeros((more, self.amount.shape[1]))])
        self.used = np.concatenate([self.used, np.zeros(more, bool)])
        self._spare.extend(range(size + more - 1, size, -1))
        return size

    def expected_ends(
        self, now: float, defaults: Mapping[str, float | None], width: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(ends, rows, amounts) of every holder with an end in sight: started ones at their
        start plus limit, the others at now plus limit; a holder without a limit of its own
        takes its queue's default, and without either holds its room for ever."""
        default = np.full(len(self._queues) + 1, math.nan)
        for name, index in self._queues.items():
            if (limit := defaults.get(name)) is not None:
                default[index] = limit
        limit = np.where(np.isnan(self.limit), default[self.queue], self.limit)
        ends = np.where(np.isnan(self.start), now, self.start) + limit
        keep = self.used & np.isfinite(ends)
        amounts = np.zeros((int(keep.sum()), width))
        amounts[:, : min(width, self.amount.shape[1])] = self.amount[keep, :width]
        return ends[keep], self.row[keep], amounts


@dataclass(frozen=True, slots=True)
class Slot:
    """Where a reservation holds room: `count` tasks of one ask on table row `row`."""

    row: int
    count: int


class Profile:
    """The room of every node from `now` on: `room[k]` holds from `times[k]` to the next
    breakpoint (the last for ever), over the dimensions `dims`."""

    def __init__(
        self,
        now: float,
        free: np.ndarray,
        ends: np.ndarray,
        rows: np.ndarray,
        amounts: np.ndarray,
        dims: np.ndarray,
    ) -> None:
        """`free`: the room on every row now (rows by the table's dims); `ends`, `rows`,
        `amounts`: what holds room gives it back when, where and how much (finite ends
        only). Only `dims` are followed: those someone waiting asks for (no other dimension
        can keep anyone waiting)."""
        # Work past its expected end still holds its room (it is being stopped, or its end
        # is not yet reported): it gives it back at the first moment after now.
        ends = _coarse(np.maximum(ends, np.nextafter(now, math.inf)), now)
        self.now = now
        self.dims = dims
        self.times = np.unique(np.concatenate([[now], ends]))
        steps = np.zeros((len(self.times), len(free), len(dims)))
        np.add.at(steps, (np.searchsorted(self.times, ends), rows), amounts[:, dims])
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
        pairs = list(rows)
        if len(pairs) == 1:
            row, count = pairs[0]
            self.room[first:last, row] -= count * amount[self.dims]
        elif pairs:
            where, counts = np.array(pairs, dtype=np.int64).T
            per_row = np.bincount(where, weights=counts, minlength=self.room.shape[1])
            touched = np.flatnonzero(per_row)
            self.room[first:last, touched] -= per_row[touched, np.newaxis] * amount[self.dims]
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
        fits = np.clip(fits, 0, room[rows])  # held room for evictions can leave a row short
        for k in np.flatnonzero(fits.sum(axis=1) >= count):
            start = float(self.times[k])
            end = len(self.times) if math.isinf(duration) else self._index_before(start + duration) + 1
            window = self.room[k:end][:, rows][:, :, need].min(axis=0)
            held = np.clip(np.floor(np.min((window + _EPS) / per, axis=1)), 0, room[rows])
            if held.sum() >= count:
                return start, _slots(rows, held, count)
        return None

    def _index_before(self, when: float) -> int:
        """The last breakpoint strictly before `when`."""
        return int(np.searchsorted(self.times, when, side="left")) - 1


def _coarse(ends: np.ndarray, now: float) -> np.ndarray:
    """`ends`, rounded up onto at most `STEPS` distinct times when there are more: a later
    release only makes backfill more careful, and the profile stays small on a large cluster."""
    if len(ends) <= STEPS or len(np.unique(ends)) <= STEPS:
        return ends
    step = (float(ends.max()) - now) / STEPS
    return now + np.ceil((ends - now) / step) * step


def _slots(rows: np.ndarray, held: np.ndarray, count: int) -> list[Slot]:
    """`count` tasks on the rows that hold the most (fewest rows held), ties by row."""
    order = np.argsort(-held, kind="stable")
    before = np.cumsum(held[order]) - held[order]  # tasks the rows ahead of each take
    used = order[before < count]
    takes = np.minimum(held[used], count - before[: len(used)])
    return [Slot(int(rows[j]), int(k)) for j, k in zip(used, takes, strict=True)]
