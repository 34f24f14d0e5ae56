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
    ends_at: float | None = None  # by its time limit, where it has one


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
class Plan:
    placements: tuple[Placement, ...] = ()
    evictions: tuple[Eviction, ...] = ()
    nominations: tuple[tuple[str, str], ...] = ()  # (task, node) the evictions make room for
    reserved: tuple[int, str, float] | None = None  # (job, node, start): the backfill reservation
    waiting: dict[int, str] = field(default_factory=dict)  # job id -> why its tasks wait
