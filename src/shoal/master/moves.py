"""Moving tasks: the master's rebalancing rounds, drains and migrations (pure, like the
rest of the ledger). `snapshot(state)` builds the core's view (`shoal.core.rebalance`) from
the ledger, so the loop, `shoal rebalance --dry-run` and tests judge the same figures;
`MoveDesk` carries the moves out.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from shoal.core.rebalance import Cluster, Movable, Move, RebalancePolicy, rebalance
from shoal.errors import NotFound
from shoal.expressions import parse
from shoal.master.events import Drain
from shoal.model import Attempt, JobRecord, Migrate, Migration, Successor, TaskRecord, TaskState, run_id
from shoal.wire import Kill

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
    cluster = Cluster(cores, load / 100 * cores, table.free.copy(), table.schedulable.copy())
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
    names = frozenset(job.node_names) if job.node_names is not None else None
    return state.masks.filters((parse(expr) for expr in job.spec.constraints), names)


SUCCESSOR_PATIENCE = 60.0  # seconds a make-before-break copy has to serve
RETIRE_AFTER = 1.0  # seconds a replaced copy keeps answering before it is stopped


class MoveDesk:
    """The moving of tasks, part of `MasterState` (pure): rebalancing rounds, drains, and
    migrations in every mode, each kept as a `Migration` record.

    - restart and checkpoint: the task is stopped (`migrating` names its target) and, once it
      has ended as MIGRATED, its next attempt starts on the target (or wherever the scheduler
      places it); a checkpoint's saved state travels with the run spec.
    - make-before-break: a second run of the task (`successor`, attempt n+1) starts on the
      target with its own ports while the old one serves; when it reports healthy the task
      becomes it and the old run is stopped `RETIRE_AFTER` later; a copy that does not serve
      within `SUCCESSOR_PATIENCE`, ends, or loses its node is given up.
    """

    def __init__(
        self, ledger: MasterState, rebalancing: Rebalancing, migrations: list[Migration], now: float
    ) -> None:
        self.ledger = ledger
        self.rebalancing = rebalancing
        self.next_round = now + rebalancing.every
        self.migrations: dict[int, Migration] = {m.id: m for m in migrations}
        self._open: dict[str, int] = {  # task -> its migration, until it runs again
            m.task_id: m.id for m in self.migrations.values() if m.running_at is None and not m.failed
        }
        self._retiring: dict[str, tuple[str, float]] = {}  # replaced runs: their node, when to stop

    # --- rounds and drains ------------------------------------------------------------------

    def plan(self, now: float) -> list[Move]:
        """The moves a rebalancing round would make now (changes nothing)."""
        cluster, movables = snapshot(self.ledger)
        return rebalance(cluster, movables, self.rebalancing.policy, now)

    def round(self, now: float) -> list[Migration]:
        self.next_round = now + self.rebalancing.every
        names = self.ledger.table.names
        return [
            self.migrate(self.ledger.tasks[m.task_id], names[m.target], m.reason, now) for m in self.plan(now)
        ]

    def drain(self, event: Drain) -> None:
        ledger = self.ledger
        node = ledger.nodes.get(event.node)
        if node is None:
            ledger.reply(event.request, error=NotFound(f"no node {event.node}"))
            return
        node.drained = event.drain
        node.drain_deadline = (
            event.now + event.deadline if event.drain and event.deadline is not None else None
        )
        ledger.index_node(node)
        ledger.changes.nodes[node.name] = node
        moved = self._move_off(node.name, event.now, "drain", every=False) if event.drain else []
        ledger.room_freed()
        ledger.reply(event.request, moved)

    def tick(self, now: float) -> None:
        ledger = self.ledger
        for node in ledger.nodes.values():
            if node.drained and node.drain_deadline is not None and now >= node.drain_deadline:
                node.drain_deadline = None
                ledger.changes.nodes[node.name] = node
                self._move_off(node.name, now, "drain deadline", every=True)
        for task_id in list(ledger.active):
            task = ledger.tasks[task_id]
            if task.successor is not None and now - task.successor.since > SUCCESSOR_PATIENCE:
                self.drop_successor(task, f"the new copy did not serve within {SUCCESSOR_PATIENCE:g}s")
        for old_run, (node_name, due) in list(self._retiring.items()):
            if now >= due:
                del self._retiring[old_run]
                ledger.send(node_name, Kill(run_ids=[old_run]))
        if self.rebalancing.loop and now >= self.next_round:
            self.round(now)

    def _move_off(self, node: str, now: float, reason: str, every: bool) -> list[Migration]:
        """Move the tasks of `node` elsewhere: those whose mode allows it (`every`: all)."""
        ledger = self.ledger
        moved = []
        for task_id in list(ledger.active):
            task = ledger.tasks[task_id]
            job = ledger.jobs[task.job_id]
            busy = task.migrating is not None or task.successor is not None or task.kill_requested
            if task.node != node or busy or job.framework:
                continue
            if every or job.spec.migrate is not Migrate.NEVER:
                moved.append(self.migrate(task, "", reason, now))
        return moved

    # --- migrations -------------------------------------------------------------------------

    def migrate(self, task: TaskRecord, target: str, reason: str, now: float) -> Migration:
        """Move `task` to `target` ("": wherever there is room) by its job's mode."""
        ledger = self.ledger
        job = ledger.jobs[task.job_id]
        record = Migration(
            id=max(self.migrations, default=0) + 1,
            at=now,
            task_id=task.id,
            job_id=job.id,
            source=task.node or "",
            target=target,
            reason=reason,
            mode=job.spec.migrate,
        )
        self.migrations[record.id] = ledger.changes.migrations[record.id] = record
        self._open[task.id] = record.id
        if job.spec.migrate is Migrate.MAKE_BEFORE_BREAK and (target := target or self._roomiest(task) or ""):
            self._start_successor(task, target, now)
            return record
        task.migrating = target
        ledger.changes.tasks[task.id] = task
        ledger.send(task.node, Kill(run_ids=[task.run_id]))
        return record

    def ended(self, task: TaskRecord, target: str, now: float) -> None:
        """A stopped task's next attempt (pending now) starts on its target, if it still fits."""
        task.moved_at = now
        row = self.ledger.table.index.get(target)
        if row is not None and self._holds(task)[row]:
            self.ledger.start(task, target, now)

    def running(self, task: TaskRecord, node: str, now: float) -> None:
        """A task reported running: the migration that moved it, if any, is done."""
        if task.successor is None and (move := self._open.pop(task.id, None)) is not None:
            self._update(move, running_at=now, node=node)

    # --- make-before-break ------------------------------------------------------------------

    def _start_successor(self, task: TaskRecord, target: str, now: float) -> None:
        ledger = self.ledger
        ledger.table.allocate(ledger.table.index[target], ledger.vector(task))
        gpus, ports = ledger.devices_for(task, target)
        ledger.devices[target].update(gpus)
        ledger.ports[target].update(ports.values())
        task.successor = Successor(target, task.attempt + 1, now, gpus, ports)
        ledger.changes.tasks[task.id] = task
        ledger.changes.launches[target].append(ledger.run_spec(task, task.successor))

    def successor_report(
        self, task: TaskRecord, healthy: bool | None, state: TaskState, why: str, now: float
    ) -> None:
        copy = task.successor
        assert copy is not None
        if state is TaskState.RUNNING and healthy:
            self._take_over(task, now)
        elif state.terminal:
            self.drop_successor(task, f"the new copy on {copy.node} ended: {why or state.value}")

    def _take_over(self, task: TaskRecord, now: float) -> None:
        """The new copy serves: it becomes the task; the old run is stopped a moment later,
        so requests already on their way to it are answered."""
        ledger = self.ledger
        copy = task.successor
        assert copy is not None and task.node is not None
        old_node, old_run = task.node, task.run_id
        task.history.append(
            Attempt(
                attempt=task.attempt,
                node=old_node,
                state=TaskState.MIGRATED,
                message=f"replaced by a healthy copy on {copy.node}",
                started_at=task.started_at,
                finished_at=now,
            )
        )
        ledger.table.release(ledger.table.index[old_node], ledger.vector(task))
        ledger.devices[old_node].difference_update(task.gpus)
        ledger.ports[old_node].difference_update(task.ports.values())
        ledger.forget_run(old_run)
        task.attempt, task.node, task.gpus, task.ports = copy.attempt, copy.node, copy.gpus, copy.ports
        task.started_at = task.moved_at = now
        task.successor, task.load, task.healthy = None, None, True
        ledger.changes.tasks[task.id] = task
        self._retiring[old_run] = (old_node, now + RETIRE_AFTER)
        if (move := self._open.pop(task.id, None)) is not None:
            self._update(move, running_at=now, node=copy.node)
        ledger.room_freed()

    def drop_successor(self, task: TaskRecord, why: str) -> None:
        """Give the move up: the new copy is stopped, the task runs on where it was."""
        ledger = self.ledger
        copy = task.successor
        assert copy is not None
        task.successor = None
        ledger.changes.tasks[task.id] = task
        ledger.table.release(ledger.table.index[copy.node], ledger.vector(task))
        ledger.devices[copy.node].difference_update(copy.gpus)
        ledger.ports[copy.node].difference_update(copy.ports.values())
        ledger.send(copy.node, Kill(run_ids=[run_id(task.id, copy.attempt)]))
        if (move := self._open.pop(task.id, None)) is not None:
            self._update(move, failed=why)
        ledger.room_freed()

    def _roomiest(self, task: TaskRecord) -> str | None:
        """The schedulable node (not its own) with the most free cpus that holds `task`."""
        table = self.ledger.table
        fits = self._holds(task)
        if task.node in table.index:
            fits[table.index[task.node]] = False
        if not fits.any():
            return None
        rows = np.flatnonzero(fits)
        return table.names[int(rows[np.argmax(table.free[rows, 0])])]

    def _holds(self, task: TaskRecord) -> np.ndarray:
        """Per row: whether the node takes work and has room for `task` now."""
        table = self.ledger.table
        vec = self.ledger.vector(task)
        return table.schedulable & np.all(table.free[:, : len(vec)] + 1e-9 >= vec, axis=1)

    def _update(self, move: int, **fields: object) -> None:
        record = self.migrations[move].model_copy(update=fields)
        self.migrations[move] = self.ledger.changes.migrations[move] = record
