"""The agent's state machine: its task table, changed only by events.

`AgentState.handle(*events) -> list[Command]`. Events are frames from the master, what
happened to processes (spawned, failed to spawn, exited) and ticks of the clock carrying
the node's measured usage. Commands ask the shell to spawn or signal a process, send a
frame, or save the table to disk. Nothing here touches a process, a file or a clock.

Theory of operation
- A run goes ASSIGNED (asked to start) -> RUNNING (spawned) -> an end state: FINISHED
  (exit 0), FAILED (any other exit, or it could not start) or KILLED (the master asked).
- Every state change is reported, and the report repeated every `resend_after` seconds
  until the master acknowledges that run in that state; a run in an end state leaves the
  table once acknowledged. On each (re)connection the agent registers with the whole table,
  which is how the master reconciles after any reconnect or restart of either side.
- A kill sends SIGTERM to the run's process group once its `shutdown_delay` has passed
  (the master took it out of the registry first), then SIGKILL once its grace has passed.
  A run's time limit sends SIGTERM at once, and the run then ends FAILED; a kill that
  comes after that SIGTERM sends nothing more, and the run ends KILLED.
- The table is saved after every change, so a restarted agent re-adopts its runs.
- Self-fencing (when the master asks for it, as it does by default with several masters):
  the master calls a node down, and its tasks lost (to run them elsewhere), after
  `heartbeat_timeout` seconds without hearing from it; it says that timeout when the agent
  registers (`Welcome`) and answers every heartbeat. An agent that has not heard from any
  master for `FENCE_AFTER` of that timeout stops every run, with a grace cut to
  `FENCE_GRACE` of it, so they are all gone before the master can start them again
  elsewhere: a task cut off from the masters by the network does not run twice at once.
  Its runs end LOST, which the master counts against their restart policy, as it would
  have. Without fencing, runs go on whatever happens, as they always did. Silence counts
  only while some master may be alive and not hearing the agent: when every master it
  knows refused a connection or said no leader is elected (`Unled`), a master that leads
  later gives this node a whole heartbeat timeout from its own start, so a restart or a
  failover of the masters, however long, stops nothing.
- A `Tick` sends a heartbeat and does what time has made due (time limits, SIGTERM after
  the shutdown delay, SIGKILL after the grace, reports to send again); `next_due` says when
  that is next, for a shell that ticks only then (a simulator).
"""

from __future__ import annotations

import math
import signal
from dataclasses import dataclass, field

from pydantic import BaseModel, Field

from shoal.checks import CheckResult
from shoal.model import NodeInfo, TaskState, Usage, parse_run_id
from shoal.wire import Ack, Heartbeat, Kill, Launch, Register, RunReport, RunReports, RunSpec, Welcome

REDIAL_AFTER = 0.25  # of the master's heartbeat timeout: silence before the agent redials
FENCE_AFTER = 0.6  # of the master's heartbeat timeout: silence before the runs are stopped
FENCE_GRACE = 0.2  # of it: the longest grace a stopped run then gets before SIGKILL


class RunEntry(BaseModel):
    """One run in the agent's table; saved to disk as is."""

    spec: RunSpec
    state: TaskState = TaskState.ASSIGNED
    pid: int | None = None
    pid_start: float | None = None
    exit_code: int | None = None
    message: str = ""
    acked: bool = False
    reported_at: float = 0.0
    kill_requested: bool = False
    kill_deadline: float | None = None
    started_at: float | None = None
    timed_out: bool = False
    checkpoint: str | None = None
    term_at: float | None = None  # when a stopped run gets SIGTERM (it first left the registry)
    fenced: bool = False  # stopped because no master was heard: it ends LOST
    checks: dict[str, CheckResult] = Field(default_factory=dict)
    cpu_seconds: float | None = None  # what it used in all, measured when it ended
    peak_mem: int | None = None  # MiB

    def report(self) -> RunReport:
        return RunReport(
            run_id=self.spec.run_id,
            task_id=self.spec.task_id,
            attempt=self.spec.attempt,
            state=self.state,
            exit_code=self.exit_code,
            message=self.message,
            checkpoint=self.checkpoint,
            checks=self.checks,
            cpu_seconds=self.cpu_seconds,
            peak_mem=self.peak_mem,
        )


# --- events ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Connected:
    now: float


@dataclass(frozen=True, slots=True)
class FromMaster:
    frame: Launch | Kill | Ack | Welcome
    now: float


