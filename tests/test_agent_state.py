"""The agent's state machine, event by event."""

from __future__ import annotations

import signal

from shoal.agent.state import (
    AgentState,
    Connected,
    Exited,
    FromMaster,
    Recovered,
    SaveTable,
    SendToMaster,
    Signal,
    Spawn,
    Spawned,
    SpawnFailed,
    Tick,
)
from shoal.model import Resources, TaskState, Usage
from shoal.testing.sim import sim_node
from shoal.wire import Ack, Heartbeat, Kill, Launch, Register, RunReports, RunSpec


def spec(run: str = "1.0.0", grace: float = 5.0) -> RunSpec:
    task, _, attempt = run.rpartition(".")
    return RunSpec(
        run_id=run, task_id=task, attempt=int(attempt), argv=["true"], resources=Resources(), kill_grace=grace
    )


def launched(*runs: str) -> AgentState:
    state = AgentState(sim_node("n1"))
    state.handle(FromMaster(Launch(runs=[spec(r) for r in runs]), 0.0))
    return state


def reports(commands: list) -> list[tuple[str, TaskState, int | None]]:
    return [
        (r.run_id, r.state, r.exit_code)
        for c in commands
        if isinstance(c, SendToMaster) and isinstance(c.frame, RunReports)
        for r in c.frame.reports
    ]


def test_launch_saves_then_spawns_and_ignores_repeats() -> None:
    state = AgentState(sim_node("n1"))
    commands = state.handle(FromMaster(Launch(runs=[spec()]), 0.0))
    assert [type(c) for c in commands] == [SaveTable, Spawn]
    assert state.handle(FromMaster(Launch(runs=[spec()]), 1.0)) == []


def test_lifecycle_reports_each_change() -> None:
    state = launched("1.0.0")
    assert reports(state.handle(Spawned("1.0.0", 42, 1.0, 0.1))) == [("1.0.0", TaskState.RUNNING, None)]
    assert reports(state.handle(Exited("1.0.0", 0, 2.0))) == [("1.0.0", TaskState.FINISHED, 0)]


def test_unacknowledged_reports_are_repeated_until_acked_then_forgotten() -> None:
    state = launched("1.0.0")
    state.handle(Spawned("1.0.0", 42, 1.0, 0.0))
    state.handle(Exited("1.0.0", 3, 0.5))
    assert reports(state.handle(Tick(1.0, Usage()))) == []  # not yet due
    assert reports(state.handle(Tick(3.0, Usage()))) == [("1.0.0", TaskState.FAILED, 3)]
    state.handle(FromMaster(Ack(reports=[("1.0.0", TaskState.FAILED)]), 3.1))
    assert state.runs == {}
    assert reports(state.handle(Tick(10.0, Usage()))) == []


def test_ack_of_an_older_state_does_not_silence_a_newer_one() -> None:
    state = launched("1.0.0")
    state.handle(Spawned("1.0.0", 42, 1.0, 0.0))
    state.handle(Exited("1.0.0", 0, 0.1))
    state.handle(FromMaster(Ack(reports=[("1.0.0", TaskState.RUNNING)]), 0.2))
    assert "1.0.0" in state.runs and not state.runs["1.0.0"].acked


def test_kill_terms_the_group_then_kills_after_the_grace() -> None:
    state = AgentState(sim_node("n1"))
    state.handle(FromMaster(Launch(runs=[spec(grace=2.0)]), 0.0))
    state.handle(Spawned("1.0.0", 42, 1.0, 0.0))
    commands = state.handle(FromMaster(Kill(run_ids=["1.0.0"]), 1.0))
    assert Signal("1.0.0", 42, signal.SIGTERM) in commands
    assert Signal("1.0.0", 42, signal.SIGKILL) not in state.handle(Tick(2.0, Usage()))
    assert Signal("1.0.0", 42, signal.SIGKILL) in state.handle(Tick(3.0, Usage()))
    assert reports(state.handle(Exited("1.0.0", -9, 3.1))) == [("1.0.0", TaskState.KILLED, -9)]


def test_kill_before_spawn_terms_as_soon_as_it_starts() -> None:
    state = launched("1.0.0")
    assert state.handle(FromMaster(Kill(run_ids=["1.0.0"]), 0.0)) == [SaveTable(tuple(state.runs.values()))]
    assert Signal("1.0.0", 7, signal.SIGTERM) in state.handle(Spawned("1.0.0", 7, 1.0, 0.1))


def test_kill_of_an_unknown_run_reports_it_killed() -> None:
    state = AgentState(sim_node("n1"))
    assert reports(state.handle(FromMaster(Kill(run_ids=["4.2.1"]), 0.0))) == [
        ("4.2.1", TaskState.KILLED, None)
    ]


def test_spawn_failure_is_a_failed_run_with_the_reason() -> None:
    state = launched("1.0.0")
    state.handle(SpawnFailed("1.0.0", "No such file or directory: '/nope'", 0.1))
    entry = state.runs["1.0.0"]
    assert entry.state is TaskState.FAILED and "could not start" in entry.message


def test_connect_registers_with_the_whole_table() -> None:
    state = launched("1.0.0", "1.1.0")
    state.handle(Spawned("1.0.0", 42, 1.0, 0.0))
    (command,) = state.handle(Connected(1.0))
    assert isinstance(command.frame, Register)
    assert [r.run_id for r in command.frame.runs] == ["1.0.0"]  # 1.1.0 has not started yet


def test_recovery_adopts_live_runs_and_settles_the_rest() -> None:
    old = launched("1.0.0", "1.1.0", "1.2.0")
    old.handle(Spawned("1.0.0", 42, 1.0, 0.0))
    old.handle(Spawned("1.1.0", 43, 1.0, 0.0))
    state = AgentState(sim_node("n1"), list(old.runs.values()))
    got = reports(state.handle(Recovered(frozenset({"1.0.0"}), {"1.1.0": 5}, 9.0)))
    assert got == [("1.1.0", TaskState.FAILED, 5), ("1.2.0", TaskState.FAILED, None)]
    assert state.runs["1.0.0"].state is TaskState.RUNNING


def test_tick_sends_a_heartbeat_with_usage() -> None:
    state = AgentState(sim_node("n1"))
    (command,) = state.handle(Tick(1.0, Usage(cpu_percent=50)))
    assert command == SendToMaster(Heartbeat(usage=Usage(cpu_percent=50)))
