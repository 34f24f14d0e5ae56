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
   Backfill (EASY): the first job set aside gets a reservation on the node whose running
   tasks' time limits free room for it soonest; later jobs may use that room only if their
   own time limit ends them before the reservation starts.
4. Jobs set aside get evictions (`preemption.plan`) when there is something they may
   evict: strictly lower-priority preemptible work, or, for a queue below its guarantee,
   the preemptible work of queues beyond theirs. It picks the node needing the fewest
   victims and nominates a task of the job for it; later cycles hold a nominated task's
   room for it alone, so the victims, requeued, cannot take it back.

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
    """How one queue orders its jobs, and its part of the cluster.

    `priority` (the default) is FIFO among equal priorities; `fifo` ignores priority.
    Capacity, as in YARN's capacity scheduler: a queue below its `guarantee` (a dominant
    share of the cluster) is served before the others and may take back what borrowers hold
    beyond their own guarantees; a queue never holds more than its `limit`. Between those, a
    queue borrows what others leave idle."""

    order: Literal["fifo", "priority", "fair"] = "priority"
    weight: float = 1.0
    guarantee: float = 0.0
    limit: float = 1.0


@dataclass(frozen=True, slots=True)
class Policy:
    queues: Mapping[str, QueuePolicy] = field(default_factory=lambda: {"default": QueuePolicy()})
    user_weights: Mapping[str, float] = field(default_factory=dict)
    strategy: Strategy = Strategy.SPREAD
    preemption: bool = True
    window: int = 4096  # candidate rows scored per turn on large clusters

    def queue(self, name: str) -> QueuePolicy:
        """The policy of queue `name`; a queue not configured has the defaults."""
        return self.queues.get(name) or _UNCONFIGURED


_UNCONFIGURED = QueuePolicy()


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
    cycle = _Cycle(table, masks, groups, usage, _Lazy(running), policy, now)
    by_queue: dict[str, list[Group]] = defaultdict(list)
    for g in groups:
        by_queue[g.queue].append(g)
    queues = [_Queue(name, policy.queue(name).order, gs) for name, gs in sorted(by_queue.items())]
    evictions: list[Eviction] = []
    nominations: list[tuple[str, str]] = []
    try:
        while live := [q for q in queues if q]:
            cycle.serve(live[0] if len(live) == 1 else min(live, key=cycle.turn_order), alone=len(live) == 1)
        if policy.preemption and cycle.blocked:
            evictions, nominations = preemption.plan(
                cycle.placer,
                cycle.blocked,
                cycle.remaining,
                cycle.running(),
                cycle.waiting,
                _give_back(Shares(table, usage, cycle.queue_weights, policy.user_weights), queues, policy),
            )
    finally:
        cycle.placer.restore()
    r = cycle.reservation
    reserved = (r.job_id, table.names[r.row], r.start) if r is not None else None
    return Plan(tuple(cycle.placements), tuple(evictions), tuple(nominations), reserved, cycle.waiting)


def _give_back(shares: Shares, queues: list[_Queue], policy: Policy) -> preemption.Rule:
    """Who is below and who beyond their guarantee, by `shares` as the cycle started."""

    def guarantee(name: str) -> float:
        return policy.queue(name).guarantee

    return preemption.Rule(
        starved=frozenset(q.name for q in queues if shares.share(q.name) < guarantee(q.name)),
        borrowers=frozenset(n for n in shares.queue if shares.share(n) > guarantee(n) + 1e-9),
    )


class _Lazy:
    """The running tasks, listed only if some decision needs them one by one."""

    def __init__(self, running: Iterable[Running]) -> None:
        self._source = running
        self._list: list[Running] | None = None

    def __call__(self) -> list[Running]:
        if self._list is None:
            self._list = list(self._source)
        return self._list


@dataclass(frozen=True, slots=True)
class _Reservation:
    """Room held on one node for the first job that could not start, from `start` on."""

    job_id: int
    row: int
    ask: np.ndarray
    start: float


