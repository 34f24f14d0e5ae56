"""What a scheduling cycle decides: placements, evictions, and why the rest waits."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

from shoal.model import Resources


@dataclass(frozen=True, slots=True)
class Running:
    """A task holding resources on a node; `evicting` once asked to leave for another."""

    task_id: str
    job_id: int
    node: str
    ask: Resources
    user: str = "nobody"
    queue: str = "default"
    priority: int = 0
    preemptible: bool = True
    evicting: bool = False
    started_at: float | None = None  # None: placed, not yet started
    time_limit: float | None = None  # seconds it may run; None: its queue's default, if any


class Placement(NamedTuple):
    """A task to start on a node. A named tuple: cycles make these by the thousand.
    `copy`: a second copy of a running task (a make-before-break move), not the task itself."""

    task_id: str
    node: str
    resources: Resources
    copy: bool = False


@dataclass(frozen=True, slots=True)
class Eviction:
    task_id: str
    node: str
    for_job: int


@dataclass(frozen=True, slots=True)
class Reservation:
    """Room held for a waiting job from `start` on: so many tasks on each node. Only a
    queue's head is promised its start: the reservations of jobs behind it (conservative
    backfill, or a job behind one whose end is not in sight) are made afresh every cycle, and
    an earlier job may take their room when ends come early."""

    job_id: int
    start: float
    nodes: tuple[tuple[str, int], ...]
    head: bool = True  # the first job of its queue that could not start: nothing may delay it


@dataclass(frozen=True, slots=True)
class Plan:
    placements: tuple[Placement, ...] = ()
    evictions: tuple[Eviction, ...] = ()
    nominations: tuple[tuple[str, str], ...] = ()  # (task, node) the evictions make room for
    reservations: tuple[Reservation, ...] = ()  # backfill's promises, in the order they were made
    waiting: dict[int, str] = field(default_factory=dict)  # job id -> why its tasks wait
