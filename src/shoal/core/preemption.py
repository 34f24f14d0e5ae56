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

from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

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


@dataclass(frozen=True, slots=True)
class _Victim:
    running: Running
    vec: np.ndarray
    size: float  # its largest share of its node's capacity: big victims first means fewer


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
    table = placer.table
    dims = len(table.dims)
    pool: dict[int, list[_Victim]] = defaultdict(list)
    coming = np.zeros((len(table), dims))
    inverse = table.inverse_capacity()
    for r in running:
        row = table.index.get(r.node)
        if row is None:
            continue
        vec = np.zeros(dims)
        v = table.vector(r.ask)
        vec[: min(dims, len(v))] = v[:dims]
        if r.evicting:
            coming[row] += vec
        elif r.preemptible:
            pool[row].append(_Victim(r, vec, float(np.max(vec * inverse[row, :dims]))))
    for victims in pool.values():
        victims.sort(key=lambda v: (-v.size, v.running.priority, v.running.task_id))
    lowest = min((v.running.priority for vs in pool.values() for v in vs), default=None)
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
        mask = placer.static_mask(g)
        already = {task for task, _ in g.nominated}
        unserved = [t for t in remaining[g.job_id] if t not in already][:MAX_PER_JOB]
        evicted = nominated = 0
        for task in unserved:
            choice = _choose(placer, pool, coming, mask, lambda v, g=g: rule.may_evict(g, v), ask)
            if choice is None:
                break
            row, chosen = choice
            for v in chosen:
                pool[row].remove(v)
                coming[row] += v.vec
                evictions.append(Eviction(v.running.task_id, v.running.node, g.job_id))
            coming[row] -= ask  # that room is spoken for
            nominations.append((task, table.names[row]))
            evicted += len(chosen)
            nominated += 1
        if evicted:
            waiting[g.job_id] = f"preempting {evicted} task{'s' if evicted != 1 else ''} to make room"
        elif already or nominated:
            waiting[g.job_id] = "waiting for preempted tasks to stop"
    return evictions, nominations


def _choose(
    placer: Placer,
    pool: dict[int, list[_Victim]],
    coming: np.ndarray,
    mask: np.ndarray,
    allowed: Callable[[Running], bool],
    ask: np.ndarray,
) -> tuple[int, list[_Victim]] | None:
    """The row needing the fewest victims (then the lowest priorities) to hold `ask`."""
    best: tuple[tuple[int, int, int], int, list[_Victim]] | None = None
    rows = {row for row, victims in pool.items() if victims} | set(
        np.flatnonzero(coming.any(axis=1)).tolist()
    )
    for row in sorted(rows):
        if not mask[row]:
            continue
        room = placer.free_at(row) + coming[row]
        victims = _fewest(room, ask, [v for v in pool.get(row, ()) if allowed(v.running)])
        if victims is None:
            continue
        key = (len(victims), sum(v.running.priority for v in victims), row)
        if best is None or key < best[0]:
            best = (key, row, victims)
            if not victims:
                break  # nothing beats room that needs no victim
    return None if best is None else (best[1], best[2])


def _fewest(room: np.ndarray, ask: np.ndarray, candidates: list[_Victim]) -> list[_Victim] | None:
    """The victims, largest first, that make `room` hold `ask`; None if all of them cannot."""
    short = ask - room
    if np.all(short <= _EPS):
        return []
    if candidates and np.any(sum(v.vec for v in candidates) + _EPS < short):
        return None
    chosen: list[_Victim] = []
    for v in candidates:
        chosen.append(v)
        short = short - v.vec
        if np.all(short <= _EPS):
            return chosen
    return None
