"""SimCluster: the real master and agent state machines joined by in-memory links.

Every frame goes through the real encoder (`wire.encode` / `wire.decode`) and arrives after
a seeded random latency (`latency`; (0, 0) delivers it at the same instant). Time is virtual
and goes from one event to the next (`advance`, `run`): the master ticks when its
`next_due` or `wants_cycle` says a Tick has something to do, an agent at its next heartbeat
or its own `next_due`, so a quiet month of a trace costs nothing. The master schedules on
ticks only (`cycle_on_tick`), and its tick comes last of its instant: the cycle sees every
end and submission of that instant at once, as a batch scheduler does. `at` does a driver's
own actions at their times (a trace's submissions).

Processes are simulated: `runtime(spec)` says how long a run lasts and how it exits. Faults
are methods: `kill_agent` (the machine dies with its processes), `restart_agent` (the agent
process restarts; its runs go on), `partition` / `heal`, and `restart_master` (a new master
state rebuilt from the store, as after a SIGKILL: frameworks' streams break and they
subscribe again). Frameworks (`add_framework`) speak the offer API through its real JSON
encoding; `drain` and `rebalance` move tasks; a run with a health check passes it
`HEALTHY_AFTER` seconds after it starts. After every delivery `check()` asserts the ledger's
invariants (`shoal.testing.invariants`), so a fault test fails at the first step that breaks
one. `persist=False` drops what the master would store: a long trace replay needs no store
(and cannot `restart_master`).
"""

from __future__ import annotations

import functools
import heapq
import itertools
import math
import random
import re
import signal
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

from shoal.agent import state as agent
from shoal.checks import CheckResult, CheckStatus
from shoal.core.scheduler import Policy
from shoal.errors import ShoalError
from shoal.framework import protocol as p
from shoal.master import events as master
from shoal.master.ledger import Retention
from shoal.master.state import MasterState
from shoal.master.store import Snapshot
from shoal.master.store.sqlite import SqliteStore
from shoal.model import JobSpec, NodeInfo, Resources, TaskState, Usage
from shoal.testing import invariants
from shoal.wire import RunSpec, decode, encode

Runtime = Callable[[RunSpec], tuple[float, int]]
HEALTHY_AFTER = 0.5  # seconds from a run's start to its health check's first pass
REFUSE = 5.0  # seconds a simulated framework refuses an offer it declined (Mesos's default)
# The phases of one instant, in order: the master's scheduling cycle comes after everything
# else due then, so it sees all of that instant's ends and submissions.
EVENT, CYCLE = 0, 1


def shell_runtime(spec: RunSpec) -> tuple[float, int]:
    """Reads `sleep N`, `exit K`, `true` and `false` from a command; anything else: 10 ms, 0."""
    command = spec.argv[-1] if spec.argv[:2] == ["/bin/sh", "-c"] else " ".join(spec.argv)
    if m := re.fullmatch(r"\s*sleep\s+([\d.]+)\s*", command):
        return float(m.group(1)), 0
    if m := re.fullmatch(r"\s*exit\s+(\d+)\s*", command):
        return 0.01, int(m.group(1))
    return 0.01, 1 if command.strip() == "false" else 0


@dataclass
class _Process:
    run_id: str
    task_id: str
    ends_at: float
    exit_code: int
    alive: bool = True


@dataclass
class _Node:
    info: NodeInfo
    state: agent.AgentState | None = None
    disk: tuple[dict[str, object], ...] = ()  # the saved table: each entry's fields as saved
    processes: dict[str, _Process] = field(default_factory=dict)
    connected: bool = False
    partitioned: bool = False
    epoch: int = 0  # bumped on every (re)connection: frames of an old connection are dropped
    next_beat: float = math.inf  # the agent's next heartbeat
    tick_at: float = math.inf  # when its armed tick fires
    timer: int = 0  # the armed tick's number: an older one, or one of a former agent process, is void


