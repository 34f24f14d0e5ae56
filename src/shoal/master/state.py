"""The master's state machine: the ledger, changed only by events.

`MasterState.handle(*events) -> list[Command]` is the whole interface. Events are what
happened (a submission, a frame from an agent, a tick of the clock); commands are what the
I/O shell must do (persist records, send frames, answer a request, drop a connection).
Time arrives inside events; nothing here reads a clock or touches a socket.

Theory of operation
- Commands come back in a fixed order: one `Persist` first (every record the events
  changed), then frames and replies. The shell executes them in that order, so nothing is
  acknowledged or launched before it is in the store.
- A task moves only along `model.TRANSITIONS`. FAILED and LOST go back to PENDING when the
  job's restart policy grants another attempt; each attempt has its own run id, so a report
  from an old attempt can never be mistaken for the current one.
- Agents own what actually runs. A `Register` carries an agent's whole task table: the
  master adopts the runs it expects, kills those it does not, relaunches assigned runs the
  agent never received, and marks running ones the agent no longer has as LOST.
- A node that misses heartbeats for `heartbeat_timeout` seconds is DOWN, its tasks LOST, and
  its connection dropped; it comes back only by registering again.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from shoal.core.cluster import MaskCache, NodeTable
from shoal.core.fairness import UsageBook
from shoal.core.placement import Group, SpreadTarget
from shoal.core.plan import Running
from shoal.core.rebalance import smooth
from shoal.core.scheduler import Policy, apply_plan, never_fits, schedule
from shoal.errors import ShoalError, SpecError
from shoal.expressions import parse
from shoal.framework.protocol import FrameworkRecord, TaskStatus
from shoal.master.events import (
    AgentGone,
    Command,
    Disconnect,
    Drain,
    Event,
    FrameworkCall,
    FromAgent,
    KillJob,
    Persist,
    RebalanceNow,
    Reply,
    Send,
    StreamClosed,
    Submit,
    SubscribeFramework,
    Tick,
)
from shoal.master.frameworks import FrameworkDesk, FrameworkPolicy
from shoal.master.moves import MoveDesk, Rebalancing
from shoal.model import (
    TRANSITIONS,
    Attempt,
    JobRecord,
    Migrate,
    Migration,
    NodeRecord,
    NodeStatus,
    Resources,
    RunUsage,
    Successor,
    TaskLoad,
    TaskRecord,
    TaskState,
    parse_run_id,
    run_id,
)
from shoal.wire import (
    Ack,
    Heartbeat,
    Kill,
    Launch,
    Register,
    RunReport,
    RunReports,
    RunSpec,
)

HISTORY = 60  # smoothed load samples kept per node

# Tasks of one job a cycle considers: a large array is placed a slice per cycle, so no
# cycle (and no API call that triggers one) walks all of it.
GROUP_CAP = 4096


def _consumer(job: JobRecord) -> str:
    """Whose share a job's tasks count in, within its queue: its framework's, or its owner's."""
    return job.framework or job.owner


def _implied_tasks(job: JobRecord) -> list[TaskRecord]:
    """The tasks a job has as submitted: all pending, first attempt."""
    return [TaskRecord(id=f"{job.id}.{i}", job_id=job.id, index=i) for i in range(job.spec.count)]


@dataclass
class Changes:
    """What one `handle` changed and must say: persisted first, then sent."""

    jobs: dict[int, JobRecord] = field(default_factory=dict)
    tasks: dict[str, TaskRecord] = field(default_factory=dict)
    nodes: dict[str, NodeRecord] = field(default_factory=dict)
    frameworks: dict[str, FrameworkRecord] = field(default_factory=dict)
    updates: list[tuple[str, TaskStatus]] = field(default_factory=list)
    acked: list[str] = field(default_factory=list)
    migrations: dict[int, Migration] = field(default_factory=dict)
    out: list[Command] = field(default_factory=list)
    launches: dict[str, list[RunSpec]] = field(default_factory=lambda: defaultdict(list))


