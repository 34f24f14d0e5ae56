"""Moving tasks: the master's rebalancing rounds, drains and migrations (pure, no I/O).

`snapshot(ledger)` builds the core's view (`shoal.core.rebalance`) from the ledger, so the
loop, `shoal rebalance --dry-run` and tests judge the same figures; `MoveDesk` carries the
moves out, each target checked by the core's rules (`shoal.core.targets`) and placed
through a plan.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from shoal.checks import serves
from shoal.core.plan import Placement, Plan
from shoal.core.rebalance import Cluster, Movable, Move, RebalancePolicy, rebalance
from shoal.core.targets import admissible, best_target
from shoal.errors import NotFound
from shoal.master.events import Drain
from shoal.master.ledger import Ledger
from shoal.model import Migrate, Migration, Strategy, TaskRecord, TaskState
from shoal.wire import Kill, RunReport


@dataclass(frozen=True, slots=True)
class Rebalancing:
    policy: RebalancePolicy = field(default_factory=RebalancePolicy)
    loop: bool = False  # run a round every `every` seconds
    every: float = 15.0


def snapshot(ledger: Ledger) -> tuple[Cluster, list[Movable]]:
    table = ledger.table
    cores = table.capacity[:, 0].copy()
    load = np.array([ledger.nodes[name].load for name in table.names]) if len(table) else np.zeros(0)
    cluster = Cluster(cores, load / 100 * cores, table.free.copy(), table.schedulable.copy())
    allowed: dict[tuple[int, str], np.ndarray | None] = {}
    movables = []
    for task in ledger.active_tasks():
        job = ledger.jobs[task.job_id]
        if (
            task.state is not TaskState.RUNNING
            or _busy(task)
            or job.framework
            or task.node not in table.index
        ):
            continue
        key = (job.id, task.node)
        if key not in allowed:
            allowed[key] = _allowed(ledger, job.id, task.node)
        movables.append(
            Movable(
                task_id=task.id,
                row=table.index[task.node],
                load=(task.load.cpu_percent / 100) if task.load is not None else 0.0,
                ask=ledger.vector(task),
                mode=job.spec.migrate,
                priority=job.spec.priority,
                moved_at=task.moved_at if task.moved_at is not None else -np.inf,
                allowed=allowed[key],
            )
        )
    return cluster, movables


def _allowed(ledger: Ledger, job_id: int, source: str) -> np.ndarray | None:
    """Rows a task of the job, moving off `source`, may go to by its job's rules (static ports
    and colocation among them) and where the ledger has the dynamic ports to equip it (None:
    any row)."""
    allowed = admissible(ledger.table, ledger.masks, ledger.group(job_id, ()), source)
    ports = ledger.port_room(ledger.jobs[job_id].spec)
    if ports is None:
        return allowed
    return ports if allowed is None else allowed & ports


def _busy(task: TaskRecord) -> bool:
    """Being stopped, moved or preempted already."""
    return (
        task.migrating is not None
        or task.successor is not None
        or task.kill_requested
        or task.evicted_by is not None
    )


SUCCESSOR_PATIENCE = 60.0  # seconds a make-before-break copy has to serve


class MoveDesk:
    """The moving of tasks, part of the master's state (pure): rebalancing rounds, drains,
    and migrations in every mode, each kept as a `Migration` record in the ledger.

    - restart and checkpoint: the task is stopped (`migrating` names its target) and, once it
      has ended as MIGRATED, its next attempt is placed on the target if the target still
      admits it (or wherever the scheduler places it); a checkpoint's saved state travels
      with the run spec.
    - make-before-break: a second run of the task (`successor`, attempt n+1) is placed on
      the target with its own ports while the old one serves; when all its checks pass the
      task becomes it and the old run is asked to stop at once (its agent waits out the
      job's shutdown delay before SIGTERM, so requests on their way to it are answered); a
      copy that does not serve within `SUCCESSOR_PATIENCE`, ends, or loses its node is given
      up.
    """

    def __init__(self, ledger: Ledger, rebalancing: Rebalancing, strategy: Strategy, now: float) -> None:
        self.ledger = ledger
        self.rebalancing = rebalancing
        self.strategy = strategy  # the cluster's default, for jobs that name none
        self.next_round = now + rebalancing.every
        self._open: dict[str, int] = {  # task -> its migration, until it runs again
            m.task_id: m.id for m in ledger.migrations.values() if m.running_at is None and not m.failed
        }
        self._drained = {n.name for n in ledger.nodes.values() if n.drained}
        self._copies = {t.id for t in ledger.active_tasks() if t.successor is not None}
        # A drained node keeps tasks that may move but found no room: a tick tries them
        # again once room is freed (`room_freed`), not before, since nothing else could
        # place them.
        self._stuck = False
        self._room = False

    # --- rounds and drains ------------------------------------------------------------------

    def plan(self, now: float) -> list[Move]:
        """The moves a rebalancing round would make now (changes nothing)."""
        cluster, movables = snapshot(self.ledger)
        return rebalance(cluster, movables, self.rebalancing.policy, now)

    def round(self, now: float) -> list[Migration]:
        self.next_round = now + self.rebalancing.every
        names = self.ledger.table.names
        done = []
        for m in self.plan(now):
            # An earlier move of this round may have used up what the target admits.
            if (
                record := self.migrate(self.ledger.tasks[m.task_id], names[m.target], m.reason, now)
            ) is not None:
                done.append(record)
        return done

    def drain(self, event: Drain) -> None:
        ledger = self.ledger
        node = ledger.nodes.get(event.node)
        if node is None:
            ledger.reply(event.request, error=NotFound(f"no node {event.node}"))
            return
        deadline = event.now + event.deadline if event.drain and event.deadline is not None else None
        ledger.update_node(node, drained=event.drain, drain_deadline=deadline)
        if event.drain:
            self._drained.add(node.name)
        else:
            self._drained.discard(node.name)
        moved = self._move_off(node.name, event.now, "drain", every=False) if event.drain else []
        ledger.reply(event.request, moved)

    def tick(self, now: float) -> None:
        ledger = self.ledger
        self._stuck = self._room = False
        drained = [n for n in ledger.nodes.values() if n.drained] if self._drained else []
        for node in drained:  # in the table's order, as every pass before
            if node.drain_deadline is not None and now >= node.drain_deadline:
                ledger.update_node(node, drain_deadline=None)
                self._move_off(node.name, now, "drain deadline", every=True)
            else:
                self._move_off(node.name, now, "drain", every=False)  # services waiting for room
        if overdue := {t for t in self._copies if now > self._patience_ends(t)}:
            for task in [t for t in ledger.active_tasks() if t.id in overdue]:
                self.drop_successor(task, f"the new copy did not serve within {SUCCESSOR_PATIENCE:g}s", now)
        if self.rebalancing.loop and now >= self.next_round:
            self.round(now)

    def next_due(self) -> float:
        """The earliest time `tick` has something to do: a drain's deadline, a new copy's
        patience running out, the next round (math.inf: none; a time already past: now)."""
        if self._stuck and self._room:
            return -math.inf
        due = self.next_round if self.rebalancing.loop else math.inf
        for name in self._drained:
            if (deadline := self.ledger.nodes[name].drain_deadline) is not None:
                due = min(due, deadline)
        for task_id in self._copies:
            due = min(due, math.nextafter(self._patience_ends(task_id), math.inf))
        return due

    def room_freed(self) -> None:
        """Room (or a node) came back to the pool: tasks stuck on a drained node may move."""
        self._room = True

    def _patience_ends(self, task_id: str) -> float:
        """When the task's new copy is given up unless it serves (math.inf: it has none)."""
        task = self.ledger.tasks.get(task_id)
        copy = task.successor if task is not None and task.state.active else None
        return copy.since + SUCCESSOR_PATIENCE if copy is not None else math.inf

    def _move_off(self, node: str, now: float, reason: str, every: bool) -> list[Migration]:
        """Move the tasks of `node` elsewhere: those whose mode allows it (`every`: all)."""
        moved = []
        for task in list(self.ledger.active_tasks()):
            job = self.ledger.jobs[task.job_id]
            if task.node != node or _busy(task) or job.framework:
                continue
            if every or job.spec.migrate is not Migrate.NEVER:
                record = self.migrate(task, "", reason, now, force=every)
                if record is not None:
                    moved.append(record)
                else:
                    self._stuck = True
        return moved

    # --- migrations -------------------------------------------------------------------------

    def migrate(
        self, task: TaskRecord, target: str, reason: str, now: float, force: bool = False
    ) -> Migration | None:
        """Move `task` to `target` ("": wherever its job's rules and the room allow) by its
        job's mode. A make-before-break task moves only once its new copy has a place, so a
        service is never stopped for a move that may not happen (`force`, at a drain's
        deadline: stopped all the same). None, and nothing done, when no move is made now."""
        ledger = self.ledger
        if target and not self._admits(task, target, task.node or ""):
            return None
        if ledger.jobs[task.job_id].spec.migrate is Migrate.MAKE_BEFORE_BREAK:
            copy_to = target or self._best(task)
            if copy_to and self._place(task, copy_to, now, copy=True):
                return self._record(task, copy_to, reason, now)
            if not force:
                return None
        record = self._record(task, target, reason, now)
        ledger.update(task, migrating=target)
        ledger.send(task.node, Kill(run_ids=[task.run_id]))
        return record

    def _record(self, task: TaskRecord, target: str, reason: str, now: float) -> Migration:
        job = self.ledger.jobs[task.job_id]
        record = self.ledger.add_migration(
            at=now,
            task_id=task.id,
            job_id=job.id,
            source=task.node or "",
            target=target,
            reason=reason,
            mode=job.spec.migrate,
        )
        self._open[task.id] = record.id
        return record

    def ended(self, task: TaskRecord, target: str, now: float) -> None:
        """A stopped task's next attempt (pending now) is placed on its target, if the target
        still admits it and has room (else the scheduler places it)."""
        self.ledger.update(task, moved_at=now)
        source = (task.history[-1].node or "") if task.history else ""
        if target and self._admits(task, target, source):
            self._place(task, target, now, copy=False)

    def ended_for_good(self, task: TaskRecord) -> None:
        """A task ended and will not run again as part of a move (it finished, failed, was
        killed or lost): a move still open for it is over."""
        if (move := self._open.pop(task.id, None)) is not None:
            self.ledger.update_migration(move, failed=f"the task ended ({task.state.value}) before it moved")

    def running(self, task: TaskRecord, node: str, now: float) -> None:
        """A task reported running: the migration that moved it, if any, is done."""
        if task.successor is None and (move := self._open.pop(task.id, None)) is not None:
            self.ledger.update_migration(move, running_at=now, node=node)

    def _place(self, task: TaskRecord, node: str, now: float, copy: bool) -> bool:
        resources = self.ledger.jobs[task.job_id].spec.resources
        verdict = self.ledger.place(Plan((Placement(task.id, node, resources, copy),)), now)
        if copy and verdict.accepted:
            self._copies.add(task.id)
        return bool(verdict.accepted)

    def _admits(self, task: TaskRecord, node: str, source: str) -> bool:
        """Whether `node` may take `task`, moving off `source`, by its job's rules (room is
        the plan's check)."""
        ledger = self.ledger
        row = ledger.table.index.get(node)
        if row is None or node == source or not ledger.table.schedulable[row]:
            return False
        allowed = _allowed(ledger, task.job_id, source)
        return allowed is None or bool(allowed[row])

    def _best(self, task: TaskRecord) -> str | None:
        ledger = self.ledger
        spec = ledger.jobs[task.job_id].spec
        group = ledger.group(task.job_id, (task.id,))
        strategy = spec.strategy or self.strategy
        usable = ledger.port_room(spec)
        return best_target(ledger.table, ledger.masks, group, task.node or "", strategy, usable)

    # --- make-before-break ------------------------------------------------------------------

    def successor_report(self, task: TaskRecord, report: RunReport, now: float) -> None:
        copy = task.successor
        assert copy is not None
        if report.checks != copy.checks:  # kept as any change of the task: a restart knows them
            copy.checks = dict(report.checks)
            self.ledger.update(task, successor=copy)
        state, why = report.state, report.message
        if state is TaskState.RUNNING and serves(self.ledger.jobs[task.job_id].spec.checks, copy.checks):
            self._take_over(task, now)
        elif state.terminal:
            self.drop_successor(task, f"the new copy on {copy.node} ended: {why or state.value}", now)

    def _take_over(self, task: TaskRecord, now: float) -> None:
        """The new copy serves: it becomes the task, and the old run is asked to stop (after
        the job's shutdown delay, on its agent)."""
        ledger = self.ledger
        copy = task.successor
        assert copy is not None
        old_node, old_run = ledger.take_over(task, now)
        self._copies.discard(task.id)
        self._may_move_again(task)
        ledger.send(old_node, Kill(run_ids=[old_run]))
        if (move := self._open.pop(task.id, None)) is not None:
            ledger.update_migration(move, running_at=now, node=copy.node)

    def drop_successor(self, task: TaskRecord, why: str, now: float) -> None:
        """Give the move up: the new copy is stopped, the task runs on where it was."""
        self.ledger.drop_copy(task, why, now)
        self._copies.discard(task.id)
        self._may_move_again(task)
        if (move := self._open.pop(task.id, None)) is not None:
            self.ledger.update_migration(move, failed=why)

    def _may_move_again(self, task: TaskRecord) -> None:
        """The task is free to move again: if its node is drained, the next pass tries it."""
        if task.node in self._drained:
            self._stuck = True
