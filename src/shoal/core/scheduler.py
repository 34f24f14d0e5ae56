"""The native scheduler: a pure function from a snapshot to a plan.

`schedule(nodes, asks, now)` places pending asks in submission (FIFO) order, each on the
feasible node with the most free cpus, skipping asks that fit nowhere right now so a large
task does not block small ones behind it. `apply_plan` is the only writer of allocations:
it re-checks every placement against the current free capacity and rejects stale parts
with a reason, so a plan computed on an old snapshot can never over-commit a node.

No I/O, no clock (time is `now`), no randomness: the same inputs give the same plan.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from shoal.model import RESOURCE_NAMES, Resources

# Reasons a task is not placed, shown to users as "why is my job pending?".
NO_NODES = "no nodes are up"
NOT_BEFORE = "waiting for its restart delay"


@dataclass(frozen=True, slots=True)
class NodeView:
    """One node as the scheduler sees it."""

    name: str
    capacity: Resources
    allocated: Resources
    schedulable: bool = True

    @property
    def free(self) -> Resources:
        return self.capacity - self.allocated


@dataclass(frozen=True, slots=True)
class Ask:
    """One task waiting for a place."""

    task_id: str
    resources: Resources
    not_before: float = 0.0


@dataclass(frozen=True, slots=True)
class Placement:
    task_id: str
    node: str
    resources: Resources


@dataclass(frozen=True, slots=True)
class Plan:
    placements: tuple[Placement, ...] = ()
    unplaced: dict[str, str] = field(default_factory=dict)


def schedule(nodes: Sequence[NodeView], asks: Iterable[Ask], now: float) -> Plan:
    """Place `asks` (already in queue order) on `nodes`; explain every ask left over."""
    free = {n.name: n.free for n in nodes if n.schedulable}
    placements: list[Placement] = []
    unplaced: dict[str, str] = {}
    for ask in asks:
        if ask.not_before > now:
            unplaced[ask.task_id] = NOT_BEFORE
            continue
        chosen = _best_fit(free, ask.resources)
        if chosen is None:
            unplaced[ask.task_id] = explain(free, ask.resources)
            continue
        free[chosen] = free[chosen] - ask.resources
        placements.append(Placement(ask.task_id, chosen, ask.resources))
    return Plan(tuple(placements), unplaced)


def _best_fit(free: dict[str, Resources], ask: Resources) -> str | None:
    """The node with the most free cpus that holds `ask` (ties: the first name)."""
    best: str | None = None
    for name in sorted(free):
        room = free[name]
        if ask.shortfall(room) is None and (best is None or room.cpus > free[best].cpus):
            best = name
    return best


def explain(free: dict[str, Resources], ask: Resources) -> str:
    """Why `ask` fits on none of the nodes: counts of nodes per missing resource."""
    if not free:
        return NO_NODES
    lacking: dict[str, int] = {}
    for room in free.values():
        short = ask.shortfall(room)
        if short is not None:
            lacking[short] = lacking.get(short, 0) + 1
    parts = [
        f"{count} node{'s' if count > 1 else ''} lack{'' if count > 1 else 's'} free {_NOUN[what]}"
        for what, count in lacking.items()
    ]
    return ", ".join(parts)


def never_fits(capacities: Iterable[Resources], ask: Resources) -> str | None:
    """A reason if no node, even empty, could ever hold `ask`; None if one could."""
    capacities = list(capacities)
    if not capacities or any(ask.shortfall(c) is None for c in capacities):
        return None  # with no node registered yet the ask waits for one
    for dim in RESOURCE_NAMES:
        most = max(getattr(c, dim) for c in capacities)
        if getattr(ask, dim) > most:
            return (
                f"unschedulable: needs {_fmt(getattr(ask, dim))} {_UNIT[dim]}, "
                f"the largest node has {_fmt(most)}"
            )
    return "unschedulable: no single node has all of the resources asked for"


_NOUN = {"cpus": "cpus", "mem": "memory", "disk": "disk", "gpus": "gpus"}
_UNIT = {"cpus": "cpus", "mem": "MiB of memory", "disk": "MiB of disk", "gpus": "gpus"}


def _fmt(value: float) -> str:
    return f"{value:g}"


@dataclass(frozen=True, slots=True)
class Verdict:
    accepted: tuple[Placement, ...]
    rejected: dict[str, str]


STALE = "node no longer has room (stale plan)"
UNKNOWN_NODE = "node is not schedulable"


def apply_plan(nodes: dict[str, NodeView], plan: Plan) -> Verdict:
    """Check every placement of `plan` against `nodes` now; accept those that still fit."""
    free = {name: n.free for name, n in nodes.items() if n.schedulable}
    accepted: list[Placement] = []
    rejected: dict[str, str] = {}
    for p in plan.placements:
        room = free.get(p.node)
        if room is None:
            rejected[p.task_id] = UNKNOWN_NODE
        elif p.resources.shortfall(room) is not None:
            rejected[p.task_id] = STALE
        else:
            free[p.node] = room - p.resources
            accepted.append(p)
    return Verdict(tuple(accepted), rejected)
