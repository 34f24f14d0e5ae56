"""The master's state machine: the ledger, changed only by events.

`MasterState.handle(*events) -> list[Command]` is the whole interface. Events are what
happened (a submission, a frame from an agent, a tick of the clock); commands are what the
I/O shell must do (persist records, send frames, answer a request, drop a connection).
Time arrives inside events; nothing here reads a clock or touches a socket.

`MasterState` composes the ledger (`ledger.py`: the records, their indexes, the one writer
of allocations) and its desks (`frameworks.py`, `moves.py`), dispatches events to them, and
keeps the rules of native jobs: scheduling cycles, agents' reports, restarts.

Theory of operation
- Commands come back in a fixed order: one `Persist` first (every record the events
  changed), then frames and replies. The shell executes them in that order, so nothing is
  acknowledged or launched before it is in the store.
- Every placement is a plan: a scheduling cycle's, a framework's accept, a migration's
  target; the ledger checks each against the table as it is now before it allocates.
- A task moves only along `model.TRANSITIONS`. FAILED and LOST go back to PENDING when the
  job's restart policy grants another attempt; each attempt has its own run id, so a report
  from an old attempt can never be mistaken for the current one.
- Agents own what actually runs. A `Register` carries an agent's whole task table: the
  master adopts the runs it expects, kills those it does not, relaunches assigned runs the
  agent never received, and marks running ones the agent no longer has as LOST.
- Agents rely on two answers: `Welcome` to a registration (the heartbeat timeout, and
  whether to fence themselves) and an empty `Ack` to every heartbeat, by which an agent
  knows a master hears it. With `fence_agents`, an agent that hears no master for most of
  the timeout stops its runs before they are called lost here and started elsewhere.
- A node that misses heartbeats for `heartbeat_timeout` seconds is DOWN, its tasks LOST, and
  its connection dropped; it comes back only by registering again.
- A `Tick` does what time has made due: heartbeat deadlines, restart delays, the desks'
  timeouts, retention. `next_due` says when the next Tick has anything to do, so a shell may
  sleep until then (or until `wants_cycle`) and decide exactly as one that ticks all along.
  With `cycle_on_tick` a scheduling cycle runs on a Tick only, never after each event: a
  simulator delivers everything of one instant first, and the cycle sees it all at once.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Iterable

from shoal.core.placement import NO_NODES
from shoal.core.plan import Reservation
from shoal.core.rebalance import smooth
from shoal.core.scheduler import Policy, schedule
from shoal.errors import Forbidden, NotFound, ShoalError, SpecError
from shoal.master.events import (
    AgentGone,
    CheckService,
    Command,
    DeregisterService,
    Disconnect,
    Drain,
    Event,
    FrameworkCall,
    FromAgent,
    KillJob,
    MastersSeen,
    RebalanceNow,
    RegisterService,
    RemoveNode,
    StreamClosed,
    Submit,
    SubscribeFramework,
    Tick,
)
from shoal.master.frameworks import FrameworkDesk, FrameworkPolicy
from shoal.master.ledger import Ledger, Retention
from shoal.master.moves import MoveDesk, Rebalancing
from shoal.master.registry import Registry, RegistryPolicy
from shoal.master.shapes import ended_run
from shoal.master.store import Snapshot
from shoal.model import (
    Caller,
    JobRecord,
    Migrate,
    NodeRecord,
    NodeStatus,
    RunUsage,
    TaskLoad,
    TaskRecord,
    TaskState,
)
from shoal.services import Endpoint
from shoal.wire import Ack, Heartbeat, Kill, Register, RunReport, RunReports, Welcome

HISTORY = 60  # smoothed load samples kept per node

# Tasks of one job a cycle considers: a large array is placed a slice per cycle, so no
# cycle (and no API call that triggers one) walks all of it.
GROUP_CAP = 4096


_HEARD = Ack(reports=[])


class MasterState:
    """The rules of the master over one ledger and its desks."""

    def __init__(
        self,
        heartbeat_timeout: float = 10.0,
        *,
        policy: Policy | None = None,
        snapshot: Snapshot | None = None,
        framework_policy: FrameworkPolicy | None = None,
        rebalancing: Rebalancing | None = None,
        retention: Retention | None = None,
        now: float = 0.0,
        cycle_on_tick: bool = False,
        registry: RegistryPolicy | None = None,
        masters: Iterable[Endpoint] = (),
        fence_agents: bool = False,
    ) -> None:
        snap = snapshot or Snapshot([], [], [], [], [], [])
        self.heartbeat_timeout = heartbeat_timeout
        self.fence_agents = fence_agents  # agents cut off stop their runs (see agent/state.py)
        self.cycle_on_tick = cycle_on_tick
        self.policy = policy or Policy()
        self.ledger = Ledger(
            jobs=snap.jobs,
            tasks=snap.tasks,
            nodes=snap.nodes,
            migrations=snap.migrations,
            counters=snap.counters,
            retention=retention,
            now=now,
        )
        self._waiting: dict[int, str] = {}  # job id -> why its pending tasks wait
        self._no_nodes = False  # the last cycle found no node: every pending job waits for one
        self.promised: dict[int, float] = {}  # job id -> the earliest start backfill promised it
        self.cycles = 0  # scheduling cycles run (the shell's metrics read it)
        self._needs_schedule = True
        self._wakeup = math.inf  # the earliest restart delay still running
        # Jobs with a pending task that may wait out a restart delay: only their tasks are
        # looked at one by one when a cycle gathers what is ready.
        self._delayed = {
            t.job_id
            for t in self.ledger.tasks.values()
            if t.state is TaskState.PENDING and t.not_before > now
        }
        self._cpu_seen: dict[str, tuple[float, float]] = {}  # run id -> (cpu seconds, when)
        self.moves = MoveDesk(self.ledger, rebalancing or Rebalancing(), self.policy.strategy, now)
        self.frameworks = FrameworkDesk(
            self.ledger,
            self.policy,
            framework_policy or FrameworkPolicy(),
            snap.frameworks,
            snap.updates,
            now,
        )
        self.registry = Registry(self.ledger, registry or RegistryPolicy(), snap.registrations, masters, now)
        self.ledger.watch(self._transitioned)
        # (last_seen + heartbeat_timeout, node) of UP nodes, oldest first. An entry is fixed
        # only when it reaches the top: last_seen only grows, so it is never too late.
        self._silence: list[tuple[float, str]] = []
        self._watched: set[str] = set()
        for node in self.ledger.nodes.values():
            self._watch(node)

    # --- the interface ----------------------------------------------------------------

    def handle(self, *events: Event) -> list[Command]:
        now = 0.0
        ticked = False
        for event in events:
            now = event.now
            ticked = ticked or isinstance(event, Tick)
            self._dispatch(event)
        if self.ledger.take_freed():
            self._needs_schedule = True
            self.frameworks.needs_cycle = True
            self.moves.room_freed()
        if self._needs_schedule and (ticked or not self.cycle_on_tick):
            self._schedule(now)
        if (due := self.frameworks.due()) is not None and now >= due:
            self.frameworks.cycle(now)
        self.registry.follow(*self.ledger.changed())
        return self.ledger.commands()

    @property
    def wants_cycle(self) -> bool:
        """A scheduling cycle is owed (with `cycle_on_tick`, whenever there is new work or
        room; else only when work was left for another cycle, as a large array): the shell
        should send a Tick without waiting long."""
        return self._needs_schedule

    def next_due(self) -> float:
        """The earliest time a `Tick` would do anything: a node's heartbeat deadline, a
        restart delay ending, and what the desks and the ledger's retention have due
        (math.inf: nothing until another event; a time already past: now)."""
        return min(
            self._next_silent(),
            self._wakeup,
            self.frameworks.next_due(),
            self.moves.next_due(),
            self.registry.next_due(),
            self.ledger.next_prune(self.frameworks.pinned()),
        )

    @property
    def offers_due(self) -> float | None:
        """When an offer cycle is due that no event may come to trigger: the shell should
        send a Tick then."""
        return self.frameworks.due()

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
                if (node := self.ledger.nodes.get(name)) is not None:
                    self.ledger.observe(node, connected=False)
            case Tick():
                self._tick(event.now)
            case Drain():
                self.moves.drain(event)
                if event.drain:
                    self.frameworks.rescind_node(event.node)  # no new work goes there
            case RemoveNode():
                self._remove_node(event)
            case RebalanceNow():
                self.ledger.reply(event.request, self.moves.round(event.now))
            case SubscribeFramework():
                self.frameworks.subscribe(event)
            case FrameworkCall():
                self.frameworks.call(event)
            case StreamClosed():
                self.frameworks.stream_closed(event)
            case RegisterService() | CheckService() | DeregisterService():
                self._service_call(event)
            case MastersSeen(masters=masters):
                self.registry.list_masters(masters)

    def _submit(self, event: Submit) -> None:
        error = self._refuse(event)
        if error is not None:
            self.ledger.reply(event.request, error=error)
            return
        spec = event.spec
        followed = spec.services or spec.migrate is Migrate.MAKE_BEFORE_BREAK  # clients find it
        if followed and spec.shutdown_delay is None:
            spec = spec.model_copy(update={"shutdown_delay": self.registry.policy.shutdown_delay})
        job = self.ledger.add_job(event.owner, spec, event.now, node_names=event.node_names)
        self._needs_schedule = True
        self.ledger.reply(event.request, job.id)

    def _refuse(self, event: Submit) -> SpecError | None:
        spec = event.spec
        if spec.queue not in self.policy.queues:
            known = ", ".join(sorted(self.policy.queues))
            return SpecError("queue", f"no queue named {spec.queue!r}; the queues are: {known}")
        if event.node_names is not None and not event.node_names:
            return SpecError("nodes", f"{spec.nodes!r} names no node")
        return self.ledger.refuse(spec)

    def _service_call(self, event: RegisterService | CheckService | DeregisterService) -> None:
        registry = self.registry
        try:
            match event:
                case RegisterService(caller=caller, spec=spec, now=now):
                    if spec.id in registry.registrations:
                        self._may_change_registration(caller, spec.id)
                    registry.register(caller.name, spec, now)
                case CheckService(caller=caller, registration=rid, status=status, output=output, now=now):
                    self._may_change_registration(caller, rid)
                    registry.refresh(rid, status, output, now)
                case DeregisterService(caller=caller, registration=rid):
                    self._may_change_registration(caller, rid)
                    registry.deregister(rid)
        except ShoalError as e:
            self.ledger.reply(event.request, error=e)
            return
        self.ledger.reply(event.request, registry.index)

    def _may_change_registration(self, caller: Caller, registration: str) -> None:
        if not caller.may_change(owner := self.registry.owner(registration)):
            raise Forbidden(f"registration {registration!r} belongs to {owner}")

    def _kill_job(self, event: KillJob) -> None:
        if event.job_id not in self.ledger.jobs:  # pruned since the API looked it up
            self.ledger.reply(event.request, error=NotFound(f"no job {event.job_id}"))
            return
        self.ledger.kill_job(event.job_id, event.now)
        self.ledger.reply(event.request, event.job_id)

    def _register(self, name: str, frame: Register, now: float) -> None:
        self._watch(self.ledger.register_node(frame.node, now))
        self.ledger.send(name, Welcome(heartbeat_timeout=self.heartbeat_timeout, fence=self.fence_agents))
        self._needs_schedule = True
        self._reports(name, frame.runs, now)
        self._reconcile_missing(name, {r.run_id for r in frame.runs}, now)

    def _reconcile_missing(self, name: str, reported: set[str], now: float) -> None:
        """Tasks the master placed on `name` that the agent did not report."""
        for task in list(self.ledger.active_tasks()):
            if task.node != name or task.run_id in reported:
                continue
            if task.state is TaskState.ASSIGNED:
                self.ledger.relaunch(task)
            else:
                self._end(task, TaskState.LOST, now, message=f"{name} restarted without it")

    def _heartbeat(self, name: str, frame: Heartbeat, now: float) -> None:
        node = self.ledger.nodes.get(name)
        if node is None or node.status is not NodeStatus.UP:
            return
        # Decisions judge load smoothed over heartbeats, never one spike.
        load = round(smooth(node.load if node.history else None, frame.usage.cpu_percent), 2)
        history = [*node.history[-(HISTORY - 1) :], load]
        # A node speaks only of its own runs: what else it names (others' runs, names that
        # are no run's) is not kept, and cannot swell its record.
        placed = {run: task for run in frame.usage.runs if (task := self._placed(name, run)) is not None}
        usage = frame.usage.model_copy(update={"runs": {run: frame.usage.runs[run] for run in placed}})
        self.ledger.observe(node, last_seen=now, usage=usage, load=load, history=history)
        self.ledger.send(name, _HEARD)  # the agent knows, by these, that it is not cut off
        for run, task in placed.items():
            self._task_load(task, run, usage.runs[run], now)

    def _placed(self, node: str, run: str) -> TaskRecord | None:
        """The active task whose current run on `node` is `run`, if any."""
        task = self.ledger.tasks.get(run.rpartition(".")[0])
        if task is None or task.run_id != run or task.node != node or not task.state.active:
            return None
        return task

    def _task_load(self, task: TaskRecord, run: str, used: RunUsage, now: float) -> None:
        """A running task's CPU %, from the CPU time its agent reported now and before."""
        seen = self._cpu_seen.get(run)
        self._cpu_seen[run] = (used.cpu_seconds, now)
        if seen is None or now <= seen[1]:
            return
        percent = max(0.0, 100 * (used.cpu_seconds - seen[0]) / (now - seen[1]))
        before = task.load.cpu_percent if task.load is not None else None
        self.ledger.observe(task, load=TaskLoad(cpu_percent=round(smooth(before, percent), 1), rss=used.rss))

    def _reports(self, name: str, reports: list[RunReport], now: float) -> None:
        node = self.ledger.nodes.get(name)
        if node is None or node.status is not NodeStatus.UP:
            return  # a node that is down must register again; its reports come with it
        self.ledger.observe(node, last_seen=now)
        for report in reports:
            self._report(name, report, now)
        if reports:
            self.ledger.send(name, Ack(reports=[(r.run_id, r.state) for r in reports]))

    def _report(self, name: str, r: RunReport, now: float) -> None:
        ledger = self.ledger
        task = ledger.tasks.get(r.task_id)
        copy = task.successor if task is not None else None
        if task is not None and copy is not None and r.attempt == copy.attempt and name == copy.node:
            self.moves.successor_report(task, r, now)
            return
        current = task is not None and task.attempt == r.attempt and task.node == name and task.state.active
        if not current:
            if r.state is TaskState.RUNNING:
                ledger.send(name, Kill(run_ids=[r.run_id]))  # an orphan: not the live attempt
            return
        assert task is not None
        if r.state is TaskState.RUNNING:
            if task.state is TaskState.ASSIGNED:
                ledger.transition(task, TaskState.RUNNING, now, started_at=now)
                self.moves.running(task, name, now)
            if task.kill_requested or task.migrating is not None or task.evicted_by is not None:
                ledger.send(name, Kill(run_ids=[r.run_id]))  # asked to stop: the first may be lost
            if r.checks != task.checks:
                ledger.update(task, checks=dict(r.checks))
        elif r.state.terminal:
            if r.checkpoint is not None:
                ledger.update(task, checkpoint=r.checkpoint)  # its next attempt starts from this state
            ledger.update(task, cpu_seconds=r.cpu_seconds, peak_mem=r.peak_mem)  # what the run used
            killed = task.kill_requested and r.state is not TaskState.FINISHED
            self._end(task, TaskState.KILLED if killed else r.state, now, r.exit_code, r.message)

    def _tick(self, now: float) -> None:
        if self._next_silent() <= now:
            for node in [n for n in self.ledger.nodes.values() if self._silent(n, now)]:
                self._node_down(node, now)
        if now >= self._wakeup:
            self._needs_schedule = True
        self.frameworks.tick(now)
        self.moves.tick(now)
        self.registry.tick(now)
        self.frameworks.forget(self.ledger.prune(now, pinned=self.frameworks.pinned()))

    def _silent(self, node: NodeRecord, now: float) -> bool:
        return node.status is NodeStatus.UP and now > node.last_seen + self.heartbeat_timeout

    def _watch(self, node: NodeRecord) -> None:
        if node.status is NodeStatus.UP and node.name not in self._watched:
            self._watched.add(node.name)
            heapq.heappush(self._silence, (node.last_seen + self.heartbeat_timeout, node.name))

    def _next_silent(self) -> float:
        """The first instant a node is past its heartbeat deadline (math.inf: none is UP)."""
        heap = self._silence
        while heap:
            deadline, name = heap[0]
            node = self.ledger.nodes[name]
            if node.status is not NodeStatus.UP:
                heapq.heappop(heap)
                self._watched.discard(name)
            elif (actual := node.last_seen + self.heartbeat_timeout) != deadline:
                heapq.heapreplace(heap, (actual, name))
            else:
                return math.nextafter(deadline, math.inf)
        return math.inf

    def _remove_node(self, event: RemoveNode) -> None:
        node = self.ledger.nodes.get(event.node)
        if node is None or node.removed is not None:
            self.ledger.reply(event.request, error=NotFound(f"no node {event.node}"))
            return
        held = [t.id for t in self.ledger.active_tasks() if t.node == event.node]
        why = f"{node.name} was removed from the cluster"
        parting = f"{why} (`shoal node remove`): its runs stop; it joins again with a new bootstrap token"
        if node.status is NodeStatus.UP:
            self._node_down(node, event.now, why, parting)
        else:
            # Down, it holds no link; if it is online again (connected, not registered yet),
            # the master checks its identity again before it registers it.
            self.ledger.emit(Disconnect(node.name, parting))
        # Its record stays (rows of the node table are never removed), marked: not listed.
        self.ledger.update_node(node, removed=event.now)
        self.ledger.reply(event.request, held)

    def _node_down(self, node: NodeRecord, now: float, message: str = "", parting: str = "") -> None:
        ledger = self.ledger
        ledger.update_node(node, status=NodeStatus.DOWN, connected=False)
        ledger.emit(Disconnect(node.name, parting))
        message = message or f"{node.name} missed heartbeats for {self.heartbeat_timeout:g}s"
        for task in list(ledger.active_tasks()):
            if task.successor is not None and task.successor.node == node.name:
                self.moves.drop_successor(task, f"{node.name} was lost", now)
            if task.node == node.name:
                self._end(task, TaskState.LOST, now, message=message)
        for ids in ledger.pending.values():
            for task_id in ids:
                if ledger.tasks[task_id].nominated == node.name:
                    # The room it waited for is gone with the node.
                    ledger.update(ledger.tasks[task_id], nominated=None)
        self.frameworks.node_lost(node.name)

    # --- ends and restarts ----------------------------------------------------------------

    def _transitioned(self, task: TaskRecord, job: JobRecord, was: TaskState, now: float) -> None:
        if was.active and not task.state.active:
            self._cpu_seen.pop(task.run_id, None)
        if task.state.terminal and task.state is not TaskState.MIGRATED:
            self.moves.ended_for_good(task)
        if job.framework is not None:
            self.frameworks.task_changed(job, task, now)

    def _end(
        self, task: TaskRecord, to: TaskState, now: float, exit_code: int | None = None, message: str = ""
    ) -> None:
        """Move to an end state; then restart if the policy grants another attempt."""
        if task.kill_requested and to is not TaskState.FINISHED:
            to = TaskState.KILLED  # a kill asked for wins over a move or an eviction under way
        elif task.evicted_by is not None and to is not TaskState.FINISHED:
            to = TaskState.PREEMPTED
            message = f"preempted for job {task.evicted_by}"
        elif task.migrating is not None and to is not TaskState.FINISHED:
            to = TaskState.MIGRATED
            message = f"moved off {task.node}" + (f" to {task.migrating}" if task.migrating else "")
        target = task.migrating
        if task.successor is not None:
            self.moves.drop_successor(task, "the task ended before its new copy served", now)
        self.ledger.transition(task, to, now, exit_code=exit_code, message=message)
        job = self.ledger.jobs[task.job_id]
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
        attempt = task.next_attempt
        history = [*task.history, ended_run(task)]
        if not_before > now:
            self._delayed.add(task.job_id)
        self.ledger.transition(
            task,
            TaskState.PENDING,
            now,
            history=history,
            attempt=attempt,
            node=None,
            exit_code=None,
            message="",
            started_at=None,
            finished_at=None,
            cpu_seconds=None,
            peak_mem=None,
            not_before=not_before,
            evicted_by=None,
            migrating=None,
            gpus=[],
            ports={},
        )

    # --- scheduling ---------------------------------------------------------------------

    def _promise(self, reservations: tuple[Reservation, ...]) -> None:
        """Keep, for each job still pending, the earliest start it was promised as the head of
        its queue: a head that starts later than that is one backfill let down."""
        pending = self.ledger.pending
        self.promised = {job: start for job, start in self.promised.items() if job in pending}
        for r in reservations:
            if r.head:
                self.promised[r.job_id] = min(r.start, self.promised.get(r.job_id, math.inf))

    def why_waiting(self, job_id: int) -> str:
        """Why job `job_id`'s pending tasks wait, as the last scheduling cycle found; "" when
        it found no reason (or the job has none pending)."""
        if self._no_nodes and job_id in self.ledger.pending:
            return NO_NODES
        return self._waiting.get(job_id, "")

    def _schedule(self, now: float) -> None:
        ledger = self.ledger
        self._needs_schedule = False
        self.cycles += 1
        self._waiting = {}
        self._wakeup = math.inf
        # No node has ever joined: nothing can be placed or reserved, and a cycle over every
        # pending job, run at every submission, would cost a third of a millisecond per job
        # only to say so (and naming each in `_waiting` would cost as much).
        self._no_nodes = len(ledger.table) == 0
        if self._no_nodes:
            return
        groups = []
        truncated: set[int] = set()
        self._delayed &= ledger.pending.keys()
        for job_id, ids in sorted(ledger.pending.items()):
            if job_id not in self._delayed:
                ready = list(itertools.islice(ids, GROUP_CAP))
                if len(ready) == GROUP_CAP:
                    truncated.add(job_id)
                groups.append(ledger.group(job_id, ready))
                continue
            ready = []
            deferred = False
            for t in ids:
                not_before = ledger.tasks[t].not_before
                if not_before <= now:
                    ready.append(t)
                    if len(ready) == GROUP_CAP:
                        truncated.add(job_id)
                        break
                else:
                    deferred = True
                    self._wakeup = min(self._wakeup, not_before)
            if not deferred and len(ready) < GROUP_CAP:
                self._delayed.discard(job_id)  # every task of it looked at is ready
            if ready:
                groups.append(ledger.group(job_id, ready))
            elif ids:
                self._waiting[job_id] = "waiting for its restart delay"
        if not groups:
            return
        holding = (r for t in ledger.active_tasks() for r in ledger.holding(t))
        policy = self.frameworks.capped(self.policy, {g.queue for g in groups})
        plan = schedule(
            ledger.table, ledger.masks, groups, ledger.usage, holding, policy, now, ledger.views.releases
        )
        self._promise(plan.reservations)
        verdict = ledger.place(plan, now)
        self._waiting.update(plan.waiting)
        # A large array placed all it was shown: there may be room for the rest of it.
        self._needs_schedule = any(job not in plan.waiting for job in truncated)
        for task_id, reason in verdict.rejected.items():
            self._waiting[ledger.tasks[task_id].job_id] = reason
            self._needs_schedule = True
        for eviction in plan.evictions:
            task = ledger.tasks[eviction.task_id]
            ledger.update(task, evicted_by=eviction.for_job)
            ledger.send(task.node, Kill(run_ids=[task.run_id]))
        for task_id, node in plan.nominations:
            ledger.update(ledger.tasks[task_id], nominated=node)
