"""When a Tick has something to do: `next_due` of the master (its desks and the ledger's
retention) and of the agent is never later than the first tick that changes anything, and a
tick at it does what was due; SimCluster ticks only then, and runs the master's one cycle of
an instant after everything else of that instant."""

from __future__ import annotations

import copy
import math
import signal
from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, settings
from hypothesis.stateful import invariant
from test_ledger_machine import LedgerMachine

from shoal.agent import state as agent
from shoal.checks import TASK_CHECK, CheckResult, CheckStatus
from shoal.core.rebalance import RebalancePolicy
from shoal.errors import ShoalError
from shoal.framework import protocol as p
from shoal.master.events import (
    Command,
    Disconnect,
    Drain,
    FrameworkCall,
    FromAgent,
    Persist,
    Principal,
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
from shoal.master.moves import SUCCESSOR_PATIENCE, Rebalancing
from shoal.master.state import MasterState
from shoal.model import JobSpec, NodeStatus, Resources, TaskState, Usage
from shoal.testing.sim import SimCluster, sim_node
from shoal.wire import Ack, Heartbeat, Kill, Launch, Register, RunReport, RunReports, RunSpec

ADMIN = Principal("ops", admin=True)


def before(t: float) -> float:
    return math.nextafter(t, -math.inf)


def ticks(make: Callable[[], MasterState], due: float) -> tuple[list[Command], list[Command]]:
    """What a Tick does a hair before `due` and at it, each on a fresh run of the scenario."""
    return make().handle(Tick(before(due))), make().handle(Tick(due))


def register(state: MasterState, name: str, now: float = 0.0, cpus: float = 4) -> None:
    state.handle(FromAgent(name, Register(node=sim_node(name, cpus=cpus)), now))


def submit(state: MasterState, now: float = 0.0, **spec) -> int:
    [reply] = [c for c in state.handle(Submit(1, "alice", JobSpec(**spec), now)) if isinstance(c, Reply)]
    assert reply.error is None, reply.error
    return reply.value


def report(state: MasterState, task_id: str, to: TaskState, now: float, attempt: int = 0, **fields) -> None:
    """From the node of that attempt: the task's, or its new copy's."""
    task = state.ledger.tasks[task_id]
    node = task.successor.node if task.successor and task.successor.attempt == attempt else task.node
    run = RunReport(run_id=f"{task_id}.{attempt}", task_id=task_id, attempt=attempt, state=to, **fields)
    state.handle(FromAgent(node or "", RunReports(reports=[run]), now))


def verdict(passing: bool) -> dict[str, CheckResult]:
    """A run's own check, passing or not."""
    return {TASK_CHECK: CheckResult(CheckStatus.PASSING if passing else CheckStatus.CRITICAL)}


def kills(commands: list[Command]) -> list[str]:
    return [r for c in commands if isinstance(c, Send) and isinstance(c.frame, Kill) for r in c.frame.run_ids]


# --- the master -------------------------------------------------------------------------


def test_a_node_is_due_to_be_lost_just_past_its_heartbeat_timeout() -> None:
    def make() -> MasterState:
        state = MasterState(heartbeat_timeout=5)
        register(state, "n1")
        register(state, "n2")
        state.handle(FromAgent("n2", Heartbeat(usage=Usage()), 2.0))
        return state

    state = make()
    due = state.next_due()
    assert due == math.nextafter(5.0, math.inf)  # n1's: silent for more than 5 s
    early, on_time = ticks(make, due)
    assert early == [] and Disconnect("n1") in on_time and Disconnect("n2") not in on_time
    state.handle(FromAgent("n1", Heartbeat(usage=Usage()), 3.0))
    assert state.next_due() == math.nextafter(7.0, math.inf)  # now n2's, heard from at 2


def test_a_restart_delay_is_due_when_it_ends() -> None:
    def make() -> MasterState:
        state = MasterState(heartbeat_timeout=math.inf)
        register(state, "n1")
        submit(state, command="x", resources={"cpus": 1}, restart={"attempts": 1, "delay": 10})
        report(state, "1.0", TaskState.FAILED, 1.0, exit_code=1)
        return state

    assert make().next_due() == 11.0
    early, on_time = ticks(make, 11.0)
    assert early == []
    assert [r.run_id for c in on_time if isinstance(c, Send) for r in c.frame.runs] == ["1.0.1"]


def test_a_finished_job_is_due_to_be_pruned_at_the_end_of_its_retention() -> None:
    def make() -> MasterState:
        state = MasterState(heartbeat_timeout=math.inf, retention=Retention(age=60, count=10))
        register(state, "n1")
        submit(state, command="x", resources={"cpus": 1})
        report(state, "1.0", TaskState.FINISHED, 2.0, exit_code=0)
        return state

    assert make().next_due() == 62.0
    early, on_time = ticks(make, 62.0)
    assert early == [] and [c.forgotten_jobs for c in on_time if isinstance(c, Persist)] == [(1,)]


def test_past_the_retention_count_pruning_is_due_at_once_unless_the_rest_are_pinned() -> None:
    state = MasterState(heartbeat_timeout=math.inf, retention=Retention(age=60, count=1))
    register(state, "n1")
    for now in (0.0, 1.0):
        submit(state, now, command="x", resources={"cpus": 1})
    for task_id in ("1.0", "2.0"):
        report(state, task_id, TaskState.FINISHED, 2.0, exit_code=0)
    assert state.next_due() == -math.inf  # already due: a time past means now
    assert state.ledger.next_prune(pinned={1, 2}) == math.inf  # kept for a desk: nothing to forget
    state.handle(Tick(2.0))
    assert sorted(state.ledger.jobs) == [2] and state.next_due() == 62.0


def framework_master(**policy: float) -> MasterState:
    state = MasterState(heartbeat_timeout=math.inf, framework_policy=FrameworkPolicy(**policy))
    register(state, "n1")
    return state


def subscribe(state: MasterState, now: float, connection: int = 1, failover: float = 3600) -> str:
    body = p.Subscribe(name="fw", failover_timeout=failover)
    [reply] = [
        c for c in state.handle(SubscribeFramework(1, ADMIN, body, connection, now)) if isinstance(c, Reply)
    ]
    return reply.value


def told(commands: list[Command], kind: type) -> list:
    return [c.event for c in commands if isinstance(c, ToFramework) and isinstance(c.event, kind)]


def test_an_offer_is_due_to_expire_at_its_timeout() -> None:
    def make() -> MasterState:
        state = framework_master(offer_timeout=30)
        subscribe(state, 1.0)
        return state

    assert make().next_due() == 31.0
    early, on_time = ticks(make, 31.0)
    assert early == [] and len(told(on_time, p.Rescind)) == 1


def test_a_gone_framework_is_due_to_end_just_past_its_failover_timeout() -> None:
    def make() -> MasterState:
        state = framework_master(offer_timeout=math.inf)
        subscribe(state, 0.0, failover=10)
        state.handle(StreamClosed(1, 2.0))
        return state

    due = make().next_due()
    assert due == math.nextafter(12.0, math.inf)
    early, on_time = ticks(make, due)
    assert early == [] and any(r.removed for c in on_time if isinstance(c, Persist) for r in c.frameworks)


def test_unacknowledged_updates_are_due_again_after_the_retry() -> None:
    def make() -> MasterState:
        state = framework_master(offer_timeout=math.inf, retry=10)
        framework = subscribe(state, 0.0)
        [offer] = state.frameworks.offers
        launch = p.TaskLaunch(name="a", command="x", resources={"cpus": 1})
        state.handle(FrameworkCall(2, ADMIN, framework, p.Accept(offer_ids=[offer], tasks=[launch]), 1.0))
        report(state, "1.0", TaskState.RUNNING, 1.0)
        return state

    assert make().next_due() == 10.0  # delivered last on subscribing, at 0
    early, on_time = ticks(make, 10.0)
    assert early == [] and [u.status.state for u in told(on_time, p.Update)] == [TaskState.RUNNING]


def test_a_refusal_filter_is_due_when_it_lapses() -> None:
    def make() -> MasterState:
        state = framework_master(offer_timeout=math.inf)
        framework = subscribe(state, 0.0)
        [offer] = state.frameworks.offers
        state.handle(FrameworkCall(2, ADMIN, framework, p.Decline(offer_ids=[offer], refuse_seconds=5), 1.0))
        return state

    assert make().next_due() == 6.0
    early, on_time = ticks(make, 6.0)
    assert early == [] and [c for c in on_time if isinstance(c, ToFramework)]  # offered again


def test_the_next_offer_cycle_is_due_after_the_interval() -> None:
    state = framework_master(offer_timeout=math.inf, interval=2.0)
    subscribe(state, 0.0)
    register(state, "n2", 0.5)  # more room, offered at the next cycle
    assert state.next_due() == 2.0


def service(**fields) -> JobSpec:
    return JobSpec(
        command="serve",
        resources={"cpus": 1},
        ports=["web"],
        migrate="make-before-break",
        health={"tcp": "web"},
        **fields,
    )


def moves_master(*specs: JobSpec, **rebalancing) -> MasterState:
    """Every job running on n1 (n2 is registered after them), nothing else due."""
    state = MasterState(heartbeat_timeout=math.inf, rebalancing=Rebalancing(**rebalancing))
    register(state, "n1")
    for spec in specs:
        [reply] = [c for c in state.handle(Submit(1, "alice", spec, 0.0)) if isinstance(c, Reply)]
        for task in state.ledger.tasks_of(reply.value):
            report(state, task.id, TaskState.RUNNING, 0.0)
    register(state, "n2")
    return state


def test_a_drain_deadline_is_due_when_it_comes() -> None:
    def make() -> MasterState:
        state = moves_master(JobSpec(command="x", resources={"cpus": 1}, migrate="never"))
        state.handle(Drain(2, "n1", True, 1.0, deadline=10))
        return state

    assert make().next_due() == 11.0
    early, on_time = ticks(make, 11.0)
    assert early == [] and kills(on_time) == ["1.0.0"]


def test_a_new_copy_is_due_to_be_given_up_just_past_its_patience() -> None:
    def make() -> MasterState:
        state = moves_master(service())
        state.handle(Drain(2, "n1", True, 1.0))
        report(state, "1.0", TaskState.RUNNING, 2.0, attempt=1, checks=verdict(False))
        return state

    due = make().next_due()
    assert due == math.nextafter(1.0 + SUCCESSOR_PATIENCE, math.inf)
    early, on_time = ticks(make, due)
    assert early == [] and kills(on_time) == ["1.0.1"]


def test_a_rebalancing_round_is_due_every_period() -> None:
    assert moves_master(loop=True, every=15.0).next_due() == 15.0
    assert moves_master().next_due() == math.inf


def test_a_drained_service_with_nowhere_to_go_is_due_again_once_room_frees() -> None:
    state = moves_master(service(), service(), policy=RebalancePolicy(cooldown=0))
    state.ledger.table.set_schedulable("n2", False)  # nowhere to go yet
    state.handle(Drain(2, "n1", True, 1.0))
    state.handle(Tick(1.0))  # the drain changed the table: one more try, in vain
    assert state.next_due() == math.inf and state.handle(Tick(2.0)) == []
    register(state, "n3", 3.0)  # room: both may move now
    assert state.next_due() == -math.inf
    state.handle(Tick(3.0))
    assert all(t.successor is not None for t in state.ledger.tasks.values())
    assert state.next_due() == math.nextafter(3.0 + SUCCESSOR_PATIENCE, math.inf)


class DeadlineMachine(LedgerMachine):
    """Every mix the ledger machine makes: a Tick a hair before `next_due` changes nothing.
    Nodes are never lost here, or their heartbeat deadlines (tested above) would come first
    every time and hide what the desks and retention have due."""

    def _master(self) -> MasterState:
        state = super()._master()
        state.heartbeat_timeout = math.inf
        return state

    @invariant()
    def nothing_is_due_before_next_due(self) -> None:
        state = self.state
        due = state.next_due()
        if due > self.now and not state.wants_cycle:
            assert copy.deepcopy(state).handle(Tick(max(self.now, before(due)))) == []


TestDeadlineMachine = DeadlineMachine.TestCase
# 25 runs of 30 steps: 750 steps, each followed by a tick a hair before what is due, on a
# deep copy of the master (the copy is most of the cost).
TestDeadlineMachine.settings = settings(
    max_examples=25, stateful_step_count=30, deadline=None, suppress_health_check=list(HealthCheck)
)


def test_with_cycle_on_tick_only_a_tick_schedules() -> None:
    state = MasterState(cycle_on_tick=True)
    register(state, "n1")
    job = submit(state, command="x", resources={"cpus": 1})
    assert state.wants_cycle and state.ledger.tasks[f"{job}.0"].state is TaskState.PENDING
    [send] = [c for c in state.handle(Tick(0.0)) if isinstance(c, Send)]
    assert isinstance(send.frame, Launch) and not state.wants_cycle


# --- the agent --------------------------------------------------------------------------


def run_spec(time_limit: float | None = None, grace: float = 5.0) -> RunSpec:
    return RunSpec(
        run_id="1.0.0",
        task_id="1.0",
        attempt=0,
        argv=["x"],
        resources=Resources(),
        kill_grace=grace,
        time_limit=time_limit,
    )


def spawned(time_limit: float | None = None, acked: bool = True) -> agent.AgentState:
    """A run started at 1.0, its RUNNING report acknowledged (or not)."""
    state = agent.AgentState(sim_node("n1"), resend_after=2.0)
    state.handle(agent.FromMaster(Launch(runs=[run_spec(time_limit)]), 0.0))
    state.handle(agent.Spawned("1.0.0", pid=42, pid_start=1.0, now=1.0))
    if acked:
        state.handle(agent.FromMaster(Ack(reports=[("1.0.0", TaskState.RUNNING)]), 1.0))
    return state


def agent_ticks(make: Callable[[], agent.AgentState], due: float) -> tuple[list, list]:
    tick = [make().handle(agent.Tick(t, Usage())) for t in (before(due), due)]
    heartbeat = agent.SendToMaster(Heartbeat(usage=Usage()))
    assert all(heartbeat in commands for commands in tick)  # every tick still beats
    return [c for c in tick[0] if c != heartbeat], [c for c in tick[1] if c != heartbeat]


def test_an_agent_has_nothing_due_for_an_acknowledged_run_without_a_limit() -> None:
    assert agent.AgentState(sim_node("n1")).next_due() == math.inf
    assert spawned().next_due() == math.inf


def test_a_time_limit_is_due_when_it_ends() -> None:
    assert spawned(time_limit=5).next_due() == 6.0
    early, on_time = agent_ticks(lambda: spawned(time_limit=5), 6.0)
    assert early == [] and agent.Signal("1.0.0", 42, signal.SIGTERM) in on_time


def test_sigkill_is_due_when_the_grace_ends() -> None:
    def make() -> agent.AgentState:
        state = spawned()
        state.handle(agent.FromMaster(Kill(run_ids=["1.0.0"]), 2.0))
        return state

    assert make().next_due() == 7.0
    early, on_time = agent_ticks(make, 7.0)
    assert early == [] and on_time == [agent.Signal("1.0.0", 42, signal.SIGKILL)]


def test_an_unacknowledged_report_is_due_again_after_resend_after() -> None:
    assert spawned(acked=False).next_due() == 3.0
    early, on_time = agent_ticks(lambda: spawned(acked=False), 3.0)
    assert early == []
    [resent] = on_time
    assert [r.state for r in resent.frame.reports] == [TaskState.RUNNING]


# --- SimCluster -------------------------------------------------------------------------


def test_a_silent_node_is_lost_just_past_its_last_heartbeat_plus_the_timeout() -> None:
    sim = SimCluster([sim_node("n1"), sim_node("n2")], heartbeat_timeout=3.0)
    sim.advance(2.5)
    last_seen = sim.master.ledger.nodes["n1"].last_seen
    sim.kill_agent("n1")
    sim.run(lambda: sim.master.ledger.nodes["n1"].status is NodeStatus.DOWN)
    assert sim.now == math.nextafter(last_seen + 3.0, math.inf)
    assert sim.master.ledger.nodes["n2"].status is NodeStatus.UP


def test_tasks_ending_at_one_instant_all_free_their_room_before_its_one_cycle() -> None:
    sim = SimCluster(
        [sim_node("n1", cpus=2)], latency=(0.0, 0.0), heartbeat_interval=math.inf, heartbeat_timeout=math.inf
    )
    sim.advance(1.0)
    pair = sim.submit({"command": "sleep 10", "count": 2, "resources": {"cpus": 1}})
    sim.advance(1.0)
    whole = sim.submit({"command": "sleep 1", "resources": {"cpus": 2}})
    cycles: list[tuple[float, list[TaskState]]] = []  # when, and the pair's states then
    handle = sim.master.handle

    def seen(*events):
        if any(isinstance(e, Tick) for e in events):
            cycles.append((sim.now, [t.state for t in sim.master.ledger.tasks_of(pair)]))
        return handle(*events)

    sim.master.handle = seen
    sim.run(lambda: sim.master.ledger.tasks[f"{whole}.0"].state is TaskState.RUNNING)
    end = sim.master.ledger.tasks[f"{pair}.0"].finished_at
    assert end == sim.master.ledger.tasks[f"{pair}.1"].finished_at == sim.now
    assert [states for when, states in cycles if when == end] == [[TaskState.FINISHED] * 2]
    assert sim.master.ledger.tasks[f"{whole}.0"].started_at == end


def test_run_stops_when_done_or_before_an_event_past_until() -> None:
    sim = SimCluster([sim_node("n1")], heartbeat_interval=math.inf, heartbeat_timeout=math.inf)
    seen: list[float] = []
    for when in (5.0, 7.0, 9.0):
        sim.at(when, lambda when=when: seen.append(when))
    sim.run(lambda: bool(seen))
    assert (seen, sim.now) == ([5.0], 5.0)
    sim.run(lambda: False, until=8.0)
    assert (seen, sim.now) == ([5.0, 7.0], 7.0)
    sim.run(lambda: False, until=30 * 86400.0)  # a quiet month: nothing ticks meanwhile
    assert (seen, sim.now) == ([5.0, 7.0, 9.0], 9.0)
    with pytest.raises(ShoalError, match="past"):
        sim.at(8.0, lambda: None)


def test_without_the_store_a_master_cannot_restart() -> None:
    sim = SimCluster([sim_node("n1")], persist=False)
    sim.advance(1.0)
    job = sim.submit({"command": "sleep 1"})
    sim.run_until(lambda: sim.master.ledger.tasks[f"{job}.0"].state is TaskState.FINISHED)
    assert sim.store is None
    with pytest.raises(ShoalError, match="persist=False"):
        sim.restart_master()
