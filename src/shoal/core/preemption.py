"""Preemption: make room for waiting work by evicting preemptible tasks, on the node where
that takes the fewest victims.

A victim is always preemptible, and either of strictly lower priority than the job it makes
room for, or (giving capacity back) of a queue beyond its guarantee while the job's queue is
below its own. Tasks already being evicted count as room that is coming, so a later cycle
does not evict more for the same need while the first victims are still stopping. The
preempting job is not placed in the same plan: it takes the freed room in a later cycle,
when the victims have really stopped.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from shoal.core.cluster import NodeTable
from shoal.core.placement import Group, Placer
from shoal.core.plan import Eviction, Running

_EPS = 1e-9
MAX_PER_JOB = 256  # tasks of one job that preemption makes room for per cycle


@dataclass(frozen=True, slots=True)
class Rule:
    """Which queues may take back capacity, and from whom."""

    starved: frozenset[str] = frozenset()  # below their guarantee
    borrowers: frozenset[str] = frozenset()  # beyond their guarantee

    def may_evict(self, g: Group, victim: Running) -> bool:
        if victim.priority < g.priority:
            return True
        return g.queue in self.starved and victim.queue in self.borrowers and victim.queue != g.queue


class _Pool:
    """The preemptible running tasks, flat: each one's row, resources, priority and queue,
    ordered by row, then as victims are taken on a row: the largest share of its node first
    (fewer victims), then lower priorities, then by task id."""

    def __init__(self, table: NodeTable, running: Sequence[Running], dims: int) -> None:
        self.coming = np.zeros((len(table), dims))  # room that evictions under way will free
        asks: dict[int, np.ndarray] = {}  # a job's tasks share one Resources: one vector each
        found: list[tuple[int, np.ndarray, Running]] = []
        for r in running:
            row = table.index.get(r.node)
            if row is None:
                continue
            vec = asks.get(id(r.ask))
            if vec is None:
                vec = asks[id(r.ask)] = np.zeros(dims)
                v = table.vector(r.ask)
                vec[: min(dims, len(v))] = v[:dims]
            if r.evicting:
                self.coming[row] += vec
            elif r.preemptible:
                found.append((row, vec, r))
        rows = np.array([row for row, _, _ in found], dtype=np.int64)
        vecs = np.array([vec for _, vec, _ in found]).reshape(len(found), dims)
        sizes = np.max(vecs * table.inverse_capacity()[rows, :dims], axis=1, initial=0.0).tolist()
        order = sorted(
            range(len(found)),
            key=lambda i: (found[i][0], -sizes[i], found[i][2].priority, found[i][2].task_id),
        )
        self.running = [found[i][2] for i in order]
        self.row = rows[order]
        self.vec = vecs[order]
        self.priority = np.array([r.priority for r in self.running])
        self.queue = np.array([r.queue for r in self.running], dtype=object)
        self.alive = np.ones(len(order), dtype=bool)

    def lowest(self) -> int | None:
        alive = self.priority[self.alive]
        return int(alive.min()) if len(alive) else None

    def eligible(self, g: Group, rule: Rule) -> np.ndarray:
        """Which victims `g` may evict (`Rule.may_evict`, for all at once)."""
        ok = self.priority < g.priority
        if g.queue in rule.starved:
            ok |= np.isin(self.queue, list(rule.borrowers - {g.queue}))
        return ok & self.alive


def _may_act(blocked: Sequence[Group], running: Sequence[Running], rule: Rule) -> bool:
    """Whether some blocked group may evict something or wait on an eviction under way: the
    test of the loop below, made before the pool of victims is built (most cycles fail it)."""
    if any(g.nominated or (g.queue in rule.starved and rule.borrowers - {g.queue}) for g in blocked):
        return True
    lowest = min((r.priority for r in running if r.preemptible and not r.evicting), default=None)
    top = max(g.priority for g in blocked)
    return (lowest is not None and top > lowest) or any(r.evicting for r in running)


def plan(
    placer: Placer,
    blocked: Sequence[Group],
    remaining: dict[int, list[str]],
    running: Sequence[Running],
    waiting: dict[int, str],
    rule: Rule = Rule(),
) -> tuple[list[Eviction], list[tuple[str, str]]]:
    """Evictions for the blocked groups, and the (task, node) nominations they make room for.

    `placer` already holds back the room of earlier nominations; `coming` is the room
    that evictions under way will free.
    """
    if not _may_act(blocked, running, rule):
        return [], []
    table = placer.table
    dims = len(table.dims)
    pool = _Pool(table, running, dims)
    coming = pool.coming
    lowest = pool.lowest()
    evictions: list[Eviction] = []
    nominations: list[tuple[str, str]] = []
    for g in sorted(blocked, key=lambda g: (-g.priority, g.job_id)):
        may_take_back = g.queue in rule.starved and bool(rule.borrowers - {g.queue})
        if (
            (lowest is None or g.priority <= lowest)
            and not may_take_back
            and not g.nominated
            and not coming.any()
        ):
            continue  # nothing it may evict, and no room on its way
        ask = table.vector(g.ask)[:dims]
        already = {task for task, _ in g.nominated}
        unserved = [t for t in remaining[g.job_id] if t not in already][:MAX_PER_JOB]
        evicted = nominated = 0
        choices = _Choices(pool, pool.eligible(g, rule), placer.static_mask(g), table.free, ask)
        for task in unserved:
            choice = choices.best()
            if choice is None:
                break
            row, chosen = choice
            evictions.extend(
                Eviction(pool.running[j].task_id, pool.running[j].node, g.job_id) for j in chosen
            )
            pool.alive[chosen] = False
            coming[row] += pool.vec[chosen].sum(axis=0) - ask  # freed, and spoken for
            choices.taken(row, len(chosen))
            if g.presence is not None and g.presence.one_per_node:
                choices.drop(row)  # its next task may not join this one there
            nominations.append((task, table.names[row]))
            evicted += len(chosen)
            nominated += 1
        if evicted:
            waiting[g.job_id] = f"preempting {evicted} task{'s' if evicted != 1 else ''} to make room"
        elif already or nominated:
            waiting[g.job_id] = "waiting for preempted tasks to stop"
    return evictions, nominations


class _Choices:
    """Where one job's tasks may get room by evictions: the row needing the fewest victims
    (then the lowest priorities, then the lowest row) to hold `ask`. Every candidate row is
    judged at once: per row, the running sums of its victims' resources and priorities in
    the order they are taken, padded to the longest row."""

    def __init__(
        self, pool: _Pool, eligible: np.ndarray, mask: np.ndarray, free: np.ndarray, ask: np.ndarray
    ) -> None:
        self.pool = pool
        self.ask = ask
        candidates = np.union1d(pool.row[pool.alive], np.flatnonzero(pool.coming.any(axis=1)))
        self.rows = candidates[mask[candidates]]
        members = np.flatnonzero(eligible & np.isin(pool.row, self.rows))  # grouped by row
        slot = np.searchsorted(self.rows, pool.row[members])
        self.count = np.bincount(slot, minlength=len(self.rows))
        self.start = np.concatenate(([0], np.cumsum(self.count)[:-1])).astype(np.int64)
        self.members = members
        self.taken_at = np.zeros(len(self.rows), dtype=np.int64)
        self.room = free[self.rows, : len(ask)] + pool.coming[self.rows]
        depth = int(self.count.max(initial=0))
        position = np.arange(len(members)) - self.start[slot]
        self.sums = np.zeros((len(self.rows), depth, len(ask)))
        self.priorities = np.zeros((len(self.rows), depth))
        self.sums[slot, position] = pool.vec[members]
        self.priorities[slot, position] = pool.priority[members]
        np.cumsum(self.sums, axis=1, out=self.sums)
        np.cumsum(self.priorities, axis=1, out=self.priorities)
        self.sums[np.arange(depth)[None, :] >= self.count[:, None]] = -np.inf  # padding: never enough

    def best(self) -> tuple[int, np.ndarray] | None:
        """The row and the victims (pool indices) of the best choice; None if there is none."""
        if not len(self.rows):
            return None
        short = self.ask - self.room
        free = np.all(short <= _EPS, axis=1)
        if free.any():
            return int(self.rows[int(np.argmax(free))]), np.zeros(0, dtype=np.int64)
        covers = np.all(self.sums + _EPS >= short[:, None, :], axis=2)  # rows x (victims - 1)
        able = np.flatnonzero(covers.any(axis=1))
        if not len(able):
            return None
        k = np.argmax(covers[able], axis=1)
        i = int(able[np.lexsort((self.rows[able], self.priorities[able, k], k))[0]])
        first = self.start[i] + self.taken_at[i]
        return int(self.rows[i]), self.members[first : first + int(np.argmax(covers[i])) + 1]

    def drop(self, row: int) -> None:
        """`row` is no choice any more: no victims there make room enough."""
        i = int(np.searchsorted(self.rows, row))
        self.room[i] = -np.inf

    def taken(self, row: int, victims: int) -> None:
        """A choice on `row` was made: its first `victims` are gone, and `ask` is spoken for."""
        i = int(np.searchsorted(self.rows, row))
        first = self.start[i] + self.taken_at[i]
        self.room[i] += self.pool.vec[self.members[first : first + victims]].sum(axis=0) - self.ask
        if not victims:
            return
        self.taken_at[i] += victims
        left = self.members[first + victims : self.start[i] + self.count[i]]
        self.sums[i] = -np.inf
        self.priorities[i] = 0.0
        if len(left):
            self.sums[i, : len(left)] = np.cumsum(self.pool.vec[left], axis=0)
            self.priorities[i, : len(left)] = np.cumsum(self.pool.priority[left])
