"""The native scheduler: a pure function from the cluster and its queues to a plan.

    plan = schedule(table, masks, groups, running, policy, now)

Order of service, one cycle:
1. Queues take turns by weighted Dominant Resource Fairness: the queue whose usage, as a
   share of the cluster in its dominant resource and divided by its weight, is lowest goes
   next. Inside a queue, `fifo` serves jobs in submission order, `priority` highest first,
   and `fair` the user with the lowest weighted dominant share (so users interleave task by
   task).
2. Each turn places a slice of one job through `Placer` (masks, fit, strategy score). A job
   that cannot place its slice is set aside with the reason, and the jobs behind it go on.
3. Gangs place all their tasks or none.
4. Jobs set aside with a priority above some running preemptible work get evictions:
   `preemption.plan` picks the node needing the fewest, strictly lower-priority victims,
   and nominates a task of the job for that node. Later cycles hold a nominated task's room
   for it alone, so the victims, requeued, cannot take it back.

`apply_plan` then re-checks every placement against the table as it is now, accepts what
still fits (allocating it), and rejects stale parts with a reason. No I/O, no clock, no
randomness: the same inputs give the same plan.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from shoal.core import preemption
from shoal.core.cluster import MaskCache, NodeTable
from shoal.core.fairness import Shares, UsageBook
from shoal.core.placement import Group, Placer
from shoal.core.plan import Eviction, Placement, Plan, Running
from shoal.model import Resources, Strategy

STALE = "node no longer has room (stale plan)"
UNKNOWN_NODE = "node is not schedulable"
SLICE = 32  # tasks a job places per turn while other queues or users wait


@dataclass(frozen=True, slots=True)
class QueuePolicy:
    """How one queue orders its jobs. `priority` (the default) is FIFO among equal priorities;
    strict `fifo` ignores priority, so preemption cannot help its jobs (the victims, older,
    would take the room back)."""

    order: Literal["fifo", "priority", "fair"] = "priority"
    weight: float = 1.0


@dataclass(frozen=True, slots=True)
class Policy:
    queues: Mapping[str, QueuePolicy] = field(default_factory=lambda: {"default": QueuePolicy()})
    user_weights: Mapping[str, float] = field(default_factory=dict)
    strategy: Strategy = Strategy.SPREAD
    preemption: bool = True
    window: int = 4096  # candidate rows scored per turn on large clusters


class _Queue:
    """The groups of one queue, in its order; `fair` queues keep a line per user."""

    def __init__(self, name: str, order: str, groups: list[Group]) -> None:
        self.name = name
        self.fair = order == "fair"
        key = (lambda g: g.job_id) if order == "fifo" else (lambda g: (-g.priority, g.job_id))
        self.lines: dict[str, list[Group]] = defaultdict(list)
        for g in sorted(groups, key=key):
            self.lines[g.user if self.fair else ""].append(g)

    def __bool__(self) -> bool:
        return any(self.lines.values())

    def head(self, shares: Shares) -> Group:
        if not self.fair:
            return self.lines[""][0]
        live = [u for u, line in self.lines.items() if line]
        user = min(live, key=lambda u: (shares.of_user(self.name, u), u))
        return self.lines[user][0]

    def drop(self, g: Group) -> None:
        self.lines[g.user if self.fair else ""].remove(g)


def schedule(
    table: NodeTable,
    masks: MaskCache,
    groups: Sequence[Group],
    usage: UsageBook,
    running: Iterable[Running],
    policy: Policy,
    now: float,
) -> Plan:
    """Decide where pending tasks go (and what to evict for them) on this cycle.

    `usage` is what runs now, per queue and user; `running` lists those tasks one by one
    and is only walked when some job needs preemption.
    """
    del now  # the plan does not depend on the time yet; it is part of the contract
    placer = Placer(table, masks, policy.window)
    weights = {name: q.weight for name, q in policy.queues.items()}
    shares = Shares(table, usage, weights, policy.user_weights)
    by_queue: dict[str, list[Group]] = defaultdict(list)
    for g in groups:
        by_queue[g.queue].append(g)
    queues = [
        _Queue(name, policy.queues.get(name, QueuePolicy()).order, gs) for name, gs in sorted(by_queue.items())
    ]
    remaining = {g.job_id: list(g.tasks) for g in groups}
    # Room that evictions made for a nominated task is held for it: no one else may take it.
    held: dict[int, Counter[int]] = {g.job_id: Counter(table.index[n] for _, n in g.nominated) for g in groups}
    for g in groups:
        for row, count in held[g.job_id].items():
            placer.take(row, count * table.vector(g.ask))
    placements: list[Placement] = []
    waiting: dict[int, str] = {}
    blocked: list[Group] = []
    while live := [q for q in queues if q]:
        queue = min(live, key=lambda q: (shares.of_queue(q.name), q.name))
        g = queue.head(shares)
        ask = table.vector(g.ask)
        todo = remaining[g.job_id]
        want = len(todo) if g.gang or (len(live) == 1 and not queue.fair) else min(len(todo), 1 if queue.fair else SLICE)
        own = held[g.job_id]
        for row, count in own.items():
            placer.take(row, -count * ask)
        got = placer.place(g, want, g.strategy or policy.strategy, ask)
        for row, k in got:
            own[row] = max(0, own[row] - k)
        for row, count in own.items():
            placer.take(row, count * ask)
        placed = sum(k for _, k in got)
        if g.gang and placed < len(todo):
            placer.undo(got, g, ask)
            waiting[g.job_id] = f"gang: {placed} of {len(todo)} tasks fit now; {placer.explain(g, ask)}"
            queue.drop(g)
            continue
        for row, k in got:
            node = table.names[row]
            placements.extend(Placement(t, node, g.ask) for t in todo[:k])
            del todo[:k]
            shares.add(g.queue, g.user, k * ask)
        if not todo:
            queue.drop(g)
        elif placed < want:
            waiting[g.job_id] = placer.explain(g, ask)
            blocked.append(g)
            queue.drop(g)
    evictions: list[Eviction] = []
    nominations: list[tuple[str, str]] = []
    blocked = [g for g in blocked if policy.queues.get(g.queue, QueuePolicy()).order != "fifo"]
    if policy.preemption and blocked:
        evictions, nominations = preemption.plan(placer, blocked, remaining, list(running), waiting)
    return Plan(tuple(placements), tuple(evictions), tuple(nominations), waiting)


@dataclass(frozen=True, slots=True)
class Verdict:
    accepted: tuple[Placement, ...]
    rejected: dict[str, str]


def apply_plan(table: NodeTable, plan: Plan) -> Verdict:
    """Allocate every placement of `plan` that still fits the table now; reject the rest."""
    if not plan.placements:
        return Verdict((), {})
    vectors: dict[int, np.ndarray] = {}  # the tasks of a job share one Resources object
    for p in plan.placements:
        if id(p.resources) not in vectors:
            vectors[id(p.resources)] = table.vector(p.resources)
    rows = np.array([table.index.get(p.node, -1) for p in plan.placements])
    asks = np.array([vectors[id(p.resources)] for p in plan.placements])
    if rows.min() >= 0 and table.schedulable[rows].all():
        wanted = np.zeros((len(table), asks.shape[1]))
        np.add.at(wanted, rows, asks)
        touched = np.unique(rows)
        if np.all(table.capacity[touched] - table.allocated[touched] - wanted[touched] + 1e-9 >= 0):
            table.allocate_many(rows, asks)  # the usual case: all of it still fits
            return Verdict(plan.placements, {})
    return _apply_one_by_one(table, plan, rows, asks)


def _apply_one_by_one(table: NodeTable, plan: Plan, rows: np.ndarray, asks: np.ndarray) -> Verdict:
    accepted: list[Placement] = []
    rejected: dict[str, str] = {}
    for p, row, vec in zip(plan.placements, rows, asks, strict=True):
        if row < 0 or not table.schedulable[row]:
            rejected[p.task_id] = UNKNOWN_NODE
        elif np.any(table.capacity[row] - table.allocated[row] + 1e-9 < vec):
            rejected[p.task_id] = STALE
        else:
            table.allocate(int(row), vec)
            accepted.append(p)
    return Verdict(tuple(accepted), rejected)


def never_fits(table: NodeTable, ask: Resources) -> str | None:
    """A reason if no node of `table`, even empty, could ever hold `ask`; None if one could."""
    if len(table) == 0:
        return None  # with no node registered yet the ask waits for one
    vec = table.vector(ask)
    if table.fits_somewhere(vec):
        return None
    most = table.capacity.max(axis=0)
    for d, dim in enumerate(table.dims):
        if vec[d] > most[d] + 1e-9:
            return f"unschedulable: needs {vec[d]:g} {_UNIT.get(dim, dim)}, the largest node has {most[d]:g}"
    return "unschedulable: no single node has all of the resources asked for"


_UNIT = {"cpus": "cpus", "mem": "MiB of memory", "disk": "MiB of disk", "gpus": "gpus"}