class _Cycle:
    """The working state of one scheduling cycle."""

    def __init__(
        self,
        table: NodeTable,
        masks: MaskCache,
        groups: Sequence[Group],
        usage: UsageBook,
        running: _Lazy,
        policy: Policy,
        now: float,
    ) -> None:
        self.table = table
        self.policy = policy
        self.now = now
        self.running = running
        self.reservation: _Reservation | None = None
        # Every ask as a table row, made once per job for the whole cycle.
        self.asks = {g.job_id: table.vector(g.ask) for g in groups}
        self.placer = Placer(table, masks, policy.window)
        self.queue_weights = {n: q.weight for n, q in policy.queues.items()}
        self.shares = Shares(table, usage, self.queue_weights, policy.user_weights)
        self.remaining = {g.job_id: list(g.tasks) for g in groups}
        self.placements: list[Placement] = []
        self.waiting: dict[int, str] = {}
        self.blocked: list[Group] = []
        # Asks of plain jobs that found no room: a plain job asking as much or more cannot
        # fit either this cycle (room only shrinks), so it is not searched again.
        self._failed: list[tuple[np.ndarray, str]] = []
        # Room that evictions made for a nominated task is held for it: no one else may take it.
        self.held = {g.job_id: Counter(table.index[n] for _, n in g.nominated) for g in groups if g.nominated}
        for g in groups:
            self._hold(g, self.asks[g.job_id], +1)

    def turn_order(self, queue: _Queue) -> tuple[int, float, str]:
        """Queues below their guarantee first (the furthest below first), then by weighted DRF."""
        share = self.shares.share(queue.name)
        guarantee = self.policy.queue(queue.name).guarantee
        if share < guarantee:
            return (0, share / guarantee, queue.name)
        return (1, self.shares.of_queue(queue.name), queue.name)

    def _hold(self, g: Group, ask: np.ndarray, sign: int) -> None:
        for row, count in self.held.get(g.job_id, {}).items():
            self.placer.take(row, sign * count * ask)

    def serve(self, queue: _Queue, alone: bool) -> None:
        """One turn: place a slice of the job at the head of `queue`."""
        g = queue.head(self.shares)
        ask = self.asks[g.job_id]
        todo = self.remaining[g.job_id]
        if g.gang or (alone and not queue.fair):
            want = len(todo)
        else:
            want = min(len(todo), 1 if queue.fair else SLICE)
        limit = self.policy.queue(g.queue).limit
        if limit < 1.0:
            want = min(want, self.shares.room_under(g.queue, limit, ask))
            if want == 0:
                self._block(queue, g, f"queue {g.queue} is at its max share ({limit:.0%})")
                return
        backfill = self._may_backfill(g)
        plain = _plain(g) and not backfill
        known = (
            next((why for failed, why in self._failed if np.all(failed <= ask + 1e-9)), None)
            if plain
            else None
        )
        if known is not None:
            self._block(queue, g, known)
            return
        self._hold(g, ask, -1)
        if backfill:
            self._reserve_hold(-1)
        got = self.placer.place(g, want, g.strategy or self.policy.strategy, ask)
        if backfill:
            self._reserve_hold(+1)
        if held := self.held.get(g.job_id):
            for row, k in got:
                if row in held:
                    held[row] = max(0, held[row] - k)
        self._hold(g, ask, +1)
        placed = sum(k for _, k in got)
        if g.gang and placed < len(todo):
            self.placer.undo(got, g, ask)
            self.waiting[g.job_id] = (
                f"gang: {placed} of {len(todo)} tasks fit now; {self.placer.explain(g, ask)}"
            )
            queue.drop(g)
            return
        done = 0
        for row, k in got:
            node = self.table.names[row]
            self.placements.extend(Placement(t, node, g.ask) for t in todo[done : done + k])
            done += k
        del todo[:done]
        if done:
            self.shares.add(g.queue, g.user, done * ask)
        if not todo:
            queue.drop(g)
        elif placed < want:
            reason = self.placer.explain(g, ask)
            if plain:
                self._failed.append((ask, reason))
            self._block(queue, g, reason)

    def _block(self, queue: _Queue, g: Group, reason: str) -> None:
        self.waiting[g.job_id] = reason
        self.blocked.append(g)
        queue.drop(g)
        if self.reservation is None and not g.gang:
            self._reserve(g)

    # --- backfill: EASY, one reservation per cycle ------------------------------------------

    def _reserve(self, g: Group) -> None:
        """Hold room for `g` on the node that frees it soonest, as time limits tell."""
        ask = self.asks[g.job_id]
        mask = self.placer.static_mask(g)
        ending: dict[int, list[tuple[float, np.ndarray]]] = defaultdict(list)
        vectors: dict[int, np.ndarray] = {}  # a job's tasks share one Resources: one vector each
        for r in self.running():
            row = self.table.index.get(r.node)
            if r.ends_at is not None and row is not None and mask[row]:
                if (vec := vectors.get(id(r.ask))) is None:
                    vec = vectors[id(r.ask)] = self.table.vector(r.ask)
                ending[row].append((r.ends_at, vec))
        best: tuple[float, int] | None = None
        for row, events in ending.items():
            free = self.placer.free_at(row)
            for ends_at, vec in sorted(events, key=lambda e: e[0]):
                free[: len(vec)] += vec[: len(free)]
                if np.all(free + 1e-9 >= ask[: len(free)]):
                    best = min(best or (ends_at, row), (ends_at, row))
                    break
        if best is None:
            return  # no end in sight (no time limits): nothing to reserve against
        start, row = best
        self.reservation = _Reservation(g.job_id, row, ask, start)
        self._reserve_hold(+1)
        self.waiting[g.job_id] += (
            f"; {self.table.names[row]} is held for it from {max(0.0, start - self.now):.0f}s on"
        )

    def _reserve_hold(self, sign: int) -> None:
        assert self.reservation is not None
        self.placer.take(self.reservation.row, sign * self.reservation.ask)

    def _may_backfill(self, g: Group) -> bool:
        """Work that ends, by its time limit, before the reservation starts may use its room."""
        r = self.reservation
        return (
            r is not None
            and g.job_id != r.job_id
            and g.time_limit is not None
            and self.now + g.time_limit <= r.start
        )


