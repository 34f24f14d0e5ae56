"""The rebalancer: from nodes' smoothed CPU utilization and the tasks on them, the
migrations that even the load out (`spread`) or empty lightly used nodes (`consolidate`).

    moves = rebalance(cluster, tasks, policy, now)

`spread`, like the Kubernetes descheduler's LowNodeUtilization: a node is hot when its
utilization is more than `threshold` above the cluster's mean; its tasks move, largest load
first (the fewest moves for the relief), to the coolest node that may take them, until it is
`hysteresis` below the trigger. It also fills nodes far below the mean (a node that just
joined) from the busiest ones, so new capacity gets work. `consolidate` empties the nodes
below `low` onto the others, least used first, so they can be drained or powered off.

Every move: a task whose migration mode allows it, out of its cooldown, to a schedulable
node it may run on (its constraints, as a mask) with room for what it holds, that stays below
`high` and below where the source was (so no move makes the hottest node hotter, or a target
hot), within `budget` moves a round; lower priorities move first among equal relief. No I/O,
no clock (time is an argument), deterministic.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from shoal.model import Migrate


@dataclass(frozen=True, slots=True)
class Movable:
    """A running task, as the rebalancer weighs it."""

    task_id: str
    row: int
    load: float  # cores it uses (smoothed)
    ask: np.ndarray  # what it holds on its node, a resource vector
    mode: Migrate = Migrate.RESTART
    priority: int = 0
    moved_at: float = -math.inf
    allowed: np.ndarray | None = None  # rows it may run on (None: every row)


@dataclass(frozen=True, slots=True)
class Cluster:
    cores: np.ndarray  # per row
    used: np.ndarray  # cores in use per row, smoothed
    free: np.ndarray  # unallocated resources per row (rows x dimensions)
    schedulable: np.ndarray  # per row

    @property
    def utilization(self) -> np.ndarray:
        return np.divide(self.used, self.cores, out=np.zeros(len(self.cores)), where=self.cores > 0)


@dataclass(frozen=True, slots=True)
class RebalancePolicy:
    mode: Literal["spread", "consolidate"] = "spread"
    threshold: float = 0.10  # spread: a node this far above the mean is hot (this far below, cold)
    hysteresis: float = 0.02  # relieved nodes end this far inside the trigger, so they do not flap
    high: float = 0.80  # no move may take a target above this utilization
    low: float = 0.20  # consolidate: nodes below this are emptied
    budget: int = 16  # moves a round
    cooldown: float = 300.0  # seconds before a task that moved may move again


@dataclass(frozen=True, slots=True)
class Move:
    task_id: str
    source: int
    target: int
    reason: str


@dataclass
class _Round:
    cluster: Cluster
    policy: RebalancePolicy
    now: float
    used: np.ndarray = field(init=False)
    free: np.ndarray = field(init=False)
    moves: list[Move] = field(default_factory=list)
    by_row: dict[int, list[Movable]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.used = self.cluster.used.astype(float).copy()
        self.free = self.cluster.free.astype(float).copy()

    @property
    def room(self) -> int:
        return self.policy.budget - len(self.moves)

    def utilization(self, row: int) -> float:
        cores = self.cluster.cores[row]
        return self.used[row] / cores if cores > 0 else 0.0

    def movable(self, row: int, idle: bool = False) -> list[Movable]:
        """The tasks of `row` that may move now, largest load first, lower priority first;
        tasks using no CPU only with `idle` (moving them relieves no one, but empties a node)."""
        tasks = [
            t
            for t in self.by_row.get(row, ())
            if t.mode is not Migrate.NEVER
            and self.now - t.moved_at >= self.policy.cooldown
            and (idle or t.load > 0)
        ]
        return sorted(tasks, key=lambda t: (-t.load, t.priority, t.task_id))

    def target(self, task: Movable, ceiling: float, exclude: int) -> int | None:
        """The coolest row that may take `task` and stays below `ceiling` utilization."""
        cores = self.cluster.cores
        after = np.divide(self.used + task.load, cores, out=np.full_like(self.used, np.inf), where=cores > 0)
        ok = self.cluster.schedulable & (after < ceiling - 1e-9)
        ok &= np.all(self.free[:, : len(task.ask)] + 1e-9 >= task.ask, axis=1)
        if task.allowed is not None:
            ok &= task.allowed
        ok[exclude] = False
        if not ok.any():
            return None
        candidates = np.flatnonzero(ok)
        return int(candidates[np.argmin(after[candidates])])

    def move(self, task: Movable, target: int, reason: str) -> None:
        self.moves.append(Move(task.task_id, task.row, target, reason))
        self.used[task.row] -= task.load
        self.used[target] += task.load
        self.free[task.row, : len(task.ask)] += task.ask
        self.free[target, : len(task.ask)] -= task.ask
        self.by_row[task.row].remove(task)


def rebalance(cluster: Cluster, tasks: Sequence[Movable], policy: RebalancePolicy, now: float) -> list[Move]:
    """The moves of one round (at most `policy.budget`)."""
    r = _Round(cluster, policy, now)
    for t in sorted(tasks, key=lambda t: t.task_id):
        r.by_row.setdefault(t.row, []).append(t)
    if policy.mode == "spread":
        _relieve_hot(r)
        _fill_cold(r)
    else:
        _consolidate(r)
    return r.moves


def applied(
    cluster: Cluster, tasks: Sequence[Movable], moves: Sequence[Move], now: float
) -> tuple[Cluster, list[Movable]]:
    """The cluster and tasks as they are once `moves` are done (each task stamped `now`):
    what a simulation steps through, round after round."""
    by_id = {t.task_id: t for t in tasks}
    used, free = cluster.used.astype(float).copy(), cluster.free.astype(float).copy()
    for m in moves:
        t = by_id[m.task_id]
        used[m.source] -= t.load
        used[m.target] += t.load
        free[m.source, : len(t.ask)] += t.ask
        free[m.target, : len(t.ask)] -= t.ask
        by_id[m.task_id] = dataclasses.replace(t, row=m.target, moved_at=now)
    return Cluster(cluster.cores, used, free, cluster.schedulable), list(by_id.values())


def _mean(r: _Round) -> float:
    live = r.cluster.schedulable & (r.cluster.cores > 0)
    total = r.cluster.cores[live].sum()
    return float(r.used[live].sum() / total) if total > 0 else 0.0


def _relieve_hot(r: _Round) -> None:
    """Hottest first: move its largest tasks off until it is inside the trigger."""
    mean = _mean(r)  # migrations move load, they never change the mean
    trigger = mean + r.policy.threshold
    goal = trigger - r.policy.hysteresis
    util = r.cluster.utilization
    for row in np.argsort(-util, kind="stable"):
        row = int(row)
        if r.room <= 0 or util[row] <= trigger + 1e-9:
            return
        for task in r.movable(row):
            now_at = r.utilization(row)
            if now_at <= goal + 1e-9 or r.room <= 0:
                break
            # A target must stay below the trigger (it would be hot itself otherwise), below
            # `high`, and below where this node is now (the peak never rises).
            ceiling = min(trigger, r.policy.high, now_at)
            target = r.target(task, ceiling, exclude=row)
            if target is not None:
                r.move(
                    task,
                    target,
                    f"{now_at:.0%} is over the mean {mean:.0%} by more than {r.policy.threshold:.0%}",
                )


def _fill_cold(r: _Round) -> None:
    """Nodes that were far below the mean as the round began (new ones) take tasks from the
    busiest nodes above it."""
    mean = _mean(r)
    cold_line = mean - r.policy.threshold
    util = r.cluster.utilization
    cold = [
        int(i)
        for i in np.argsort(util, kind="stable")
        if r.cluster.schedulable[i] and r.cluster.cores[i] > 0 and util[i] < cold_line - 1e-9
    ]
    for target in cold:
        while r.room > 0 and r.utilization(target) < cold_line + r.policy.hysteresis - 1e-9:
            donors = sorted(
                (i for i in range(len(r.used)) if i != target and r.utilization(i) > mean + 1e-9),
                key=lambda i: -r.utilization(i),
            )
            moved = False
            for donor in donors:
                for task in r.movable(donor):
                    after_target = (r.used[target] + task.load) / r.cluster.cores[target]
                    after_donor = (r.used[donor] - task.load) / r.cluster.cores[donor]
                    # Only moves that narrow the gap: the target stays below the donor's new level.
                    if after_target > min(mean, r.policy.high) + 1e-9 or after_target > after_donor + 1e-9:
                        continue
                    if not _fits(r, task, target):
                        continue
                    r.move(
                        task,
                        target,
                        f"{r.utilization(target):.0%} is under the mean {mean:.0%}: new capacity",
                    )
                    moved = True
                    break
                if moved:
                    break
            if not moved:
                break


def _fits(r: _Round, task: Movable, row: int) -> bool:
    return (
        bool(r.cluster.schedulable[row])
        and (task.allowed is None or bool(task.allowed[row]))
        and bool(np.all(r.free[row, : len(task.ask)] + 1e-9 >= task.ask))
    )


def _consolidate(r: _Round) -> None:
    """Empty the least used nodes below `low`, each wholly or not at all."""
    util = r.cluster.utilization
    rows = [
        int(i)
        for i in np.argsort(util, kind="stable")
        if r.cluster.schedulable[i] and util[i] < r.policy.low and r.by_row.get(int(i))
    ]
    emptied: set[int] = set()
    received: set[int] = set()  # rows that took tasks are kept: what lands there stays
    for row in rows:
        tasks = r.by_row[row]
        if row in received or len(tasks) > r.room or len(r.movable(row, idle=True)) < len(tasks):
            continue  # a node that cannot be emptied this round is left as it is
        plan = []
        used, free = r.used.copy(), r.free.copy()
        for task in sorted(tasks, key=lambda t: (-t.load, t.task_id)):
            target = _densest(r, task, exclude=emptied | {row}, used=used, free=free)
            if target is None:
                plan = None
                break
            plan.append((task, target))
            used[target] += task.load
            free[target, : len(task.ask)] -= task.ask
        if plan is None:
            continue
        for task, target in plan:
            r.move(task, target, f"emptying {util[row]:.0%}-used node to free it")
            received.add(target)
        emptied.add(row)


def _densest(r: _Round, task: Movable, exclude: set[int], used: np.ndarray, free: np.ndarray) -> int | None:
    """The busiest row that takes `task` and stays below `high` (packing, not spreading)."""
    cores = r.cluster.cores
    after = np.divide(used + task.load, cores, out=np.full_like(used, np.inf), where=cores > 0)
    ok = r.cluster.schedulable & (after <= r.policy.high + 1e-9)
    ok &= np.all(free[:, : len(task.ask)] + 1e-9 >= task.ask, axis=1)
    if task.allowed is not None:
        ok &= task.allowed
    ok[list(exclude)] = False
    if not ok.any():
        return None
    candidates = np.flatnonzero(ok)
    return int(candidates[np.argmax(after[candidates])])


def smooth(previous: float | None, sample: float, alpha: float = 0.3) -> float:
    """An exponentially weighted moving average: one spike moves it by `alpha` of itself."""
    return sample if previous is None else previous + alpha * (sample - previous)
