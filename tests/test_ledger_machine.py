"""The ledger under random mixes of everything that changes it, checked after every event.

A hypothesis state machine drives one master state machine through its real events:
submissions of jobs with every placement rule (constraints, node sets, max_per_node,
max_per, spread targets, ports, GPUs, every migration mode), frameworks subscribing and
accepting offers, agents starting, ending and reporting load, rebalancing rounds, drains,
lost nodes and master restarts from what the store holds. The agents are simple fakes that
run what they are told. After every step `shoal.testing.invariants.check` holds: nothing is
over-committed, allocations are exactly what tasks, copies and offers hold, and every copy
of a task stands where its job's rules allow, with devices and ports of its own.
"""

from __future__ import annotations

from collections import defaultdict

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from shoal.checks import CheckResult, CheckStatus
from shoal.core.rebalance import RebalancePolicy
from shoal.core.scheduler import Policy, QueuePolicy
from shoal.framework import protocol as p
from shoal.master.events import (
    Drain,
    FrameworkCall,
    FromAgent,
    KillJob,
    Persist,
    Principal,
    RebalanceNow,
    Reply,
    Send,
    StreamClosed,
    Submit,
    SubscribeFramework,
    Tick,
    ToFramework,
)
from shoal.master.frameworks import FrameworkPolicy
from shoal.master.ledger import Retention
from shoal.master.moves import Rebalancing
from shoal.master.state import MasterState
from shoal.master.store.sqlite import SqliteStore
from shoal.model import TASK_RECORD, JobSpec, NodeInfo, Resources, RunUsage, TaskState, Usage
from shoal.testing import invariants
from shoal.wire import Heartbeat, Kill, Launch, Register, RunReport, RunReports, RunSpec

NODES = [f"n{i}" for i in range(5)]
TIMEOUT = 5.0
ADMIN = Principal("ops", admin=True)
POLICY = Policy(queues={"default": QueuePolicy(), "batch": QueuePolicy(weight=2, order="fair")})


def node_info(i: int) -> NodeInfo:
    return NodeInfo(
        name=NODES[i],
        hostname=NODES[i],
        capacity=Resources(cpus=4, mem=4096, gpus=2 if i % 2 else 0, custom={"licenses": 2} if i < 2 else {}),
        labels={"rack": f"r{i % 2}", "zone": f"z{i % 3}"},
        port_range=(20000, 20003),  # few ports: running out of them is a case too
    )


@st.composite
def job_specs(draw: st.DrawFn) -> JobSpec:
    ports = draw(st.sampled_from([[], ["web"]]))
    migrate = draw(
        st.sampled_from(["restart", "checkpoint", "never"] + (["make-before-break"] if ports else []))
    )
    spec: dict = {
        "command": "serve",
        "count": draw(st.integers(1, 5)),
        "queue": draw(st.sampled_from(["default", "batch"])),
        "priority": draw(st.integers(0, 3)),
        "resources": {
            "cpus": draw(st.sampled_from([0.5, 1, 2])),
            "mem": draw(st.sampled_from([128, 1024])),
            "gpus": draw(st.sampled_from([0, 0, 1])),
        },
        "ports": ports,
        "migrate": migrate,
        "strategy": draw(st.sampled_from([None, "binpack", "spread", "least-loaded"])),
    }
    if migrate == "make-before-break":
        spec["health"] = {"tcp": "web"}
    if ports and draw(st.booleans()):
        check = draw(st.sampled_from([None, {"tcp": "web"}]))
        spec["services"] = [{"name": draw(st.sampled_from(["web", "api"])), "port": "web", "check": check}]
    if draw(st.booleans()):
        spec["restart"] = {"attempts": draw(st.integers(1, 2)), "delay": draw(st.sampled_from([0, 1.0]))}
    if draw(st.booleans()):
        spec["resources"]["custom"] = {"licenses": 1}
    if draw(st.booleans()):
        spec["constraints"] = [draw(st.sampled_from(["rack == r0", "zone != z2", "rack in r0,r1"]))]
    if draw(st.booleans()):
        spec["max_per_node"] = draw(st.integers(1, 2))
    if draw(st.booleans()):
        spec["max_per"] = {"rack": draw(st.integers(1, 3))}
    if draw(st.booleans()):
        spec["spread"] = {"attribute": "zone", "targets": {"z0": 50, "z1": 50}}
    if draw(st.booleans()):
        spec["nodes"] = "n[0-3]"
    return JobSpec.model_validate(spec)


