"""The ledger as the rebalancer sees it: nodes' smoothed load and the tasks that may move.

`snapshot(state)` is pure: it reads the master's state machine and builds the core's view
(`shoal.core.rebalance`), so the loop, `shoal rebalance --dry-run` and tests judge the same
figures.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from shoal.core.expressions import parse
from shoal.core.rebalance import Cluster, Movable, RebalancePolicy
from shoal.model import JobRecord, TaskState

if TYPE_CHECKING:
    from shoal.master.state import MasterState


@dataclass(frozen=True, slots=True)
class Rebalancing:
    policy: RebalancePolicy = field(default_factory=RebalancePolicy)
    loop: bool = False  # run a round every `every` seconds
    every: float = 15.0


def snapshot(state: MasterState) -> tuple[Cluster, list[Movable]]:
    table = state.table
    cores = table.capacity[:, 0].copy()
    load = np.array([state.nodes[name].load for name in table.names]) if len(table) else np.zeros(0)
    cluster = Cluster(cores, load / 100 * cores, table.capacity - table.allocated, table.schedulable.copy())
    movables = []
    for task_id in state.active:
        task = state.tasks[task_id]
        job = state.jobs[task.job_id]
        busy = (
            task.migrating is not None
            or task.successor is not None
            or task.kill_requested
            or task.evicted_by is not None
        )
        if task.state is not TaskState.RUNNING or busy or job.framework or task.node not in table.index:
            continue
        movables.append(
            Movable(
                task_id=task.id,
                row=table.index[task.node],
                load=(task.load.cpu_percent / 100) if task.load is not None else 0.0,
                ask=table.vector(job.spec.resources),
                mode=job.spec.migrate,
                priority=job.spec.priority,
                moved_at=task.moved_at if task.moved_at is not None else -np.inf,
                allowed=_allowed(state, job),
            )
        )
    return cluster, movables


def _allowed(state: MasterState, job: JobRecord) -> np.ndarray | None:
    """The rows a job's tasks may run on (None: any)."""
    spec = job.spec
    if not spec.constraints and job.node_names is None:
        return None
    mask = np.ones(len(state.table), dtype=bool)
    for expr in spec.constraints:
        mask &= state.masks.constraint(parse(expr))
    if job.node_names is not None:
        mask &= state.masks.nodes(frozenset(job.node_names))
    return mask
