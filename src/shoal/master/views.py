"""What the scheduler reads of the ledger, kept between cycles: each waiting job's `Group`,
each job's `Presence` (its tags and colocation rules), each active task's holdings, and the
book of when active tasks are expected to end.

Every cycle reads every waiting job, and a cycle that looks ahead reads every active task:
these are made once and kept until a task of theirs changes (the ledger says which). Pure.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from shoal.core.backfill import Releases
from shoal.core.placement import Group
from shoal.core.plan import Running
from shoal.core.tags import Presence
from shoal.master import shapes
from shoal.model import JobRecord, TaskRecord

COPY = "+copy"  # after a task id: the key of a move's new copy in the book of releases


class Views:
    def __init__(self) -> None:
        self._holding: dict[str, tuple[Running, ...]] = {}  # task id -> what it holds
        self._groups: dict[int, Group] = {}  # job id -> its waiting tasks, as the core sees them
        self._presence: dict[int, Presence | None] = {}  # job id -> its part in who is where
        self.releases = Releases()  # when active tasks are expected to end, for backfill

    def group(
        self, job: JobRecord, ids: tuple[str, ...], tasks: Sequence[TaskRecord], nodes: Mapping[str, int]
    ) -> Group:
        kept = self._groups.get(job.id)
        if kept is None or kept.tasks != ids:
            kept = self._groups[job.id] = shapes.group(job, ids, tasks, nodes, self.presence(job))
        return kept

    def presence(self, job: JobRecord) -> Presence | None:
        """The job's presence (its spec never changes: made once)."""
        try:
            return self._presence[job.id]
        except KeyError:
            made = self._presence[job.id] = shapes.presence(job.spec)
            return made

    def holding(self, job: JobRecord, task: TaskRecord) -> tuple[Running, ...]:
        held = self._holding.get(task.id)
        if held is None:
            held = self._holding[task.id] = tuple(shapes.holding(job, task))
        return held

    def changed(self, job: JobRecord, task: TaskRecord, vector: np.ndarray, rows: Mapping[str, int]) -> None:
        """`task` changed: forget what was made of it, and keep its entries in the book of
        expected releases (itself while active, the copy a move is starting while it has one)."""
        self._holding.pop(task.id, None)
        self._groups.pop(job.id, None)
        spec = job.spec
        copy = task.successor
        for key, node, since in (
            (task.id, task.node, task.started_at),
            (task.id + COPY, copy and copy.node, copy and copy.since),
        ):
            row = rows.get(node) if node is not None and task.state.active else None
            if row is None:
                self.releases.drop(key)
            else:
                self.releases.put(key, row, vector, since, spec.time_limit, spec.queue)

    def forget_job(self, job_id: int) -> None:
        self._groups.pop(job_id, None)
        self._presence.pop(job_id, None)