class MasterState:
    """The ledger: jobs, tasks and nodes, and the rules that change them."""

    def __init__(
        self,
        heartbeat_timeout: float = 10.0,
        *,
        policy: Policy | None = None,
        jobs: Iterable[JobRecord] = (),
        tasks: Iterable[TaskRecord] = (),
        nodes: Iterable[NodeRecord] = (),
        frameworks: Iterable[FrameworkRecord] = (),
        updates: Iterable[tuple[str, TaskStatus]] = (),
        framework_policy: FrameworkPolicy | None = None,
        rebalancing: Rebalancing | None = None,
        migrations: Iterable[Migration] = (),
        now: float = 0.0,
    ) -> None:
        self.heartbeat_timeout = heartbeat_timeout
        self.policy = policy or Policy()
        self.table = NodeTable()
        self.masks = MaskCache(self.table)
        self._vectors: dict[int, np.ndarray] = {}
        self.jobs: dict[int, JobRecord] = {j.id: j for j in jobs}
        self.tasks: dict[str, TaskRecord] = {t.id: t for t in tasks}
        for job in self.jobs.values():
            for task in _implied_tasks(job):
                self.tasks.setdefault(task.id, task)
        self.nodes: dict[str, NodeRecord] = {}
        self.job_tasks: dict[int, list[str]] = defaultdict(list)
        for task in sorted(self.tasks.values(), key=lambda t: (t.job_id, t.index)):
            self.job_tasks[task.job_id].append(task.id)
        for node in nodes:
            # A restarted master gives every node a full timeout to reconnect.
            self.nodes[node.name] = node.model_copy(update={"last_seen": now, "connected": False})
            self.index_node(self.nodes[node.name])
        self.pending: dict[int, dict[str, None]] = defaultdict(dict)  # job id -> ordered task ids
        self.active: dict[str, None] = {}  # tasks holding resources on a node
        self.devices: dict[str, set[int]] = defaultdict(set)  # node -> GPU indices in use
        self.ports: dict[str, set[int]] = defaultdict(set)  # node -> ports in use
        self.usage = UsageBook()
        self._cpu_seen: dict[str, tuple[float, float]] = {}  # run id -> (cpu seconds, when)
        for task in self.tasks.values():
            if task.state is TaskState.PENDING:
                self.pending[task.job_id][task.id] = None
            elif task.state.active:
                self._hold(task)
                if task.node in self.table.index:
                    self.table.allocate(self.table.index[task.node], self.vector(task))
                if (copy := task.successor) is not None and copy.node in self.table.index:
                    self.table.allocate(self.table.index[copy.node], self.vector(task))
                    self.devices[copy.node].update(copy.gpus)
                    self.ports[copy.node].update(copy.ports.values())
        self.next_job_id = max(self.jobs, default=0) + 1
        self.waiting: dict[int, str] = {}  # job id -> why its pending tasks wait
        self._needs_schedule = True
        self._wakeup = math.inf  # the earliest restart delay still running
        self.moves = MoveDesk(self, rebalancing or Rebalancing(), list(migrations), now)
        self.changes = Changes()
        self.frameworks = FrameworkDesk(
            self, framework_policy or FrameworkPolicy(), list(frameworks), list(updates), now
        )

    # --- the interface ----------------------------------------------------------------

    def handle(self, *events: Event) -> list[Command]:
        self.changes = Changes()
        now = 0.0
        for event in events:
            now = event.now
            self._dispatch(event)
        if self._needs_schedule:
            self._schedule(now)
        if (due := self.frameworks.due()) is not None and now >= due:
            self.frameworks.cycle(now)
        return self._commands()

    @property
    def wants_cycle(self) -> bool:
        """Work was left for another cycle (a large array): the shell should not wait long."""
        return self._needs_schedule

    @property
    def offers_due(self) -> float | None:
        """When an offer cycle is due that no event may come to trigger: the shell should
        send a Tick then."""
        return self.frameworks.due()

    def tasks_of(self, job_id: int) -> list[TaskRecord]:
        return [self.tasks[t] for t in self.job_tasks.get(job_id, ())]

    def allocated(self, node: str) -> Resources:
        """What the tasks placed on `node` hold, as the scheduler counts it."""
        row = self.table.allocated[self.table.index[node]]
        custom = {d: float(v) for d, v in zip(self.table.dims[4:], row[4:], strict=True) if v}
        return Resources(
            cpus=round(float(row[0]), 6), mem=int(row[1]), disk=int(row[2]), gpus=int(row[3]), custom=custom
        )

    # --- events -------------------------------------------------------------------------

    def _dispatch(self, event: Event) -> None:
        match event:
            case Submit():
                self._submit(event)
            case KillJob():
                self._kill_job(event)
            case FromAgent(frame=Register()):
                self._register(event.node, event.frame, event.now)
            case FromAgent(frame=Heartbeat()):
                self._heartbeat(event.node, event.frame, event.now)
            case FromAgent(frame=RunReports()):
                self._reports(event.node, event.frame.reports, event.now)
            case AgentGone(node=name):
                # The heartbeat timeout, not a closed socket, decides that a node is down.
                if (node := self.nodes.get(name)) is not None:
                    node.connected = False
            case Tick():
                self._tick(event.now)
            case Drain():
                self.moves.drain(event)
            case RebalanceNow():
                self.reply(event.request, self.moves.round(event.now))
            case SubscribeFramework():
                self.frameworks.subscribe(event)
            case FrameworkCall():
                self.frameworks.call(event)
            case StreamClosed():
                self.frameworks.stream_closed(event)

    def _submit(self, event: Submit) -> None:
        error = self._refuse(event)
        if error is not None:
            self.changes.out.append(Reply(event.request, error=error))
            return
        names = sorted(event.node_names) if event.node_names is not None else None
        job = JobRecord(
            id=self.next_job_id, owner=event.owner, spec=event.spec, submitted_at=event.now, node_names=names
        )
        self.next_job_id += 1
        self.jobs[job.id] = job
        self.changes.jobs[job.id] = job
        # The new tasks are not persisted one by one: a stored job implies all its tasks,
        # pending, until each changes (see `_implied_tasks`), so a 100,000-task array is
        # one row in the store.
        tasks = _implied_tasks(job)
        ids = [task.id for task in tasks]
        self.tasks.update(zip(ids, tasks, strict=True))
        self.job_tasks[job.id].extend(ids)
        self.pending[job.id].update(dict.fromkeys(ids))
        self._needs_schedule = True
        self.changes.out.append(Reply(event.request, value=job.id))

    def _refuse(self, event: Submit) -> SpecError | None:
        spec = event.spec
        if spec.queue not in self.policy.queues:
            known = ", ".join(sorted(self.policy.queues))
            return SpecError("queue", f"no queue named {spec.queue!r}; the queues are: {known}")
        if event.node_names is not None and not event.node_names:
            return SpecError("nodes", f"{spec.nodes!r} names no node")
        reason = never_fits(self.table, spec.resources)
        return SpecError("resources", reason) if reason is not None else None

    def _kill_job(self, event: KillJob) -> None:
        self.kill_job(event.job_id, event.now)
        self.reply(event.request, event.job_id)

    def kill_job(self, job_id: int, now: float) -> None:
        job = self.jobs[job_id]
        job.killed = True
        self.changes.jobs[job.id] = job
        for task in self.tasks_of(job.id):
            if task.state is TaskState.PENDING:
                self._move(task, TaskState.KILLED, now, message="killed before it started")
            elif task.state.active and not task.kill_requested:
                task.kill_requested = True
                self.changes.tasks[task.id] = task
                self.send(task.node, Kill(run_ids=[task.run_id]))

    def _register(self, name: str, frame: Register, now: float) -> None:
        node = self.nodes.get(name)
        if node is None:
            node = NodeRecord(info=frame.node, last_seen=now)
            self.nodes[name] = node
        node.info = frame.node
        node.status = NodeStatus.UP
        node.connected = True
        node.last_seen = now
        self.index_node(node)
        self.changes.nodes[name] = node
        self._needs_schedule = True
        self._reports(name, frame.runs, now)
        self._reconcile_missing(name, {r.run_id for r in frame.runs}, now)

    def _reconcile_missing(self, name: str, reported: set[str], now: float) -> None:
        """Tasks the master placed on `name` that the agent did not report."""
        for task in self.tasks.values():
            if task.node != name or not task.state.active or task.run_id in reported:
                continue
            if task.state is TaskState.ASSIGNED:
                self.changes.launches[name].append(self.run_spec(task))
            else:
                self._end(task, TaskState.LOST, now, message=f"{name} restarted without it")

    def _heartbeat(self, name: str, frame: Heartbeat, now: float) -> None:
        node = self.nodes.get(name)
        if node is None or node.status is not NodeStatus.UP:
            return
        node.last_seen = now
        node.usage = frame.usage
        # Decisions judge load smoothed over heartbeats, never one spike.
        node.load = round(smooth(node.load if node.history else None, frame.usage.cpu_percent), 2)
        node.history = [*node.history[-(HISTORY - 1) :], node.load]
        self.table.set_utilization(name, node.load / 100.0)
        for run, used in frame.usage.runs.items():
            self._task_load(name, run, used, now)

    def _task_load(self, node: str, run: str, used: RunUsage, now: float) -> None:
        """A running task's CPU %, from the CPU time its agent reported now and before."""
        task_id, attempt = parse_run_id(run)
        task = self.tasks.get(task_id)
        if task is None or task.attempt != attempt or task.node != node or not task.state.active:
            return
        seen = self._cpu_seen.get(run)
        self._cpu_seen[run] = (used.cpu_seconds, now)
        if seen is None or now <= seen[1]:
            return
        percent = max(0.0, 100 * (used.cpu_seconds - seen[0]) / (now - seen[1]))
        before = task.load.cpu_percent if task.load is not None else None
        task.load = TaskLoad(cpu_percent=round(smooth(before, percent), 1), rss=used.rss)

    def _reports(self, name: str, reports: list[RunReport], now: float) -> None:
        node = self.nodes.get(name)
        if node is None or node.status is not NodeStatus.UP:
            return  # a node that is down must register again; its reports come with it
        node.last_seen = now
        for report in reports:
            self._report(name, report, now)
        if reports:
            self.send(name, Ack(reports=[(r.run_id, r.state) for r in reports]))

    def _report(self, name: str, r: RunReport, now: float) -> None:
        task = self.tasks.get(r.task_id)
        copy = task.successor if task is not None else None
        if task is not None and copy is not None and r.attempt == copy.attempt and name == copy.node:
            self.moves.successor_report(task, r.healthy, r.state, r.message, now)
            return
        current = task is not None and task.attempt == r.attempt and task.node == name and task.state.active
        if not current:
            if r.state is TaskState.RUNNING:
                self.send(name, Kill(run_ids=[r.run_id]))  # an orphan: not the live attempt
            return
        assert task is not None
        if r.state is TaskState.RUNNING:
            if task.state is TaskState.ASSIGNED:
                self._move(task, TaskState.RUNNING, now)
                task.started_at = now
                self.moves.running(task, name, now)
            if task.kill_requested:
                self.send(name, Kill(run_ids=[r.run_id]))  # the first may have been lost
            if r.healthy is not None and task.healthy != r.healthy:
                task.healthy = r.healthy
                self.changes.tasks[task.id] = task
        elif r.state.terminal:
            if r.checkpoint is not None:
                task.checkpoint = r.checkpoint  # its next attempt starts from this state
            killed = task.kill_requested and r.state is not TaskState.FINISHED
            self._end(task, TaskState.KILLED if killed else r.state, now, r.exit_code, r.message)

    def _tick(self, now: float) -> None:
        for node in self.nodes.values():
            if node.status is NodeStatus.UP and now - node.last_seen > self.heartbeat_timeout:
                self._node_down(node, now)
        if now >= self._wakeup:
            self._needs_schedule = True
        self.frameworks.tick(now)
        self.moves.tick(now)

    def _node_down(self, node: NodeRecord, now: float) -> None:
        node.status = NodeStatus.DOWN
        node.connected = False
        self.table.set_schedulable(node.name, False)
        self.changes.nodes[node.name] = node
        self.changes.out.append(Disconnect(node.name))
        message = f"{node.name} missed heartbeats for {self.heartbeat_timeout:g}s"
        for task in self.tasks.values():
            if task.node == node.name and task.state.active:
                self._end(task, TaskState.LOST, now, message=message)
            elif task.nominated == node.name:
                task.nominated = None  # the room it waited for is gone with the node
                self.changes.tasks[task.id] = task
            if task.successor is not None and task.successor.node == node.name and task.state.active:
                self.moves.drop_successor(task, f"{node.name} was lost")
        self.frameworks.node_lost(node.name)

    # --- transitions --------------------------------------------------------------------

    def _move(self, task: TaskRecord, to: TaskState, now: float, **fields: object) -> None:
        """The one way a task changes state; keeps the indexes and the usage book in step."""
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
        self.changes.tasks[task.id] = task
        if (job := self.jobs[task.job_id]).framework is not None:
            self.frameworks.task_changed(job, task, now)

    def _hold(self, task: TaskRecord) -> None:
        """Count an active task in the usage book and its node's devices and ports (its node
        row is allocated by apply_plan)."""
        job = self.jobs[task.job_id]
        self.active[task.id] = None
        self.usage.add(job.spec.queue, _consumer(job), self.vector(task))
        if task.gpus:
            self.devices[task.node or ""].update(task.gpus)
        if task.ports:
            self.ports[task.node or ""].update(task.ports.values())

    def _unhold(self, task: TaskRecord) -> None:
        job = self.jobs[task.job_id]
        self.active.pop(task.id, None)
        self.usage.remove(job.spec.queue, _consumer(job), self.vector(task))
        self.forget_run(task.run_id)
        task.load = task.healthy = None
        if task.successor is not None:
            self.moves.drop_successor(task, "the task ended before its new copy served")
        self.room_freed()
        self.devices[task.node or ""].difference_update(task.gpus)
        self.ports[task.node or ""].difference_update(task.ports.values())
        if task.node in self.table.index:
            self.table.release(self.table.index[task.node], self.vector(task))

    def _equip(self, task: TaskRecord, node: str) -> None:
        """Give a task placed on `node` its GPU device indices and its named ports."""
        task.gpus, task.ports = self.devices_for(task, node)

    def devices_for(self, task: TaskRecord, node: str) -> tuple[list[int], dict[str, int]]:
        """Free GPU indices and ports on `node` for one copy of `task`."""
        spec = self.jobs[task.job_id].spec
        if not spec.resources.gpus and not spec.ports:
            return [], {}
        info = self.nodes[node].info
        used = self.devices[node]
        gpus = [i for i in range(info.capacity.gpus) if i not in used][: spec.resources.gpus]
        taken = self.ports[node]
        low, high = info.port_range
        free = (p for p in range(low, high + 1) if p not in taken)
        ports = dict(zip(spec.ports, free, strict=False))
        if len(gpus) < spec.resources.gpus or len(ports) < len(spec.ports):
            raise ShoalError(
                f"node {node} has no free device or port left for task {task.id}: the ledger is off"
            )
        return gpus, ports

    def _end(
        self, task: TaskRecord, to: TaskState, now: float, exit_code: int | None = None, message: str = ""
    ) -> None:
        """Move to an end state; then restart if the policy grants another attempt."""
        if task.kill_requested and to is TaskState.LOST:
            to = TaskState.KILLED
        elif task.evicted_by is not None and to is not TaskState.FINISHED:
            to = TaskState.PREEMPTED
            message = f"preempted for job {task.evicted_by}"
        elif task.migrating is not None and to is not TaskState.FINISHED:
            to = TaskState.MIGRATED
            message = f"moved off {task.node}" + (f" to {task.migrating}" if task.migrating else "")
        target = task.migrating
        self._move(task, to, now, exit_code=exit_code, message=message)
        self._needs_schedule = True
        job = self.jobs[task.job_id]
        if job.framework is not None:
            return  # its framework hears of the end and decides what runs again
        if to is TaskState.MIGRATED:
            self._restart(task, now, now)
            self.moves.ended(task, target or "", now)
        elif to is TaskState.PREEMPTED:
            self._restart(task, now, now)  # preemption does not use up restart attempts
        elif to in (TaskState.FAILED, TaskState.LOST) and not job.killed:
            failures = 1 + sum(a.state in (TaskState.FAILED, TaskState.LOST) for a in task.history)
            if failures <= job.spec.restart.attempts:
                self._restart(task, now, now + job.spec.restart.delay)

    def _restart(self, task: TaskRecord, now: float, not_before: float) -> None:
        task.history.append(
            Attempt(
                attempt=task.attempt,
                node=task.node,
                state=task.state,
                exit_code=task.exit_code,
                message=task.message,
                started_at=task.started_at,
                finished_at=task.finished_at,
            )
        )
        self._move(
            task,
            TaskState.PENDING,
            now,
            attempt=task.attempt + 1,
            node=None,
            exit_code=None,
            message="",
            started_at=None,
            finished_at=None,
            not_before=not_before,
            evicted_by=None,
            migrating=None,
            gpus=[],
            ports={},
        )

    def vector(self, task: TaskRecord) -> np.ndarray:
        """The task's ask as a table row; one per job, remade if the table gains dimensions."""
        vec = self._vectors.get(task.job_id)
        if vec is None or len(vec) != len(self.table.dims):
            vec = self._vectors[task.job_id] = self.table.vector(self.jobs[task.job_id].spec.resources)
        return vec

    def index_node(self, node: NodeRecord) -> None:
        info = node.info
        attributes = {**info.labels, **info.attributes, "name": info.name, "hostname": info.hostname}
        self.table.upsert(
            info.name, info.capacity, attributes, node.status is NodeStatus.UP and not node.drained
        )

    # --- scheduling ---------------------------------------------------------------------

    def _schedule(self, now: float) -> None:
        self._needs_schedule = False
        self.waiting = {}
        self._wakeup = math.inf
        groups: list[Group] = []
        truncated: set[int] = set()
        for job_id, ids in sorted(self.pending.items()):
            ready = []
            for t in ids:
                not_before = self.tasks[t].not_before
                if not_before <= now:
                    ready.append(t)
                    if len(ready) == GROUP_CAP:
                        truncated.add(job_id)
                        break
                else:
                    self._wakeup = min(self._wakeup, not_before)
            if ready:
                groups.append(self._group(job_id, ready))
            elif ids:
                self.waiting[job_id] = "waiting for its restart delay"
        if not groups:
            return
        running = (self.running(self.tasks[t]) for t in self.active)
        policy = self.frameworks.capped(self.policy, {g.queue for g in groups})
        plan = schedule(self.table, self.masks, groups, self.usage, running, policy, now)
        verdict = apply_plan(self.table, plan)
        self.waiting.update(plan.waiting)
        # A large array placed all it was shown: there may be room for the rest of it.
        self._needs_schedule = any(job not in plan.waiting for job in truncated)
        for placement in verdict.accepted:
            task = self.tasks[placement.task_id]
            self._equip(task, placement.node)
            self._move(task, TaskState.ASSIGNED, now, node=placement.node, message="")
            self.changes.launches[placement.node].append(self.run_spec(task))
        for task_id, reason in verdict.rejected.items():
            self.waiting[self.tasks[task_id].job_id] = reason
            self._needs_schedule = True
        for eviction in plan.evictions:
            task = self.tasks[eviction.task_id]
            task.evicted_by = eviction.for_job
            self.changes.tasks[task.id] = task
            self.send(task.node, Kill(run_ids=[task.run_id]))
        for task_id, node in plan.nominations:
            task = self.tasks[task_id]
            task.nominated = node
            self.changes.tasks[task.id] = task

    def running(self, task: TaskRecord) -> Running:
        job = self.jobs[task.job_id]
        return Running(
            task_id=task.id,
            job_id=job.id,
            node=task.node or "",
            ask=job.spec.resources,
            user=_consumer(job),
            queue=job.spec.queue,
            priority=job.spec.priority,
            preemptible=job.spec.preemptible,
            evicting=task.evicted_by is not None or task.kill_requested,
            ends_at=(
                task.started_at + job.spec.time_limit
                if task.started_at is not None and job.spec.time_limit is not None
                else None
            ),
        )

    def _group(self, job_id: int, task_ids: list[str]) -> Group:
        job = self.jobs[job_id]
        spec = job.spec
        placed: dict[str, int] = defaultdict(int)
        if spec.max_per_node or spec.max_per or spec.spread:
            for task in self.tasks_of(job_id):
                if task.state.active and task.node is not None:
                    placed[task.node] += 1
        spread = (
            SpreadTarget(spec.spread.attribute, tuple((v, p / 100.0) for v, p in spec.spread.targets.items()))
            if spec.spread
            else None
        )
        return Group(
            job_id=job_id,
            tasks=tuple(task_ids),
            ask=spec.resources,
            user=job.owner,
            queue=spec.queue,
            priority=spec.priority,
            preemptible=spec.preemptible,
            strategy=spec.strategy,
            constraints=tuple(parse(c) for c in spec.constraints),
            nodes=frozenset(job.node_names) if job.node_names is not None else None,
            max_per_node=spec.max_per_node,
            max_per=tuple(spec.max_per.items()),
            affinities=tuple((parse(a.expr), float(a.weight)) for a in spec.affinities),
            spread=spread,
            gang=spec.gang,
            time_limit=spec.time_limit,
            placed=tuple(placed.items()),
            nominated=tuple(
                (t, self.tasks[t].nominated)  # type: ignore[misc]
                for t in task_ids
                if self.tasks[t].nominated in self.table.index
            ),
        )

    def forget_run(self, run: str) -> None:
        """A run no longer counts in its task's load."""
        self._cpu_seen.pop(run, None)

    def room_freed(self) -> None:
        """Resources went back to the pool: native jobs and frameworks may use them."""
        self._needs_schedule = True
        self.frameworks.needs_cycle = True

    def start(self, task: TaskRecord, node: str, now: float) -> None:
        """Place a pending task on `node` outside a scheduling cycle (a framework chose it)."""
        self.table.allocate(self.table.index[node], self.vector(task))
        self._equip(task, node)
        self._move(task, TaskState.ASSIGNED, now, node=node, message="")
        self.changes.launches[node].append(self.run_spec(task))

    def run_spec(self, task: TaskRecord, copy: Successor | None = None) -> RunSpec:
        """What an agent runs for `task` (or for its new copy, in a make-before-break move)."""
        spec = self.jobs[task.job_id].spec
        attempt = copy.attempt if copy is not None else task.attempt
        ports = copy.ports if copy is not None else task.ports
        gpus = copy.gpus if copy is not None else task.gpus
        env = spec.task_env(task.index) if spec.env else {}
        env["SHOAL_JOB_ID"] = str(task.job_id)
        env["SHOAL_TASK_ID"] = task.id
        env["SHOAL_TASK_INDEX"] = str(task.index)
        env["SHOAL_ATTEMPT"] = str(attempt)
        for name, port in ports.items():
            env[f"SHOAL_PORT_{name.upper()}"] = str(port)
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = env["SHOAL_GPUS"] = ",".join(map(str, gpus))
        checkpoint = spec.migrate is Migrate.CHECKPOINT
        return RunSpec(
            run_id=run_id(task.id, attempt),
            task_id=task.id,
            attempt=attempt,
            argv=spec.argv(task.index),
            env=env,
            workdir=spec.workdir,
            resources=spec.resources,
            kill_grace=spec.kill_grace,
            time_limit=spec.time_limit,
            checkpoint=checkpoint,
            restore=task.checkpoint if checkpoint else None,
            health=spec.health,
        )

    # --- output -------------------------------------------------------------------------

    def send(self, node: str | None, frame: Launch | Kill | Ack) -> None:
        if node is not None:
            self.changes.out.append(Send(node, frame))

    def reply(self, request: int, value: object = None, error: ShoalError | None = None) -> None:
        self.changes.out.append(Reply(request, value, error))

    def _commands(self) -> list[Command]:
        c = self.changes
        commands: list[Command] = []
        if c.jobs or c.tasks or c.nodes or c.frameworks or c.updates or c.acked or c.migrations:
            commands.append(
                Persist(
                    tuple(c.jobs.values()),
                    tuple(c.tasks.values()),
                    tuple(c.nodes.values()),
                    tuple(c.frameworks.values()),
                    tuple(c.updates),
                    tuple(c.acked),
                    tuple(c.migrations.values()),
                )
            )
        commands.extend(Send(node, Launch(runs=runs)) for node, runs in c.launches.items())
        commands.extend(c.out)
        return commands