@dataclass
class SimFramework:
    """A framework as the SDK drives one: it launches its tasks one to an offer, declines
    what does not fit (for `REFUSE` seconds), suppresses offers once all are launched,
    acknowledges every update, and subscribes again as itself when its stream breaks."""

    name: str
    todo: list[p.TaskLaunch]
    id: str | None = None
    connection: int | None = None
    told: dict[str, list[TaskState]] = field(default_factory=lambda: defaultdict(list))  # task -> states

    def ended(self, task: str) -> bool:
        return any(state.terminal for state in self.told.get(task, ()))


SIM_PRINCIPAL = master.Principal("sim", admin=True)


def sim_node(name: str, cpus: float = 4, mem: int = 8192, gpus: int = 0, address: str = "") -> NodeInfo:
    return NodeInfo(
        name=name, hostname=name, capacity=Resources(cpus=cpus, mem=mem, gpus=gpus), address=address
    )


class SimCluster:
    def __init__(
        self,
        nodes: list[NodeInfo],
        *,
        seed: int = 0,
        heartbeat_timeout: float = 5.0,
        heartbeat_interval: float = 1.0,
        latency: tuple[float, float] = (0.001, 0.005),
        runtime: Runtime = shell_runtime,
        policy: Policy | None = None,
        retention: Retention | None = None,
        persist: bool = True,
        check: bool = True,
    ) -> None:
        """`heartbeat_interval=math.inf`: agents never heartbeat (with `heartbeat_timeout`
        math.inf too, nodes are never lost); `latency`: the range of a frame's delay, seconds."""
        self.now = 0.0
        self.rng = random.Random(seed)
        self.runtime = runtime
        self.heartbeat_timeout = heartbeat_timeout
        self.heartbeat_interval = heartbeat_interval
        self.latency = latency
        self.checking = check
        self.store = SqliteStore(":memory:") if persist else None
        self.policy = policy
        self.retention = retention
        self.nodes = {n.name: _Node(n) for n in nodes}
        self.spawns: Counter[str] = Counter()  # task id -> processes ever started for it
        self._heap: list[tuple[float, int, int, Callable[[], None]]] = []
        self._seq = itertools.count()
        self._requests = itertools.count(1)
        self._connections = itertools.count(1)
        self.frameworks: list[SimFramework] = []
        self._master_at = math.inf  # when the master's armed tick fires
        self._master_timer = 0  # the armed tick's number: an older one is void
        self._start_master(None)
        for name in self.nodes:
            self.start_agent(name)

    # --- the clock ------------------------------------------------------------------------

    def at(self, when: float, action: Callable[[], None]) -> None:
        """Do `action` at virtual time `when` (a driver's submissions, say)."""
        if when < self.now:
            raise ShoalError(f"{when:g} is past: the virtual time is {self.now:g}")
        self._push(when, EVENT, action)

    def _push(self, when: float, phase: int, action: Callable[[], None]) -> None:
        heapq.heappush(self._heap, (when, phase, next(self._seq), action))

    def _latency(self) -> float:
        return self.rng.uniform(*self.latency)

    def advance(self, seconds: float) -> None:
        """Run everything due within the next `seconds` of virtual time."""
        until = self.now + seconds
        while self._heap and self._heap[0][0] <= until:
            self._step()
        self.now = until

    def run(self, done: Callable[[], bool], until: float = math.inf) -> None:
        """Run events in order until `done()` (asked after each one), until none is left, or
        until the next is past `until`; `now` is then the time of the last one run."""
        while self._heap and self._heap[0][0] <= until:
            self._step()
            if done():
                return

    def _step(self) -> None:
        when, _, _, action = heapq.heappop(self._heap)
        self.now = when
        action()
        if self.checking:
            self.check()

    def run_until(self, done: Callable[[], bool], limit: float = 120.0, step: float = 0.1) -> None:
        waited = 0.0
        while not done():
            if waited >= limit:
                raise AssertionError(f"condition not reached within {limit}s of virtual time")
            self.advance(step)
            waited += step

    # --- the master side ------------------------------------------------------------------

    def _start_master(self, snap: Snapshot | None) -> None:
        self.master = MasterState(
            self.heartbeat_timeout,
            policy=self.policy,
            snapshot=snap,
            retention=self.retention,
            now=self.now,
            cycle_on_tick=True,
        )
        self._master_at = math.inf
        self._master_timer += 1  # the former master's tick is void
        self._arm_master()

    def _arm_master(self) -> None:
        """Arm the master's tick for when it has something to do, unless one comes sooner."""
        due = self.now if self.master.wants_cycle else max(self.now, self.master.next_due())
        if due < self._master_at:
            self._master_at = due
            self._master_timer += 1
            self._push(due, CYCLE, functools.partial(self._master_tick, self._master_timer))

    def _master_tick(self, timer: int) -> None:
        """The armed tick. It may come early (what was due moved later: a heartbeat came);
        then the master does nothing and it is armed again."""
        if timer == self._master_timer:  # else a sooner tick took its place
            self._master_at = math.inf
            self._master_handle(master.Tick(self.now))

    def _master_handle(self, *events: master.Event) -> dict[int, master.Reply]:
        replies = {}
        for command in self.master.handle(*events):
            match command:
                case master.Persist():
                    if self.store is not None:
                        self.store.apply(command)
                case master.Send(node=name, frame=frame):
                    self._to_agent(name, encode(frame))
                case master.Reply():
                    replies[command.request] = command
                case master.Disconnect(node=name):
                    self._drop_connection(name)
                case master.ToFramework(connection=c, event=event):
                    data = self.master.frameworks.encode(event)
                    self.at(self.now + self._latency(), lambda c=c, data=data: self._to_framework(c, data))
        self._arm_master()
        return replies

    def submit(self, spec: JobSpec | dict, owner: str = "alice") -> int:
        spec = spec if isinstance(spec, JobSpec) else JobSpec.model_validate(spec)
        request = next(self._requests)
        reply = self._master_handle(master.Submit(request, owner, spec, self.now))[request]
        if reply.error is not None:
            raise reply.error
        return reply.value  # type: ignore[return-value]

    def kill_job(self, job_id: int) -> None:
        self._master_handle(master.KillJob(next(self._requests), job_id, self.now))

    def _request(self, make: Callable[[int], master.Request]) -> object:
        request = next(self._requests)
        reply = self._master_handle(make(request))[request]
        if reply.error is not None:
            raise reply.error
        return reply.value

    def drain(self, node: str, drain: bool = True, deadline: float | None = None) -> object:
        return self._request(lambda r: master.Drain(r, node, drain, self.now, deadline))

    def rebalance(self) -> object:
        return self._request(lambda r: master.RebalanceNow(r, self.now))

    # --- frameworks -----------------------------------------------------------------------

    def add_framework(self, name: str, tasks: list[p.TaskLaunch]) -> SimFramework:
        framework = SimFramework(name, list(tasks))
        self.frameworks.append(framework)
        self._subscribe(framework)
        return framework

    def _subscribe(self, framework: SimFramework) -> None:
        framework.connection = connection = next(self._connections)
        body = p.Subscribe(name=framework.name, framework_id=framework.id, failover_timeout=3600)
        framework.id = self._request(  # type: ignore[assignment]
            lambda r: master.SubscribeFramework(r, SIM_PRINCIPAL, body, connection, self.now)
        )

    def _call(self, framework: SimFramework, call: p.Call) -> master.Reply:
        request = next(self._requests)
        event = master.FrameworkCall(request, SIM_PRINCIPAL, framework.id or "", call, self.now)
        return self._master_handle(event)[request]

    def _to_framework(self, connection: int, data: bytes) -> None:
        framework = next((f for f in self.frameworks if f.connection == connection), None)
        if framework is None:
            return  # a stream that broke meanwhile
        match p.EVENT.validate_json(data):
            case p.Offers(offers=offers):
                for offer in offers:
                    self._answer(framework, offer)
            case p.Update(status=status):
                framework.told[status.task].append(status.state)
                if status.uuid is not None:
                    self._call(framework, p.Acknowledge(uuids=[status.uuid]))
            case p.Error():
                framework.connection = None

    def _answer(self, framework: SimFramework, offer: p.OfferInfo) -> None:
        fits = [t for t in framework.todo if t.resources.shortfall(offer.resources) is None]
        if not fits:
            self._call(framework, p.Decline(offer_ids=[offer.id], refuse_seconds=REFUSE))
            return
        reply = self._call(framework, p.Accept(offer_ids=[offer.id], tasks=[fits[0]]))
        if reply.error is None:
            framework.todo.remove(fits[0])
            if not framework.todo:
                self._call(framework, p.Suppress())

    def restart_master(self) -> None:
        """The master dies (SIGKILL) and a new one starts from what the store holds."""
        if self.store is None:
            raise ShoalError("a master restarts from its store: this SimCluster runs with persist=False")
        snap = self.store.load()
        for node in self.nodes.values():
            node.connected = False
            node.epoch += 1
        self._start_master(snap)
        for name in self.nodes:
            self._schedule_reconnect(name)
        for framework in self.frameworks:
            if framework.connection is not None:
                framework.connection = None
                self.at(self.now + 0.5 + self._latency(), lambda f=framework: self._subscribe(f))

    # --- links ----------------------------------------------------------------------------

    def _carry(self, name: str, deliver: Callable[[int], None]) -> None:
        """Put a frame on `name`'s link: it arrives after a latency, if the link still holds."""
        node = self.nodes[name]
        if node.connected and not node.partitioned:
            epoch = node.epoch
            self.at(self.now + self._latency(), lambda: deliver(epoch))

    def _to_agent(self, name: str, data: bytes) -> None:
        self._carry(name, lambda epoch: self._deliver_to_agent(name, data, epoch))

    def _deliver_to_agent(self, name: str, data: bytes, epoch: int) -> None:
        node = self.nodes[name]
        if node.state is None or node.epoch != epoch or node.partitioned:
            return
        self._agent_handle(name, agent.FromMaster(decode(data), self.now))  # type: ignore[arg-type]

    def _to_master(self, name: str, data: bytes) -> None:
        self._carry(name, lambda epoch: self._deliver_to_master(name, data, epoch))

    def _deliver_to_master(self, name: str, data: bytes, epoch: int) -> None:
        node = self.nodes[name]
        if node.epoch != epoch or node.partitioned:
            return
        self._master_handle(master.FromAgent(name, decode(data), self.now))  # type: ignore[arg-type]

    def _drop_connection(self, name: str) -> None:
        node = self.nodes[name]
        node.connected = False
        node.epoch += 1
        self._schedule_reconnect(name)

    def _schedule_reconnect(self, name: str) -> None:
        self.at(self.now + 0.1 + self._latency(), lambda: self._reconnect(name))

    def _reconnect(self, name: str) -> None:
        node = self.nodes[name]
        if node.state is None or node.connected:
            return
        if node.partitioned:
            self._schedule_reconnect(name)
            return
        node.connected = True
        node.epoch += 1
        self._agent_handle(name, agent.Connected(self.now))

    def partition(self, name: str) -> None:
        """Cut `name` off: frames both ways are lost until `heal`."""
        self.nodes[name].partitioned = True

    def heal(self, name: str) -> None:
        """Reconnect `name`; its old connection is gone, as a real one would time out."""
        node = self.nodes[name]
        node.partitioned = False
        node.connected = False
        node.epoch += 1
        self._schedule_reconnect(name)

    # --- the agent side -------------------------------------------------------------------

    def start_agent(self, name: str) -> None:
        """Start an agent process on `name`, recovering its saved table if there is one."""
        node = self.nodes[name]
        node.state = agent.AgentState(node.info, [agent.RunEntry.model_validate(e) for e in node.disk])
        node.next_beat = self.now + self.heartbeat_interval
        node.tick_at = math.inf
        node.timer += 1  # a former agent process's tick is void
        alive = frozenset(r for r, p in node.processes.items() if p.alive)
        exits = {r: p.exit_code for r, p in node.processes.items() if not p.alive}
        self._agent_handle(name, agent.Recovered(alive, exits, self.now))
        node.connected = False
        self._schedule_reconnect(name)

    def kill_agent(self, name: str) -> None:
        """The machine dies: the agent and every process on it, with its disk."""
        node = self.nodes[name]
        node.state = None
        node.connected = False
        node.epoch += 1
        node.disk = ()
        for proc in node.processes.values():
            proc.alive = False
        node.processes.clear()

    def stop_agent(self, name: str) -> None:
        """Only the agent process dies (SIGKILL): its runs go on without it."""
        node = self.nodes[name]
        node.state = None
        node.connected = False
        node.epoch += 1

    def restart_agent(self, name: str) -> None:
        self.stop_agent(name)
        self.start_agent(name)

    def _agent_due(self, node: _Node) -> float:
        assert node.state is not None
        return max(self.now, min(node.next_beat, node.state.next_due()))

    def _arm_agent(self, name: str) -> None:
        """Arm the agent's tick for its next heartbeat or deadline, unless one comes sooner."""
        node = self.nodes[name]
        due = self._agent_due(node)
        if due < node.tick_at:
            node.tick_at = due
            node.timer += 1
            self.at(due, functools.partial(self._agent_tick, name, node.timer))

    def _agent_tick(self, name: str, timer: int) -> None:
        node = self.nodes[name]
        if node.state is None or timer != node.timer:
            return  # that agent process is gone, or a sooner tick took its place
        node.tick_at = math.inf
        if self._agent_due(node) > self.now:
            # Armed for what is no longer due (a report was acknowledged): a tick now would
            # add a heartbeat the agent does not send.
            self._arm_agent(name)
            return
        if self.now >= node.next_beat:
            node.next_beat = self.now + self.heartbeat_interval
        self._agent_handle(name, agent.Tick(self.now, Usage()))

    def _agent_handle(self, name: str, *events: agent.Event) -> None:
        node = self.nodes[name]
        assert node.state is not None
        for command in node.state.handle(*events):
            match command:
                case agent.SaveTable(entries=entries):
                    node.disk = tuple(vars(e).copy() for e in entries)  # fields are immutable values
                case agent.Spawn(spec=spec):
                    self._spawn(name, spec)
                case agent.Signal(run_id=run, signal=sig):
                    self._signal(name, run, sig)
                case agent.SendToMaster(frame=frame):
                    self._to_master(name, encode(frame))
        self._arm_agent(name)

    def _spawn(self, name: str, spec: RunSpec) -> None:
        duration, code = self.runtime(spec)
        proc = _Process(spec.run_id, spec.task_id, self.now + duration, code)
        node = self.nodes[name]
        node.processes[spec.run_id] = proc
        self.spawns[spec.task_id] += 1
        self._agent_handle(
            name, agent.Spawned(spec.run_id, pid=1000 + len(node.processes), pid_start=self.now, now=self.now)
        )
        self.at(proc.ends_at, lambda: self._process_ended(name, proc, None))
        if spec.checks:
            self.at(self.now + HEALTHY_AFTER, lambda: self._healthy(name, proc, list(spec.checks)))

    def _healthy(self, name: str, proc: _Process, checks: list[str]) -> None:
        node = self.nodes[name]
        if proc.alive and node.state is not None and node.processes.get(proc.run_id) is proc:
            passing = CheckResult(CheckStatus.PASSING, "passing in the simulator", self.now)
            for check in checks:
                self._agent_handle(name, agent.Health(proc.run_id, check, passing, self.now))

    def _signal(self, name: str, run: str, sig: int) -> None:
        proc = self.nodes[name].processes.get(run)
        if proc is not None and proc.alive and sig in (signal.SIGTERM, signal.SIGKILL):
            self._process_ended(name, proc, -sig)

    def _process_ended(self, name: str, proc: _Process, code: int | None) -> None:
        if not proc.alive:
            return
        proc.alive = False
        if code is not None:
            proc.exit_code = code
        node = self.nodes[name]
        if node.state is not None and node.processes.get(proc.run_id) is proc:
            self._agent_handle(name, agent.Exited(proc.run_id, proc.exit_code, self.now))

    # --- what tests look at ---------------------------------------------------------------

    def live_processes(self, task_id: str) -> list[str]:
        """The nodes where a process of `task_id` is alive now."""
        return [
            name
            for name, node in self.nodes.items()
            for p in node.processes.values()
            if p.alive and p.task_id == task_id
        ]

    def check(self) -> None:
        """The ledger's invariants (`shoal.testing.invariants`)."""
        invariants.check(self.master)
