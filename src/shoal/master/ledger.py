"""The ledger: the master's records and their indexes behind a narrow API (pure, no I/O).

It holds the jobs, their tasks and the nodes, and keeps in step with them: the node table
(capacity, allocation and free room, as the core reads it), the pending tasks of each job,
the active tasks, the usage book (per queue and consumer) and the book of GPU devices,
ports and tags (who is where, for static ports and colocation) per node.

Rules kept here, and only here:
- Every change goes through a method of this class, and each records what it changed for
  the store (`commands()` puts it first, as one `Persist`). No caller marks changes by hand.
- A task moves only along `model.TRANSITIONS` (`transition`).
- Tasks are allocated only by `place`, which takes a plan, checks it against the table as
  it is now (`core.scheduler.apply_plan`), and gives each placement its devices and ports
  (`Book.take`: refused where the node's tags break a static port or a colocation rule);
  they are released when a task, or a task's new copy, stops holding them. Offers hold room
  through `hold_offers` and `release_offer`; a restart rebuilds allocations from the records.
- A refused request never widens the node table: resource dimensions come from the nodes.
- Finished jobs are kept for a retention window (age and count), then pruned from memory
  and the store; so are finished migrations.

Desks (frameworks, moves) use this API only; they never write the records' indexes
themselves. `MasterState` composes them and `watch`es transitions for them.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Container, Iterable, Iterator, Mapping
from dataclasses import dataclass

import numpy as np

from shoal.core.cluster import MaskCache, NodeTable
from shoal.core.fairness import UsageBook
from shoal.core.placement import Group
from shoal.core.plan import Placement, Plan, Running
from shoal.core.scheduler import Verdict, apply_plan, never_fits
from shoal.core.tags import Presence
from shoal.errors import ShoalError, SpecError
from shoal.framework.protocol import FrameworkRecord, TaskStatus
from shoal.master.book import Book
from shoal.master.events import Command, Reply, Send
from shoal.master.outbox import Outbox
from shoal.master.shapes import consumer, implied_tasks, run_spec
from shoal.master.views import Views
from shoal.model import (
    TRANSITIONS,
    Attempt,
    JobRecord,
    JobSpec,
    Migration,
    NodeInfo,
    NodeRecord,
    NodeStatus,
    Resources,
    Successor,
    TaskRecord,
    TaskState,
    Usage,
    run_id,
)
from shoal.services import RegistrationRecord
from shoal.wire import Ack, Kill, Launch, Welcome


@dataclass(frozen=True, slots=True)
class Retention:
    """How long finished work is kept: Nomad's job GC, Slurm's MinJobAge and MaxJobCount."""

    age: float = 3600.0  # seconds after a job ended
    count: int = 10_000  # finished jobs (and finished migrations) kept at most


Watcher = Callable[[TaskRecord, JobRecord, TaskState, float], None]


class Ledger:
    def __init__(
        self,
        *,
        jobs: Iterable[JobRecord] = (),
        tasks: Iterable[TaskRecord] = (),
        nodes: Iterable[NodeRecord] = (),
        migrations: Iterable[Migration] = (),
        counters: Mapping[str, int] | None = None,
        retention: Retention | None = None,
        now: float = 0.0,
    ) -> None:
        self.retention = retention or Retention()
        self.table = NodeTable()
        self.masks = MaskCache(self.table)
        self.usage = UsageBook()
        self._vectors: dict[int, np.ndarray] = {}
        self.views = Views()  # what the scheduler reads, kept between cycles
        self._watchers: list[Watcher] = []
        self._changes = Outbox()
        self._freed = False
        # In id order, as jobs are added: the API lists them newest first by walking it back.
        self.jobs: dict[int, JobRecord] = {j.id: j for j in sorted(jobs, key=lambda j: j.id)}
        self.tasks: dict[str, TaskRecord] = {t.id: t for t in tasks}
        self.nodes: dict[str, NodeRecord] = {}
        self._book = Book(self.table, self.nodes)
        self.migrations: dict[int, Migration] = {m.id: m for m in sorted(migrations, key=lambda m: m.id)}
        self.pending: dict[int, dict[str, None]] = defaultdict(dict)  # job id -> ordered task ids
        self.active: dict[str, None] = {}  # tasks holding resources on a node
        self._job_tasks: dict[int, list[str]] = defaultdict(list)
        self._live: dict[int, int] = defaultdict(int)  # job id -> tasks not in an end state
        self._finished: dict[int, float] = {}  # job id -> when its last task ended, oldest first
        for node in nodes:
            # A restarted master gives every node a full timeout to reconnect; its load is
            # measured afresh.
            fresh = {"last_seen": now, "connected": False, "load": 0.0, "history": [], "usage": Usage()}
            self._index_node(node.model_copy(update=fresh))
        for job in self.jobs.values():
            for dim in job.spec.resources.custom:
                self.table.declare(dim)  # even if the nodes that had it are gone
            for task in implied_tasks(job):
                self.tasks.setdefault(task.id, task)
        self._rebuild_indexes()
        counters = counters or {}
        self.next_job_id = max(counters.get("job", 1), max(self.jobs, default=0) + 1)
        self._next_migration = max(counters.get("migration", 1), max(self.migrations, default=0) + 1)

    def _rebuild_indexes(self) -> None:
        ended: list[tuple[float, int]] = []
        for task in sorted(self.tasks.values(), key=lambda t: (t.job_id, t.index)):
            self._job_tasks[task.job_id].append(task.id)
            task.load = None  # measured afresh
            if not task.state.terminal:
                self._live[task.job_id] += 1
            if task.state is TaskState.PENDING:
                self.pending[task.job_id][task.id] = None
            elif task.state.active:
                self._hold(task)
                self.views.changed(self.jobs[task.job_id], task, self.vector(task), self.table.index)
                self._allocate(task.node, task)
                self._book.mark(task.node or "", self._presence(task), task.gpus, task.ports)
                if (copy := task.successor) is not None:
                    self._allocate(copy.node, task)
                    self._book.mark(copy.node, self._presence(task), copy.gpus, copy.ports)
        for job_id in self.jobs:
            if self._live[job_id]:
                self._book.reserve(self.views.presence(self.jobs[job_id]), 1)
            else:
                ended.append(
                    (max((t.finished_at or 0.0 for t in self.tasks_of(job_id)), default=0.0), job_id)
                )
        self._finished = {job_id: at for at, job_id in sorted(ended)}

    # --- reads ------------------------------------------------------------------------

    def tasks_of(self, job_id: int) -> list[TaskRecord]:
        return [self.tasks[t] for t in self._job_tasks.get(job_id, ())]

    def active_tasks(self) -> Iterator[TaskRecord]:
        return (self.tasks[t] for t in self.active)

    def vector(self, task: TaskRecord) -> np.ndarray:
        """The task's ask as a table row; one per job, remade if the table gains dimensions."""
        vec = self._vectors.get(task.job_id)
        if vec is None or len(vec) != len(self.table.dims):
            vec = self._vectors[task.job_id] = self.table.vector(self.jobs[task.job_id].spec.resources)
        return vec

    def allocated(self, node: str) -> Resources:
        """What the tasks (and offers) on `node` hold, as the scheduler counts it."""
        return self.table.resources(self.table.allocated[self.table.index[node]])

    def free_ports(self, node: str) -> int:
        return self._book.free_ports(node)

    def port_room(self, spec: JobSpec) -> np.ndarray | None:
        return self._book.port_room(spec)

    def unknown_resources(self, resources: Resources) -> list[str]:
        """Custom resources no node has declared (a request for them can never run)."""
        return sorted(set(resources.custom) - set(self.table.dims))

    def refuse(self, spec: JobSpec) -> SpecError | None:
        """Why a job of `spec` can never run here (None: it may)."""
        unknown = self.unknown_resources(spec.resources)
        if unknown:
            return SpecError(
                f"resources.custom.{unknown[0]}",
                f"no node has a resource named {unknown[0]!r}; agents declare them with --resource",
            )
        reason = never_fits(self.table, spec.resources)
        return SpecError("resources", reason) if reason is not None else None

    def group(self, job_id: int, task_ids: Iterable[str]) -> Group:
        """The core's view of a job and some of its tasks (all pending, or one being moved);
        kept until a task of the job changes (every cycle reads every waiting job)."""
        return self.views.group(self.jobs[job_id], tuple(task_ids), self.tasks_of(job_id), self.table.index)

    # --- jobs and tasks ---------------------------------------------------------------

    def add_job(
        self,
        owner: str,
        spec: JobSpec,
        now: float,
        node_names: Iterable[str] | None = None,
        framework: str | None = None,
    ) -> JobRecord:
        job = JobRecord(
            id=self.next_job_id,
            owner=owner,
            spec=spec,
            submitted_at=now,
            node_names=sorted(node_names) if node_names is not None else None,
            framework=framework,
        )
        self.next_job_id += 1
        self._changes.counters["job"] = self.next_job_id
        self.jobs[job.id] = self._changes.jobs[job.id] = job
        self._book.reserve(self.views.presence(job), 1)
        # The new tasks are not persisted one by one: a stored job implies all its tasks,
        # pending, until each changes (see `shapes.implied_tasks`), so a 100,000-task array
        # is one row in the store.
        tasks = implied_tasks(job)
        ids = [task.id for task in tasks]
        self.tasks.update(zip(ids, tasks, strict=True))
        self._job_tasks[job.id] = ids
        self.pending[job.id] = dict.fromkeys(ids)
        self._live[job.id] = len(ids)
        return job

    def kill_job(self, job_id: int, now: float) -> None:
        """Kill every task of a job: pending ones at once, active ones by their agents."""
        job = self.jobs[job_id]
        job.killed = True
        self._changes.jobs[job.id] = job
        for task in self.tasks_of(job_id):
            if task.state is TaskState.PENDING:
                self.transition(task, TaskState.KILLED, now, message="killed before it started")
            else:
                self.request_kill(task)

    def update(self, task: TaskRecord, **fields: object) -> None:
        """Change fields of `task` that are not its state or placement (`transition` and
        `place` change those, keeping the indexes and the books in step)."""
        if placed := _PLACEMENT & fields.keys():
            raise ShoalError(f"{sorted(placed)} of task {task.id} change only by transition or place")
        self._write(task, fields)

    def _write(self, task: TaskRecord, fields: dict[str, object]) -> None:
        for key, value in fields.items():
            setattr(task, key, value)
        self._changed(task)

    def _changed(self, task: TaskRecord) -> None:
        """Record that `task` changed; the views made of it are made again when next read."""
        self._changes.tasks[task.id] = task
        self.views.changed(self.jobs[task.job_id], task, self.vector(task), self.table.index)

    def holding(self, task: TaskRecord) -> tuple[Running, ...]:
        """What an active task holds, as the scheduler weighs it."""
        return self.views.holding(self.jobs[task.job_id], task)

    def observe(self, record: TaskRecord | NodeRecord, **fields: object) -> None:
        """Live readings (heartbeats, load, the connection): kept in memory, stored only with
        the record's next change, and measured afresh after a restart."""
        for key, value in fields.items():
            setattr(record, key, value)
        if isinstance(record, NodeRecord) and "load" in fields:
            self.table.set_utilization(record.name, record.load / 100.0)
        if isinstance(record, NodeRecord) and "connected" in fields:
            self._changes.seen_nodes[record.name] = record  # what follows nodes must hear of it

    def request_kill(self, task: TaskRecord) -> None:
        """Ask the agent to stop an active task (once: a lost Kill is resent on reports)."""
        if task.state.active and not task.kill_requested:
            self.update(task, kill_requested=True)
            self.send(task.node, Kill(run_ids=[task.run_id]))

    def watch(self, watcher: Watcher) -> None:
        """Call `watcher(task, job, was, now)` after every transition."""
        self._watchers.append(watcher)

    def transition(self, task: TaskRecord, to: TaskState, now: float, **fields: object) -> None:
        """The one way a task changes state; keeps the indexes and the books in step."""
        was = task.state
        if to not in TRANSITIONS[was]:
            raise ShoalError(f"illegal transition of task {task.id}: {was.value} -> {to.value}")
        if was.active and not to.active:
            self._unhold(task)
        if was is TaskState.PENDING:
            waiting = self.pending[task.job_id]
            waiting.pop(task.id, None)
            if not waiting:
                del self.pending[task.job_id]
            task.nominated = None
        task.state = to
        for key, value in fields.items():
            setattr(task, key, value)
        if to is TaskState.PENDING:
            self.pending[task.job_id][task.id] = None
        if to.active and not was.active:
            self._hold(task)
        if to.terminal:
            task.finished_at = now
        if was.terminal != to.terminal:
            self._count_live(task.job_id, was, now)
        self._changed(task)
        job = self.jobs[task.job_id]
        for watcher in self._watchers:
            watcher(task, job, was, now)

    def _count_live(self, job_id: int, was: TaskState, now: float) -> None:
        """A task of the job entered or left an end state: the job finished, or runs again."""
        self._live[job_id] += 1 if was.terminal else -1
        if self._live[job_id] == (1 if was.terminal else 0):  # the job ran again, or finished
            self._book.reserve(self.views.presence(self.jobs[job_id]), 1 if was.terminal else -1)
        if self._live[job_id]:
            self._finished.pop(job_id, None)
        else:
            self._finished[job_id] = now

    def _hold(self, task: TaskRecord) -> None:
        job = self.jobs[task.job_id]
        self.active[task.id] = None
        self.usage.add(job.spec.queue, consumer(job), self.vector(task))

    def _unhold(self, task: TaskRecord) -> None:
        job = self.jobs[task.job_id]
        self.active.pop(task.id, None)
        self.usage.remove(job.spec.queue, consumer(job), self.vector(task))
        task.load = None
        task.checks = {}
        self._book.release(task.node or "", self._presence(task), task.gpus, task.ports)
        self._release(task.node, task)

    def _presence(self, task: TaskRecord) -> Presence | None:
        return self.views.presence(self.jobs[task.job_id])

    def _allocate(self, node: str | None, task: TaskRecord) -> None:
        if node in self.table.index:
            self.table.allocate(self.table.index[node], self.vector(task))

    def _release(self, node: str | None, task: TaskRecord) -> None:
        if node in self.table.index:
            self.table.release(self.table.index[node], self.vector(task))
            self._freed = True

    def take_freed(self) -> bool:
        """Whether room went back to the pool (or a node changed) since the last call: then
        native jobs and frameworks may use it."""
        freed, self._freed = self._freed, False
        return freed

    # --- placing ------------------------------------------------------------------------

    def place(self, plan: Plan, now: float) -> Verdict:
        """Carry out what of `plan` still fits: each accepted task (or new copy, for a
        make-before-break move) is allocated, equipped with devices and ports, and launched."""
        verdict = apply_plan(self.table, plan)
        accepted: list[Placement] = []
        rejected = dict(verdict.rejected)
        launches = self._changes.launches
        for p in verdict.accepted:
            task = self.tasks[p.task_id]
            spec = self.jobs[task.job_id].spec
            presence = self._presence(task)
            equipped = (
                self._book.take(self.nodes[p.node].info, spec, presence)
                if spec.resources.gpus or spec.ports or presence is not None
                else ([], {})
            )
            if isinstance(equipped, str):
                self.table.release(self.table.index[p.node], self.vector(task))
                rejected[p.task_id] = equipped
                continue
            gpus, ports = equipped
            if p.copy:
                self.update(task, successor=Successor(p.node, task.next_attempt, now, gpus, ports))
                launches[p.node].append(run_spec(spec, task, task.successor))
            else:
                self.transition(
                    task, TaskState.ASSIGNED, now, node=p.node, gpus=gpus, ports=ports, message=""
                )
                launches[p.node].append(run_spec(spec, task))
            accepted.append(p)
        return Verdict(tuple(accepted), rejected)

    def relaunch(self, task: TaskRecord) -> None:
        """Send an assigned task's run again (its agent never received it)."""
        self._changes.launches[task.node or ""].append(run_spec(self.jobs[task.job_id].spec, task))

    def take_over(self, task: TaskRecord, now: float) -> tuple[str, str]:
        """The task's new copy becomes the task (the old one kept in its history); the old
        copy's room, devices and ports are released. Returns the old copy's node and run id
        (the caller stops it)."""
        copy = task.successor
        assert copy is not None and task.node is not None
        old_node, old_run = task.node, task.run_id
        replaced = Attempt(
            attempt=task.attempt,
            node=old_node,
            state=TaskState.MIGRATED,
            message=f"replaced by a healthy copy on {copy.node}",
            started_at=task.started_at,
            finished_at=now,
        )
        self._release(old_node, task)
        self._book.release(old_node, self._presence(task), task.gpus, task.ports)
        self._write(
            task,
            {
                "history": [*task.history, replaced],
                "attempt": copy.attempt,
                "node": copy.node,
                "gpus": copy.gpus,
                "ports": copy.ports,
                "started_at": now,
                "moved_at": now,
                "successor": None,
                "load": None,
                "checks": copy.checks,
            },
        )
        return old_node, old_run

    def drop_copy(self, task: TaskRecord, why: str, now: float) -> Successor:
        """Stop the task's new copy, kept in its history; its room, devices and ports go back."""
        copy = task.successor
        assert copy is not None
        given_up = Attempt(
            attempt=copy.attempt,
            node=copy.node,
            state=TaskState.KILLED,
            message=f"new copy given up: {why}",
            started_at=copy.since,
            finished_at=now,
        )
        self.update(task, successor=None, history=[*task.history, given_up])
        self._release(copy.node, task)
        self._book.release(copy.node, self._presence(task), copy.gpus, copy.ports)
        self.send(copy.node, Kill(run_ids=[run_id(task.id, copy.attempt)]))
        return copy

    def hold_offers(self, rows: np.ndarray, amounts: np.ndarray) -> None:
        """Hold room for offers: no plan may place on it until `release_offer`."""
        self.table.allocate_many(rows, amounts)

    def release_offer(self, row: int, amount: np.ndarray) -> None:
        self.table.release(row, amount)
        self._freed = True

    # --- nodes ----------------------------------------------------------------------------

    def register_node(self, info: NodeInfo, now: float) -> NodeRecord:
        node = self.nodes.get(info.name) or NodeRecord(info=info, last_seen=now)
        node.info = info
        node.status = NodeStatus.UP
        node.removed = None  # joined again
        node.connected = True
        node.last_seen = now
        self._index_node(node)
        self._changes.nodes[node.name] = node
        return node

    def update_node(self, node: NodeRecord, **fields: object) -> None:
        """Change a node's record (status, drain) and what the table knows of it."""
        for key, value in fields.items():
            setattr(node, key, value)
        self._index_node(node)
        self._changes.nodes[node.name] = node

    def _index_node(self, node: NodeRecord) -> None:
        self.nodes[node.name] = node
        info = node.info
        attributes = {**info.labels, **info.attributes, "name": info.name, "hostname": info.hostname}
        self.table.upsert(
            info.name, info.capacity, attributes, node.status is NodeStatus.UP and not node.drained
        )
        self._freed = True

    # --- frameworks and migrations (records the desks keep here, so they are stored) ----------

    def save_framework(self, record: FrameworkRecord) -> None:
        self._changes.frameworks[record.id] = record

    def add_update(self, framework: str, status: TaskStatus) -> None:
        self._changes.updates.append((framework, status))

    def acknowledged(self, uuid: str) -> None:
        self._changes.acked.append(uuid)

    def save_registration(self, record: RegistrationRecord) -> None:
        self._changes.forgotten_registrations.pop(record.spec.id, None)
        self._changes.registrations[record.spec.id] = record

    def forget_registration(self, registration: str) -> None:
        self._changes.registrations.pop(registration, None)
        self._changes.forgotten_registrations[registration] = None

    def add_migration(self, **fields: object) -> Migration:
        """A new migration record, under an id never given before."""
        record = Migration(id=self._next_migration, **fields)  # type: ignore[arg-type]
        self._next_migration += 1
        self._changes.counters["migration"] = self._next_migration
        self.migrations[record.id] = self._changes.migrations[record.id] = record
        return record

    def update_migration(self, move: int, **fields: object) -> Migration:
        record = self.migrations[move].model_copy(update=fields)
        self.migrations[move] = self._changes.migrations[move] = record
        return record

    # --- retention --------------------------------------------------------------------------

    def prune(self, now: float, pinned: Container[int] = ()) -> list[int]:
        """Forget finished jobs past the retention window (but the `pinned`, still wanted by
        a desk), and finished migrations beyond it; returns the jobs forgotten."""
        keep = self.retention
        gone: list[int] = []
        for job_id, ended_at in self._finished.items():  # oldest first: the loop stops early
            if len(self._finished) - len(gone) <= keep.count and now < ended_at + keep.age:
                break
            if job_id not in pinned:
                gone.append(job_id)
        for job_id in gone:
            del self._finished[job_id]
            self._forget_job(job_id)
        self._changes.forgotten_jobs.extend(gone)
        done = self._done_migrations()
        for record in done[: max(0, len(done) - keep.count)]:
            self._forget_migration(record.id)
        for record in done[max(0, len(done) - keep.count) :]:
            if now >= (record.running_at or record.at) + keep.age:
                self._forget_migration(record.id)
        return gone

    def next_prune(self, pinned: Container[int] = ()) -> float:
        """When `prune` will next forget something (a time already past: now; math.inf: not
        until more work ends)."""
        keep = self.retention
        due = math.inf
        if self.migrations:
            done = self._done_migrations()
            if len(done) > keep.count:
                return -math.inf
            due = min(((m.running_at or m.at) + keep.age for m in done), default=math.inf)
        latest = -math.inf  # `prune` reaches a job only once every older one is past the age
        for job_id, ended_at in self._finished.items():
            if len(self._finished) > keep.count:
                if job_id not in pinned:
                    return -math.inf
                continue
            latest = max(latest, ended_at + keep.age)
            if job_id not in pinned:
                return min(due, latest)
        return due

    def _done_migrations(self) -> list[Migration]:
        return [m for m in self.migrations.values() if m.running_at is not None or m.failed]

    def _forget_job(self, job_id: int) -> None:
        for task_id in self._job_tasks.pop(job_id, ()):
            del self.tasks[task_id]
        del self.jobs[job_id]
        self._live.pop(job_id, None)
        self._vectors.pop(job_id, None)
        self.views.forget_job(job_id)
        self._changes.jobs.pop(job_id, None)

    def _forget_migration(self, move: int) -> None:
        del self.migrations[move]
        self._changes.migrations.pop(move, None)
        self._changes.forgotten_migrations.append(move)

    # --- output ---------------------------------------------------------------------------

    def send(self, node: str | None, frame: Launch | Kill | Ack | Welcome) -> None:
        if node is not None:
            self._changes.out.append(Send(node, frame))

    def reply(self, request: int, value: object = None, error: ShoalError | None = None) -> None:
        self._changes.out.append(Reply(request, value, error))

    def emit(self, command: Command) -> None:
        self._changes.out.append(command)

    def changed(self) -> tuple[Iterable[TaskRecord], Iterable[NodeRecord]]:
        """The tasks and nodes changed since the last `commands()`: stored changes, and a node's
        connection coming or going (a live reading, not stored)."""
        changes = self._changes
        return changes.tasks.values(), {**changes.seen_nodes, **changes.nodes}.values()

    def commands(self) -> list[Command]:
        """Everything the events since the last call changed: one `Persist` first, then the
        launches, frames and replies in the order they were made."""
        changes, self._changes = self._changes, Outbox()
        return changes.commands()


_PLACEMENT = frozenset({"state", "node", "gpus", "ports"})