def _plain(g: Group) -> bool:
    """Whether only `g`'s ask decides where it fits (no filters, limits or held room)."""
    return not (g.nodes is not None or g.constraints or g.max_per_node or g.max_per or g.nominated or g.gang)


@dataclass(frozen=True, slots=True)
class Verdict:
    accepted: tuple[Placement, ...]
    rejected: dict[str, str]


def apply_plan(table: NodeTable, plan: Plan) -> Verdict:
    """Allocate every placement of `plan` that still fits the table now; reject the rest."""
    placements = plan.placements
    if len(placements) > _FEW and _apply_all(table, placements):
        return Verdict(placements, {})
    return _apply_one_by_one(table, placements)


# Plans of more placements than this are checked and allocated as whole arrays, in one go
# when all of it still fits (the usual case); fewer cost less one by one.
_FEW = 8


def _apply_all(table: NodeTable, placements: tuple[Placement, ...]) -> bool:
    """Allocate all of `placements` if every node still has room for all it gets."""
    count = len(placements)
    rows = np.fromiter((table.index.get(p.node, -1) for p in placements), np.int64, count)
    if rows.min() < 0 or not table.schedulable[rows].all():
        return False
    # The tasks of a job share one Resources object: one table row per distinct object.
    by_id = {id(p.resources): p.resources for p in placements}
    kinds, slots = np.unique(
        np.fromiter(map(id, (p.resources for p in placements)), np.int64, count), return_inverse=True
    )
    vectors = [table.vector(by_id[int(k)]) for k in kinds]
    asks = np.zeros((len(vectors), len(table.dims)))
    for i, vec in enumerate(vectors):
        asks[i, : len(vec)] = vec
    touched, slot = np.unique(rows, return_inverse=True)
    wanted = np.zeros((len(touched), asks.shape[1]))
    np.add.at(wanted, slot, asks[slots])
    if not np.all(table.free[touched] - wanted + 1e-9 >= 0):
        return False
    table.allocate_many(touched, wanted)
    return True


def _apply_one_by_one(table: NodeTable, placements: tuple[Placement, ...]) -> Verdict:
    accepted: list[Placement] = []
    rejected: dict[str, str] = {}
    vectors: dict[int, np.ndarray] = {}
    for p in placements:
        row = table.index.get(p.node)
        if row is None or not table.schedulable[row]:
            rejected[p.task_id] = UNKNOWN_NODE
            continue
        vec = vectors.get(id(p.resources))
        if vec is None:
            vec = vectors[id(p.resources)] = table.vector(p.resources)
        if np.any(table.free[row, : len(vec)] + 1e-9 < vec):
            rejected[p.task_id] = STALE
        else:
            table.allocate(row, vec)
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