@dataclass(frozen=True, slots=True)
class Unled:
    """Every master the agent knows showed, since `now`, that none can be counting this
    node's silence: its port refused the connection, or it said no leader is elected."""

    now: float


@dataclass(frozen=True, slots=True)
class Spawned:
    run_id: str
    pid: int
    pid_start: float
    now: float


@dataclass(frozen=True, slots=True)
class SpawnFailed:
    run_id: str
    message: str
    now: float


@dataclass(frozen=True, slots=True)
class Exited:
    """A run's process group leader ended; `exit_code` is None when it cannot be known,
    negative for a signal (as in Python's subprocess)."""

    run_id: str
    exit_code: int | None
    now: float
    checkpoint: str | None = None  # the blob its saved state went to, when it was stopped
    cpu_seconds: float | None = None  # what the run used in all, where it could be measured
    peak_mem: int | None = None  # MiB: the most memory it held at once


@dataclass(frozen=True, slots=True)
class Tick:
    now: float
    usage: Usage


@dataclass(frozen=True, slots=True)
class Health:
    """What one of a run's health checks now says."""

    run_id: str
    check: str
    result: CheckResult
    now: float


@dataclass(frozen=True, slots=True)
class Recovered:
    """A restarted agent looked for the processes of its saved runs: `alive` are still
    running (and now watched again); the others ended, with `exit_codes` where recorded."""

    alive: frozenset[str]
    exit_codes: dict[str, int | None]
    now: float


Event = Connected | FromMaster | Unled | Spawned | SpawnFailed | Exited | Tick | Recovered | Health

# --- commands -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Spawn:
    spec: RunSpec


@dataclass(frozen=True, slots=True)
class Signal:
    run_id: str
    pid: int
    signal: int


@dataclass(frozen=True, slots=True)
class SendToMaster:
    frame: Register | Heartbeat | RunReports


@dataclass(frozen=True, slots=True)
class SaveTable:
    entries: tuple[RunEntry, ...]


Command = Spawn | Signal | SendToMaster | SaveTable


@dataclass
class _Out:
    commands: list[Command] = field(default_factory=list)
    reports: list[RunReport] = field(default_factory=list)
    changed: bool = False


