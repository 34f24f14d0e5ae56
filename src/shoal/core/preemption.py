"""Priority preemption: make room for waiting work by evicting strictly lower-priority,
preemptible tasks, on the node where that takes the fewest victims.

Victims are only ever of strictly lower priority than the job they make room for, and only
preemptible ones. Tasks already being evicted count as room that is coming, so a later cycle
does not evict more for the same need while the first victims are still stopping. The
preempting job is not placed in the same plan: it takes the freed room in a later cycle,
when the victims have really stopped.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
import numpy as np

from shoal.core.cluster import NodeTable
from shoal.core.placement import Group, Placer
from shoal.core.plan import Eviction, Running

_EPS = 1e-9
MAX_PER_JOB = 256  # tasks of one job that preemption makes room for per cycle


def plan(
    placer: Placer,
    blocked: Sequence[Group],
    remaining: dict[int, list[str]],
    running: Sequence[Running],
    waiting: dict[int, str],
) -> tuple[list[Eviction], list[tuple[str, str]]]:
    """Evictions for the blocked groups, and the (task, node) nominations they make room for.

    `placer` already holds back the room of earlier nominations; `coming` is the room
    that evictions under way will free.
    """
    table = placer.table
    pool: dict[int, list[Running]] = defaultdict(list)
    coming = np.zeros((len(table), len(table.dims)))
    for r in running:
        row = table.index.get(r.node)
        if row is None:
            continue
        if r.evicting:
            coming[row, : len(table.vector(r.ask))] += table.vector(r.ask)
        elif r.preemptible:
            pool[row].append(r)
    evictions: list[Eviction] = []
    nominations: list[tuple[str, str]] = []
    for g in sorted(blocked, key=lambda g: (-g.priority, g.job_id)):
        ask = table.vector(g.ask)
        mask = placer.static_mask(g)
        already = {task for task, _ in g.nominated}
        unserved = [t for t in remaining[g.job_id] if t not in already][:MAX_PER_JOB]
        evicted = nominated = 0
        for task in unserved:
            choice = _choose(placer, pool, coming, mask, g.priority, ask)
            if choice is None:
                break
            row, victims = choice
            for v in victims:
                pool[row].remove(v)
                coming[row] += table.vector(v.ask)
                evictions.append(Eviction(v.task_id, v.node, g.job_id))
            coming[row] -= ask  # that room is spoken for
            nominations.append((task, table.names[row]))
            evicted += len(victims)
            nominated += 1
        if evicted:
            waiting[g.job_id] = f"preempting {evicted} lower-priority task{'s' if evicted != 1 else ''} to make room"
        elif already or nominated:
            waiting[g.job_id] = "waiting for preempted tasks to stop"
    return evictions, nominations


def _choose(
    placer: Placer,
    pool: dict[int, list[Running]],
    coming: np.ndarray,
    mask: np.ndarray,
    priority: int,
    ask: np.ndarray,
) -> tuple[int, list[Running]] | None:
    """The row needing the fewest victims (then the lowest priorities) to hold `ask`."""
    best: tuple[tuple[int, int, int], int, list[Running]] | None = None
    table = placer.table
    rows = set(pool) | set(np.flatnonzero(coming.any(axis=1)).tolist())
    for row in sorted(rows):
        if not mask[row]:
            continue
        room = placer.free_at(row) + coming[row][: len(placer.free_at(row))]
        if np.all(room + _EPS >= ask):
            victims: list[Running] = []
        else:
            victims = _fewest(table.capacity[row], room, ask, [v for v in pool.get(row, ()) if v.priority < priority], table)
            if victims is None:
                continue
        key = (len(victims), sum(v.priority for v in victims), row)
        if best is None or key < best[0]:
            best = (key, row, victims)
    return None if best is None else (best[1], best[2])


def _fewest(
    capacity: np.ndarray, room: np.ndarray, ask: np.ndarray, candidates: list[Running], table: NodeTable
) -> list[Running] | None:
    """Largest victims first (fewest of them), lower priority first among equals."""
    scale = np.where(capacity > 0, capacity, 1.0)

    def size(v: Running) -> float:
        vec = table.vector(v.ask)
        return float(np.max(vec / scale[: len(vec)]))

    chosen: list[Running] = []
    room = room.copy()
    for v in sorted(candidates, key=lambda v: (-size(v), v.priority, v.task_id)):
        if np.all(room + _EPS >= ask):
            break
        room[: len(table.vector(v.ask))] += table.vector(v.ask)
        chosen.append(v)
    return chosen if np.all(room + _EPS >= ask) else None
