"""The native scheduler: a pure function from the cluster and its queues to a plan.

    plan = schedule(table, masks, groups, running, policy, now)

Order of service, one cycle:
1. Queues take turns by weighted Dominant Resource Fairness: the queue whose usage, as a
   share of the cluster in its dominant resource and divided by its weight, is lowest goes
   next. Inside a queue, `fifo` serves jobs in submission order, `priority` highest first,
   and `fair` the user with the lowest weighted dominant share (so users interleave task by
   task).
2. Each turn places a slice of one job through `Placer` (masks, fit, strategy score). A job
   that cannot place its slice is set aside with the reason. Gangs place all their tasks or
   none.
3. What happens behind a job set aside is its queue's `backfill` (`core/backfill.py`):
   `none` keeps strict order (the jobs behind it wait too); `easy` gives the first such job a
   reservation, the earliest time its tasks fit as the time limits of what runs tell, and
   jobs behind it start only where they delay it; `conservative` gives one to each of the
   first `depth` such jobs. A task's duration is its time limit, else its queue's default
   limit, else forever (it may then use only room that no reservation ever needs).
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

import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from shoal.core import preemption
from shoal.core.backfill import Profile, Releases
from shoal.core.cluster import MaskCache, NodeTable
from shoal.core.fairness import Shares, UsageBook
from shoal.core.placement import Group, Placer
from shoal.core.plan import Eviction, Placement, Plan, Reservation, Running
from shoal.core.tags import Tags, binding
from shoal.model import Resources, Strategy

STALE = "node no longer has room (stale plan)"
UNKNOWN_NODE = "node is not schedulable"
Backfill = Literal["easy", "conservative", "none"]
SLICE = 32  # tasks a job places per turn while other queues or users wait
_FAILURES = 32  # failed asks a cycle remembers


@dataclass(frozen=True, slots=True)
class QueuePolicy:
    """How one queue orders its jobs, and its part of the cluster.

    `priority` (the default) is FIFO among equal priorities; `fifo` ignores priority.
    Capacity, as in YARN's capacity scheduler: a queue below its `guarantee` (a dominant
    share of the cluster) is served before the others and may take back what borrowers hold
    beyond their own guarantees; a queue never holds more than its `limit`. Between those, a
    queue borrows what others leave idle. `backfill`, `depth` and `default_limit`: what
    happens behind a job that cannot start (the module's docstring, step 3)."""

    order: Literal["fifo", "priority", "fair"] = "priority"
    weight: float = 1.0
    guarantee: float = 0.0
    limit: float = 1.0
    backfill: Backfill = "easy"
    depth: int = 100  # conservative backfill: blocked jobs given a reservation per cycle
    default_limit: float | None = None  # seconds, for jobs without a time limit of their own


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

    def clear(self) -> list[Group]:
        """Take every group out of the queue; returns them in the queue's order."""
        left = [g for line in self.lines.values() for g in line]
        self.lines.clear()
        return left


def schedule(
    table: NodeTable,
    masks: MaskCache,
    groups: Sequence[Group],
    usage: UsageBook,
    running: Iterable[Running],
    policy: Policy,
    now: float,
    releases: Releases | None = None,
) -> Plan:
    """Decide where pending tasks go (and what to evict for them) on this cycle.

    `usage` is what runs now, per queue and user; `running` lists those tasks one by one
    and is only walked when some job needs preemption; `releases` says when they are
    expected to end (made from `running` if not given).
    """
    cycle = _Cycle(table, masks, groups, usage, _Lazy(running), policy, now, releases)
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
    placements, reservations = tuple(cycle.placements), tuple(cycle.reservations)
    return Plan(placements, tuple(evictions), tuple(nominations), reservations, cycle.waiting)


def _give_back(shares: Shares, queues: list[_Queue], policy: Policy) -> preemption.Rule:
    """Who is below and who beyond their guarantee, by `shares` as the cycle started."""

    def guarantee(name: str) -> float:
        return policy.queue(name).guarantee

    return preemption.Rule(
        starved=frozenset(q.name for q in queues if shares.share(q.name) < guarantee(q.name)),
        borrowers=frozenset(n for n in shares.queues() if shares.share(n) > guarantee(n) + 1e-9),
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
        releases: Releases | None,
    ) -> None:
        self.table = table
        self.policy = policy
        self.now = now
        self.running = running
        self._releases = releases
        self.profile: Profile | None = None
        self.reservations: list[Reservation] = []
        self._tried: Counter[str] = Counter()  # per queue: blocked jobs a reservation was sought for
        self._made: Counter[str] = Counter()  # per queue: reservations made
        self._first_blocked: dict[str, int] = {}  # per queue: its first job that could not start
        # What the cycle started before it needed a profile: the profile takes it in when made.
        self._started: list[tuple[float, int, np.ndarray]] = []  # (end, row, amount)
        # Every ask as a table row, made once per job for the whole cycle.
        self.asks = {g.job_id: table.vector(g.ask) for g in groups}
        self.placer = Placer(table, masks, policy.window)
        self.queue_weights = {n: q.weight for n, q in policy.queues.items()}
        self.shares = Shares(table, usage, self.queue_weights, policy.user_weights)
        self.remaining = {g.job_id: list(g.tasks) for g in groups}
        self.placements: list[Placement] = []
        self.waiting: dict[int, str] = {}
        self.blocked: list[Group] = []
        # Asks, durations and tasks needed at once of plain jobs that found no room: a plain
        # job asking as much or more of each cannot fit either, so it is not searched again.
        self._failed: list[tuple[list[float], float, int, str]] = []
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
            if want == 0 or (g.gang and want < len(todo)):
                self._block(queue, g, f"queue {g.queue} is at its max share ({limit:.0%})", reserve=False)
                return
        duration = self._duration(g)
        plain = _plain(g, self.table.tags)
        need = len(todo) if g.gang else 1  # fewer than this fitting is a failure
        if plain and (known := self._known_failure(ask, duration, need)) is not None:
            self._block(queue, g, f"gang: its {need} tasks do not all fit now; {known}" if g.gang else known)
            return
        got, fit, why = self._place(g, want, ask, duration)
        placed = sum(k for _, k in got)
        if placed < want and plain:
            self._failed.append((ask.tolist(), 0.0 if self.profile is None else duration, need, why))
            del self._failed[:-_FAILURES]
        if g.gang and placed < len(todo):
            self.placer.undo(got, g, ask)
            self._block(queue, g, f"gang: {fit} of {len(todo)} tasks fit now; {why}")
            return
        self._start(g, got, ask, duration)
        if not todo:
            queue.drop(g)
        elif placed < want:
            self._block(queue, g, why)

    def _duration(self, g: Group) -> float:
        """How long `g`'s tasks may run: their time limit, else their queue's default limit."""
        limit = g.time_limit if g.time_limit is not None else self.policy.queue(g.queue).default_limit
        return math.inf if limit is None else limit

    def _known_failure(self, ask: np.ndarray, duration: float, need: int) -> str | None:
        """Why a plain job found no room, if one asking no more, for no longer, to start no
        more tasks at once failed before: room only shrinks within a cycle, so this one
        cannot fit either."""
        asked = ask.tolist()
        for failed, d, n, why in self._failed:
            if d <= duration and n <= need and all(f <= a + 1e-9 for f, a in zip(failed, asked, strict=True)):
                return why
        return None

    def _place(
        self, g: Group, want: int, ask: np.ndarray, duration: float
    ) -> tuple[list[tuple[int, int]], int, str]:
        """Up to `want` tasks of `g` where they delay no reservation: where they went, how
        many fit (for a gang, counted before placing), and why the rest did not."""
        held = self.held.get(g.job_id)
        self._hold(g, ask, -1)
        shaded = self._shade(duration, g, ask) if self.profile is not None else None
        fit = self.placer.capacity(g, ask) if g.gang else want
        got = self.placer.place(g, want, g.strategy or self.policy.strategy, ask) if fit >= want else []
        placed = sum(k for _, k in got)
        why = self._why(g, ask, shaded is not None) if placed < want else ""
        if shaded is not None:
            rows, amounts = shaded
            self.placer.take_many(rows, -amounts)
        if held:
            used = [(row, min(k, held[row])) for row, k in got if held.get(row)]
            for row, k in used:
                held[row] -= k
            if self.profile is not None and used:
                # The held room it used is now its own: the profile gets it back, then holds it
                # again for the task's own window. Later room may so grow: forget the failures.
                self.profile.hold([(row, -k) for row, k in used], ask, self.now, math.inf)
                self._failed.clear()
        self._hold(g, ask, +1)
        return got, fit if g.gang and not got else placed, why

    def _why(self, g: Group, ask: np.ndarray, shaded: bool) -> str:
        why = self.placer.explain(g, ask)
        if shaded and self.reservations:
            jobs = ", ".join(str(r.job_id) for r in self.reservations[:3])
            more = f" and {len(self.reservations) - 3} more" if len(self.reservations) > 3 else ""
            why += f" (counting the room held for job {jobs}{more})"
        return why

    def _shade(self, duration: float, g: Group, ask: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        """Take from the placer's view whatever room a task of `duration` may not use now
        (room reservations need before it would end); returns what to give back. Room held
        for `g` itself (evictions made it) stays in view."""
        assert self.profile is not None
        dims = self.profile.dims
        room = self.profile.room_for(duration)
        if held := self.held.get(g.job_id):
            room = room.copy()
            for row, count in held.items():
                room[row] += count * ask[dims]
        short = self.table.free[:, dims] - room
        rows = np.flatnonzero((short > 1e-9).any(axis=1))
        if len(rows) == 0:
            return None
        amounts = np.zeros((len(rows), len(self.table.dims)))
        amounts[:, dims] = np.maximum(short[rows], 0.0)
        self.placer.take_many(rows, amounts)
        return rows, amounts

    def _start(self, g: Group, got: list[tuple[int, int]], ask: np.ndarray, duration: float) -> None:
        todo = self.remaining[g.job_id]
        done = 0
        for row, k in got:
            node = self.table.names[row]
            self.placements.extend(Placement(t, node, g.ask) for t in todo[done : done + k])
            done += k
        del todo[:done]
        if not done:
            return
        self.shares.add(g.queue, g.user, done * ask)
        if self.profile is not None:
            self.profile.hold(got, ask, self.now, duration)
        elif math.isfinite(duration):
            self._started.extend((self.now + duration, row, k * ask) for row, k in got)

    def _block(self, queue: _Queue, g: Group, reason: str, reserve: bool = True) -> None:
        """`g` waits; under strict order its whole queue waits behind it; under backfill it
        may get a reservation."""
        self.waiting[g.job_id] = reason
        if not g.gang:
            self.blocked.append(g)  # a gang is not given evictions: it would take part of its room
        queue.drop(g)
        rules = self.policy.queue(g.queue)
        if rules.backfill == "none":
            for behind in queue.clear():
                self.waiting[behind.job_id] = f"behind job {g.job_id}: queue {g.queue} keeps strict order"
            return
        self._first_blocked.setdefault(g.queue, g.job_id)
        tried = self._tried[g.queue]
        if reserve and (self._made[g.queue] == 0 if rules.backfill == "easy" else tried < rules.depth):
            self._tried[g.queue] += 1
            self._reserve(g)

    # --- backfill: reservations on the profile of time limits --------------------------------

    def _reserve(self, g: Group) -> None:
        """Hold room for `g`'s waiting tasks from the first moment the profile has it."""
        profile = self._profile()
        ask = self.asks[g.job_id]
        duration = self._duration(g)
        room = np.full(len(self.table), np.inf)
        if g.max_per_node is not None:
            room = g.max_per_node - self.placer.counts(g)
        if g.presence is not None and g.presence.one_per_node:
            room = np.minimum(room, 1)
        rows = np.flatnonzero(self.placer.static_mask(g) & self.placer.limits(g, slice(0, len(self.table))))
        found = profile.earliest(ask, len(self.remaining[g.job_id]), duration, rows, room)
        if found is None or not self.now < found[0] < math.inf:
            # No end in sight (work without time limits holds the room it needs), or what
            # keeps it waiting is not room (a per-value limit, a spread) and time will not tell.
            return
        start, slots = found
        profile.hold([(s.row, s.count) for s in slots], ask, start, duration)
        names = self.table.names
        nodes = tuple((names[s.row], s.count) for s in slots)
        self.reservations.append(
            Reservation(g.job_id, start, nodes, self._first_blocked[g.queue] == g.job_id)
        )
        self._made[g.queue] += 1
        where = f"{names[slots[0].row]} is" if len(slots) == 1 else f"{len(slots)} nodes are"
        self.waiting[g.job_id] += f"; {where} held for it from {max(0.0, start - self.now):.0f}s on"

    def _releases_book(self) -> Releases:
        if self._releases is None:
            self._releases = Releases.of(self.table, self.running())
        return self._releases

    def _profile(self) -> Profile:
        """The profile of room over time, made when the cycle's first reservation needs it."""
        if self.profile is None:
            defaults = {name: q.default_limit for name, q in self.policy.queues.items()}
            book = self._releases_book()
            ends, rows, amounts = book.expected_ends(self.now, defaults, len(self.table.dims))
            if self._started:
                more_ends, more_rows, more = zip(*self._started, strict=True)
                ends = np.concatenate([ends, more_ends])
                rows = np.concatenate([rows, np.array(more_rows, np.int64)])
                amounts = np.concatenate([amounts, more])
            asked = np.flatnonzero(np.any([ask > 0 for ask in self.asks.values()], axis=0))
            self.profile = Profile(self.now, self.table.free, ends, rows, amounts, asked)
        return self.profile


def _plain(g: Group, tags: Tags) -> bool:
    """Whether only `g`'s ask decides where it fits (no filters, limits, held room, or
    colocation rule or static port that binds now)."""
    return not (
        g.nodes is not None
        or g.constraints
        or g.max_per_node
        or g.max_per
        or g.nominated
        or binding(tags, g.presence)
    )


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