def remembered(state: MasterState) -> dict[str, object]:
    """What a master must know again after a restart: every record and what it implies."""
    ledger = state.ledger
    live = {"load"}  # readings measured afresh
    return {
        "jobs": {j.id: j.model_dump() for j in ledger.jobs.values()},
        "tasks": {
            t.id: {k: v for k, v in TASK_RECORD.dump_python(t).items() if k not in live}
            for t in ledger.tasks.values()
        },
        "pending": {job: sorted(ids) for job, ids in ledger.pending.items() if ids},
        "nodes": {n.name: (n.drained, n.drain_deadline, n.status) for n in ledger.nodes.values()},
        "migrations": dict(ledger.migrations),
        "next_job_id": ledger.next_job_id,
        "frameworks": {
            f: (
                fw.record.model_dump(exclude={"connected", "disconnected_at"}),
                dict(fw.tasks),
                list(fw.updates),
            )
            for f, fw in state.frameworks.frameworks.items()
        },
    }


class LedgerMachine(RuleBasedStateMachine):
    @initialize()
    def start(self) -> None:
        self.store = SqliteStore(":memory:", fsync=False)
        self.now = 0.0
        self.requests = 0
        self.state = self._master()
        self.up: set[str] = set()
        self.runs: dict[str, dict[str, RunSpec]] = defaultdict(dict)  # node -> its agent's runs
        self.started: dict[str, set[str]] = defaultdict(set)  # node -> runs reported running
        self.kills: dict[str, set[str]] = defaultdict(set)  # node -> runs asked to stop
        self.cpu: dict[str, float] = defaultdict(float)  # run -> CPU seconds it used
        self.frameworks: dict[str, int] = {}  # framework id -> its stream
        self.offers: dict[int, set[str]] = defaultdict(set)  # stream -> offers live on it
        for i in range(len(NODES)):
            self._register(i)

    def _master(self) -> MasterState:
        return MasterState(
            TIMEOUT,
            policy=POLICY,
            snapshot=self.store.load(),
            framework_policy=FrameworkPolicy(offer_timeout=10, patience=1),
            rebalancing=Rebalancing(RebalancePolicy(threshold=0.05, cooldown=0, budget=4)),
            retention=Retention(age=30, count=8),
            now=self.now,
        )

    # --- the links -------------------------------------------------------------------

    def handle(self, *events) -> list[Reply]:
        replies = []
        commands = self.state.handle(*events)
        invariants.check(self.state)  # after every event, not only after every rule
        for command in commands:
            match command:
                case Persist():
                    self.store.apply(command)
                case Send(node=node, frame=Launch(runs=runs)):
                    self.runs[node].update((r.run_id, r) for r in runs)
                case Send(node=node, frame=Kill(run_ids=ids)):
                    self.kills[node].update(r for r in ids if r in self.runs[node])
                case ToFramework(connection=c, event=event):
                    self._told(c, p.EVENT.validate_json(self.state.frameworks.encode(event)))
                case Reply():
                    replies.append(command)
        return replies

    def _told(self, connection: int, event: p.Told) -> None:
        if isinstance(event, p.Offers):
            self.offers[connection].update(o.id for o in event.offers)
        elif isinstance(event, p.Rescind):
            self.offers[connection].discard(event.offer_id)

    def _register(self, i: int) -> None:
        name = NODES[i]
        alive = [
            RunReport(run_id=r.run_id, task_id=r.task_id, attempt=r.attempt, state=TaskState.RUNNING)
            for r in self.runs[name].values()
            if r.run_id in self.started[name]
        ]
        self.up.add(name)
        self.handle(FromAgent(name, Register(node=node_info(i), runs=alive), self.now))

    def _report(self, node: str, reports: list[RunReport]) -> None:
        if reports:
            self.handle(FromAgent(node, RunReports(reports=reports), self.now))

    def _end(self, node: str, run: str, state: TaskState, code: int | None) -> RunReport:
        spec = self.runs[node].pop(run)
        self.started[node].discard(run)
        self.kills[node].discard(run)
        return RunReport(run_id=run, task_id=spec.task_id, attempt=spec.attempt, state=state, exit_code=code)

    # --- rules -----------------------------------------------------------------------

    @rule(specs=st.lists(job_specs(), min_size=1, max_size=3))
    def submit(self, specs: list[JobSpec]) -> None:
        for spec in specs:
            self.requests += 1
            names = frozenset(NODES[:4]) if spec.nodes else None
            self.handle(Submit(self.requests, "alice", spec, self.now, node_names=names))

    @rule(healthy=st.booleans())
    def agents_start_what_they_were_sent(self, healthy: bool) -> None:
        for node in sorted(self.up):
            fresh = [r for r in self.runs[node].values() if r.run_id not in self.started[node]]
            self.started[node].update(r.run_id for r in fresh)
            reports = [
                RunReport(
                    run_id=r.run_id,
                    task_id=r.task_id,
                    attempt=r.attempt,
                    state=TaskState.RUNNING,
                    checks={
                        name: CheckResult(CheckStatus.PASSING if healthy else CheckStatus.CRITICAL)
                        for name in r.checks
                    },
                )
                for r in fresh
            ]
            self._report(node, reports)

    @rule(data=st.data())
    def a_job_is_killed(self, data: st.DataObject) -> None:
        if self.state.ledger.jobs:
            self.requests += 1
            job = data.draw(st.sampled_from(sorted(self.state.ledger.jobs)))
            self.handle(KillJob(self.requests, job, self.now))

    @rule()
    def agents_stop_what_they_were_told_to(self) -> None:
        for node in sorted(self.up):
            self._report(
                node, [self._end(node, run, TaskState.KILLED, -15) for run in sorted(self.kills[node])]
            )

    @rule(data=st.data(), code=st.sampled_from([0, 0, 1]))
    def a_run_exits(self, data: st.DataObject, code: int) -> None:
        running = sorted((n, r) for n in self.up for r in self.started[n] if r in self.runs[n])
        if running:
            node, run = data.draw(st.sampled_from(running))
            state = TaskState.FINISHED if code == 0 else TaskState.FAILED
            self._report(node, [self._end(node, run, state, code)])

    @rule(i=st.integers(0, len(NODES) - 1))
    def one_node_runs_hot(self, i: int) -> None:
        """The runs sent start; three seconds of heartbeats, node i's runs busy and the
        others' idle; then a rebalancing round."""
        self.agents_start_what_they_were_sent(True)
        for _ in range(3):
            self.now += 1.0
            for node in sorted(self.up):
                busy = node == NODES[i]
                for run in self.started[node]:
                    self.cpu[run] += 0.25 if busy else 0.01
                used = {r: RunUsage(cpu_seconds=self.cpu[r]) for r in self.started[node]}
                usage = Usage(cpu_percent=100.0 if busy else 5.0, runs=used)
                self.handle(FromAgent(node, Heartbeat(usage=usage), self.now))
        self.rebalance()

    @rule(i=st.integers(0, len(NODES) - 1))
    def every_run_of_a_node_finishes(self, i: int) -> None:
        node = NODES[i]
        if node in self.up:
            done = sorted(r for r in self.started[node] if r in self.runs[node])
            self._report(node, [self._end(node, run, TaskState.FINISHED, 0) for run in done])

    @rule(seconds=st.sampled_from([0.5, 2.0, 11.0]))
    def time_passes(self, seconds: float) -> None:
        self.now += seconds
        for node in sorted(self.up):
            self.handle(FromAgent(node, Heartbeat(usage=Usage()), self.now))
        self.handle(Tick(self.now))

    @rule()
    def rebalance(self) -> None:
        self.requests += 1
        self.handle(RebalanceNow(self.requests, self.now))

    @rule(i=st.integers(0, len(NODES) - 1), deadline=st.sampled_from([None, 1.0]))
    def drain(self, i: int, deadline: float | None) -> None:
        """Drain node i, and take the one drained before back: one node is drained at a time."""
        for name, node in self.state.ledger.nodes.items():
            if node.drained and name != NODES[i]:
                self.requests += 1
                self.handle(Drain(self.requests, name, False, self.now))
        self.requests += 1
        self.handle(Drain(self.requests, NODES[i], True, self.now, deadline))

    @precondition(lambda self: len(self.up) > 2)
    @rule(i=st.integers(0, len(NODES) - 1))
    def a_node_is_lost(self, i: int) -> None:
        """The machine dies with its runs; the others keep beating past the timeout."""
        lost = NODES[i]
        self.up.discard(lost)
        self.runs[lost].clear()
        self.started[lost].clear()
        self.kills[lost].clear()
        self.time_passes(TIMEOUT + 1)

    @rule(i=st.integers(0, len(NODES) - 1))
    def a_node_comes_back(self, i: int) -> None:
        if NODES[i] not in self.up:
            self._register(i)

    @rule()
    def the_master_restarts(self) -> None:
        """A new master from what the store holds (everything it knew, but offers and live
        readings); agents and frameworks connect again."""
        before = remembered(self.state)
        # A restart takes time: the new master's ids (framework ids carry the time it started
        # at, to the millisecond) never repeat the old one's.
        self.now += 1
        self.state = self._master()
        assert remembered(self.state) == before
        self.offers.clear()
        streams, self.frameworks = self.frameworks, {}
        for i, name in enumerate(NODES):
            if name in self.up:
                self._register(i)
        for framework in streams:
            self.subscribe(framework)

    @precondition(lambda self: len(self.frameworks) < 2)
    @rule()
    def a_framework_subscribes(self) -> None:
        self.subscribe(None)

    def subscribe(self, framework: str | None) -> None:
        self.requests += 1
        connection = 1000 + self.requests
        body = p.Subscribe(name="fw", framework_id=framework, failover_timeout=60)
        [reply] = self.handle(SubscribeFramework(self.requests, ADMIN, body, connection, self.now))
        if reply.error is None:
            self.frameworks[reply.value] = connection

    @rule(data=st.data(), cpus=st.sampled_from([0.5, 1.0]), ports=st.sampled_from([[], ["web"]]))
    def a_framework_accepts(self, data: st.DataObject, cpus: float, ports: list[str]) -> None:
        live = sorted((f, o) for f, c in self.frameworks.items() for o in self.offers[c])
        if not live:
            return
        framework, offer_id = data.draw(st.sampled_from(live))
        self.offers[self.frameworks[framework]].discard(offer_id)
        self.requests += 1
        launch = p.TaskLaunch(
            name=f"t{self.requests}", command="work", resources={"cpus": cpus, "mem": 64}, ports=ports
        )
        call = p.Accept(offer_ids=[offer_id], tasks=[launch])
        self.handle(FrameworkCall(self.requests, ADMIN, framework, call, self.now))

    @rule(data=st.data())
    def a_framework_goes_away(self, data: st.DataObject) -> None:
        if self.frameworks:
            framework = data.draw(st.sampled_from(sorted(self.frameworks)))
            self.handle(StreamClosed(self.frameworks.pop(framework), self.now))

    # --- what holds after every step ---------------------------------------------------

    @invariant()
    def the_ledger_adds_up(self) -> None:
        invariants.check(self.state)

    @invariant()
    def the_store_holds_what_the_ledger_holds(self) -> None:
        snap = self.store.load()
        ledger = self.state.ledger
        assert {j.id for j in snap.jobs} == set(ledger.jobs)
        stored = {t.id: t for t in snap.tasks}
        for task in ledger.tasks.values():
            # A task never changed since its submission is implied by its job's row.
            state = stored[task.id].state if task.id in stored else TaskState.PENDING
            assert state is task.state, f"{task.id}: stored {state}, ledger {task.state}"


TestLedgerMachine = LedgerMachine.TestCase
# 60 runs of 50 steps: 3000 steps, the invariants checked after every event of each.
TestLedgerMachine.settings = settings(
    max_examples=60, stateful_step_count=50, deadline=None, suppress_health_check=list(HealthCheck)
)