class AgentState:
    """The task table of one node and the rules that change it."""

    def __init__(self, node: NodeInfo, entries: list[RunEntry] = (), resend_after: float = 2.0) -> None:
        self.node = node
        self.runs: dict[str, RunEntry] = {e.spec.run_id: e for e in entries}
        self.resend_after = resend_after
        self._o = _Out()
        self.heartbeat_timeout: float | None = None  # the master's, once it has said
        self.fencing = False  # whether the master asked for self-fencing
        self.heard_at = -math.inf  # when a master last answered (a restart waits to hear)
        self.fenced = False  # runs stopped for silence, until a master is heard again

    def handle(self, *events: Event) -> list[Command]:
        self._o = _Out()
        for event in events:
            self._dispatch(event)
        out = self._o
        commands = list(out.commands)
        if out.reports:
            commands.append(SendToMaster(RunReports(reports=out.reports)))
        if out.changed:
            commands.insert(0, SaveTable(tuple(self.runs.values())))
        return commands

    def _dispatch(self, event: Event) -> None:
        if isinstance(event, FromMaster):
            self.heard_at, self.fenced = event.now, False
        match event:
            case Connected(now=now):
                reports = [
                    self._reported(e, now) for e in self.runs.values() if e.state is not TaskState.ASSIGNED
                ]
                self._o.commands.append(SendToMaster(Register(node=self.node, runs=reports)))
            case FromMaster(frame=Launch(runs=runs)):
                for spec in runs:
                    self._launch(spec)
            case FromMaster(frame=Kill(run_ids=run_ids), now=now):
                for run in run_ids:
                    self._kill(run, now)
            case FromMaster(frame=Ack(reports=acks)):
                self._ack(acks)
            case FromMaster(frame=Welcome(heartbeat_timeout=timeout, fence=fence)):
                self.heartbeat_timeout, self.fencing = timeout, fence
            case Unled(now=now):
                self.heard_at = max(self.heard_at, now)
            case Spawned():
                self._spawned(event)
            case SpawnFailed(run_id=run, message=message, now=now):
                self._finish(run, None, now, message=f"could not start: {message}")
            case Exited(run_id=run, exit_code=code, now=now, checkpoint=checkpoint):
                if (entry := self.runs.get(run)) is not None and not entry.state.terminal:
                    entry.cpu_seconds, entry.peak_mem = event.cpu_seconds, event.peak_mem
                self._finish(run, code, now, checkpoint=checkpoint)
            case Tick(now=now, usage=usage):
                self._tick(now, usage)
            case Recovered():
                self._recover(event)
            case Health(run_id=run, check=check, result=result, now=now):
                entry = self.runs.get(run)
                if entry is not None and entry.state is TaskState.RUNNING:
                    entry.checks[check] = result
                    self._changed(entry, now)

    def _launch(self, spec: RunSpec) -> None:
        if spec.run_id in self.runs:
            return  # a repeated launch after a reconnect: already ours
        self.runs[spec.run_id] = RunEntry(spec=spec)
        self._o.changed = True
        self._o.commands.append(Spawn(spec))

    def _kill(self, run: str, now: float) -> None:
        entry = self.runs.get(run)
        if entry is None:
            task_id, attempt = parse_run_id(run)
            self._o.reports.append(
                RunReport(
                    run_id=run,
                    task_id=task_id,
                    attempt=attempt,
                    state=TaskState.KILLED,
                    message="not running on this node",
                )
            )
            return
        if entry.state.terminal or entry.kill_requested:
            return
        entry.kill_requested = True
        self._o.changed = True
        if entry.timed_out:
            # Its time limit sent SIGTERM already (and SIGKILL follows, or went: hence not
            # `kill_deadline`, cleared then): nothing more to send. It ends KILLED.
            return
        # The master took it out of the registry when it asked for the kill: SIGTERM waits
        # out the shutdown delay, so requests already sent to it are answered.
        entry.term_at = now + entry.spec.shutdown_delay
        if entry.pid is not None and now >= entry.term_at:
            self._signal(entry, signal.SIGTERM, now)

    def _signal(self, entry: RunEntry, sig: int, now: float) -> None:
        assert entry.pid is not None
        if sig == signal.SIGTERM:
            entry.term_at = None
            grace = entry.spec.kill_grace
            if entry.fenced and self.heartbeat_timeout is not None:
                grace = min(grace, FENCE_GRACE * self.heartbeat_timeout)
            entry.kill_deadline = now + grace
        self._o.commands.append(Signal(entry.spec.run_id, entry.pid, sig))

    def _spawned(self, event: Spawned) -> None:
        entry = self.runs.get(event.run_id)
        if entry is None or entry.state is not TaskState.ASSIGNED:
            return
        entry.state = TaskState.RUNNING
        entry.pid = event.pid
        entry.pid_start = event.pid_start
        entry.started_at = event.now
        self._changed(entry, event.now)
        if entry.kill_requested and event.now >= (entry.term_at or 0.0):
            self._signal(entry, signal.SIGTERM, event.now)

    def _finish(
        self, run: str, code: int | None, now: float, message: str = "", checkpoint: str | None = None
    ) -> None:
        entry = self.runs.get(run)
        if entry is None or entry.state.terminal:
            return
        entry.checkpoint = checkpoint
        if entry.fenced:
            entry.state = TaskState.LOST
            message = entry.message
        elif entry.kill_requested:
            entry.state = TaskState.KILLED
        elif entry.timed_out:
            entry.state = TaskState.FAILED
            message = message or f"stopped at its time limit of {entry.spec.time_limit:g}s"
        elif code == 0:
            entry.state = TaskState.FINISHED
        else:
            entry.state = TaskState.FAILED
        entry.exit_code = code
        entry.message = message or _describe_exit(code)
        entry.term_at = entry.kill_deadline = None  # no signal to a process that has ended
        self._changed(entry, now)

    def _changed(self, entry: RunEntry, now: float) -> None:
        entry.acked = False
        self._o.changed = True
        self._o.reports.append(self._reported(entry, now))

    def _reported(self, entry: RunEntry, now: float) -> RunReport:
        entry.reported_at = now
        return entry.report()

    def _ack(self, acks: list[tuple[str, TaskState]]) -> None:
        for run, state in acks:
            entry = self.runs.get(run)
            if entry is None or entry.state is not state:
                continue
            entry.acked = True
            self._o.changed = True
            if entry.state.terminal:
                del self.runs[run]

    def _recover(self, event: Recovered) -> None:
        for run, entry in list(self.runs.items()):
            if entry.state is TaskState.ASSIGNED:
                # Never confirmed started: report it failed rather than risk running it twice.
                self._finish(run, None, event.now, message="the agent restarted before it started")
            elif entry.state is TaskState.RUNNING and run not in event.alive:
                self._finish(run, event.exit_codes.get(run), event.now)

    def running(self) -> list[RunEntry]:
        """Runs whose processes were started and have not been seen to end."""
        return [e for e in self.runs.values() if e.state is TaskState.RUNNING and e.pid is not None]

    def next_due(self) -> float:
        """The earliest time a `Tick` does more than send a heartbeat: a run reaches its time
        limit, a stopped run's shutdown delay or grace ends, a report is due again, or the
        runs are stopped for silence (math.inf: none)."""
        due = self._fence_at()
        for entry in self.runs.values():
            due = min(
                due,
                self._limit_at(entry),
                self._sigterm_at(entry),
                self._sigkill_at(entry),
                self._resend_at(entry),
            )
        return due

    def _limit_at(self, entry: RunEntry) -> float:
        """When a running run is stopped for its time limit (math.inf: never, or stopping)."""
        limit = entry.spec.time_limit
        if limit is None or entry.started_at is None or entry.state is not TaskState.RUNNING:
            return math.inf
        return math.inf if entry.timed_out or entry.kill_requested else entry.started_at + limit

    def _sigterm_at(self, entry: RunEntry) -> float:
        """When a run asked to stop gets its SIGTERM, its shutdown delay over."""
        return entry.term_at if entry.term_at is not None and entry.pid is not None else math.inf

    def _sigkill_at(self, entry: RunEntry) -> float:
        """When a stopped run's grace ends and SIGKILL follows its SIGTERM."""
        return entry.kill_deadline if entry.kill_deadline is not None and entry.pid is not None else math.inf

    def _resend_at(self, entry: RunEntry) -> float:
        """When an unacknowledged report of the run is sent again."""
        if entry.acked or entry.state is TaskState.ASSIGNED:
            return math.inf
        return entry.reported_at + self.resend_after

    def gone_quiet(self, now: float, interval: float) -> bool:
        """Whether the master has not answered for `REDIAL_AFTER` of its timeout (and for
        more than two of this agent's heartbeats every `interval` seconds, each of which it
        answers): time to hang up and dial whoever leads now, before the runs are stopped."""
        timeout = self.heartbeat_timeout
        return timeout is not None and now - self.heard_at > max(REDIAL_AFTER * timeout, 2.5 * interval)

    def _fence_at(self) -> float:
        """When the runs are stopped for want of a master (math.inf: not before one speaks)."""
        if self.heartbeat_timeout is None or not self.fencing or self.fenced or not self.runs:
            return math.inf
        return self.heard_at + FENCE_AFTER * self.heartbeat_timeout

    def _fence(self, now: float) -> None:
        """Stop every run now: the master is about to call this node lost (see the module)."""
        assert self.heartbeat_timeout is not None
        self.fenced = True
        silent = now - self.heard_at
        cut = now + FENCE_GRACE * self.heartbeat_timeout
        for entry in self.runs.values():
            if entry.state.terminal:
                continue
            if entry.kill_requested and entry.term_at is None:  # stopping already: cut its grace
                if entry.kill_deadline is not None:
                    entry.kill_deadline = min(entry.kill_deadline, cut)
                continue
            entry.fenced = True
            entry.kill_requested = True
            entry.message = f"stopped: no master heard for {silent:.1f}s, so it could not run twice"
            entry.term_at = now
            if entry.pid is not None:
                self._signal(entry, signal.SIGTERM, now)
        self._o.changed = True

    def _tick(self, now: float, usage: Usage) -> None:
        self._o.commands.append(SendToMaster(Heartbeat(usage=usage)))
        if now >= self._fence_at():
            self._fence(now)
        for entry in self.runs.values():
            if now >= self._limit_at(entry):
                entry.timed_out = True
                self._o.changed = True
                self._signal(entry, signal.SIGTERM, now)
            if now >= self._sigterm_at(entry):
                self._signal(entry, signal.SIGTERM, now)
            if entry.pid is not None and now >= self._sigkill_at(entry):
                self._o.commands.append(Signal(entry.spec.run_id, entry.pid, signal.SIGKILL))
                entry.kill_deadline = None
            if now >= self._resend_at(entry):
                self._o.reports.append(self._reported(entry, now))


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "exit status unknown: the process ended while the agent was away"
    if code < 0:
        return (
            f"killed by signal {signal.Signals(-code).name}"
            if -code in signal.valid_signals()
            else f"killed by signal {-code}"
        )
    return "" if code == 0 else f"exited with status {code}"
