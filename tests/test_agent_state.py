"""The agent's state machine, event by event."""

from __future__ import annotations

import signal

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import TypeAdapter

from shoal.agent.state import (
    FENCE_AFTER,
    FENCE_GRACE,
    AgentState,
    Command,
    Connected,
    Exited,
    FromMaster,
    Recovered,
    RunEntry,
    SaveTable,
    SendToMaster,
    Signal,
    Spawn,
    Spawned,
    SpawnFailed,
    Tick,
    Unled,
)
from shoal.model import Resources, TaskState, Usage
from shoal.testing.sim import sim_node
from shoal.wire import Ack, Heartbeat, Kill, Launch, Register, RunReports, RunSpec, Welcome


def spec(
    run: str = "1.0.0", grace: float = 5.0, delay: float = 0.0, time_limit: float | None = None
) -> RunSpec:
    task, _, attempt = run.rpartition(".")
    return RunSpec(
        run_id=run,
        task_id=task,
        attempt=int(attempt),
        argv=["true"],
        resources=Resources(),
        kill_grace=grace,
        shutdown_delay=delay,
        time_limit=time_limit,
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


# --- the shutdown delay: out of the registry first, SIGTERM after -------------------------


def signals(commands: list[Command]) -> list[signal.Signals]:
    return [signal.Signals(c.signal) for c in commands if isinstance(c, Signal)]


def launched_with(run_spec: RunSpec) -> AgentState:
    state = AgentState(sim_node("n1"))
    state.handle(FromMaster(Launch(runs=[run_spec]), 0.0))
    return state


def running(run_spec: RunSpec, pid: int = 42) -> AgentState:
    """A node running `run_spec` since 0.0, its report acknowledged: only signals are due."""
    state = launched_with(run_spec)
    state.handle(Spawned(run_spec.run_id, pid, 1.0, 0.0))
    state.handle(FromMaster(Ack(reports=[(run_spec.run_id, TaskState.RUNNING)]), 0.0))
    return state


def test_a_kill_waits_out_the_shutdown_delay_then_terms_then_kills_after_the_grace() -> None:
    state = running(spec(grace=2.0, delay=3.0))
    assert signals(state.handle(FromMaster(Kill(run_ids=["1.0.0"]), 1.0))) == []
    assert state.next_due() == 4.0  # the kill plus its delay
    assert signals(state.handle(Tick(3.9, Usage()))) == []
    assert signals(state.handle(Tick(4.0, Usage()))) == [signal.SIGTERM]
    assert state.next_due() == 6.0  # then the grace
    assert signals(state.handle(Tick(5.9, Usage()))) == []
    assert signals(state.handle(Tick(6.0, Usage()))) == [signal.SIGKILL]
    assert signals(state.handle(Tick(20.0, Usage()))) == []
    assert reports(state.handle(Exited("1.0.0", -9, 20.1))) == [("1.0.0", TaskState.KILLED, -9)]


def test_a_delay_of_zero_terms_at_once() -> None:
    state = running(spec(grace=2.0, delay=0.0))
    assert signals(state.handle(FromMaster(Kill(run_ids=["1.0.0"]), 1.0))) == [signal.SIGTERM]
    assert state.next_due() == 3.0
    assert signals(state.handle(Tick(3.0, Usage()))) == [signal.SIGKILL]


def test_a_repeated_kill_does_not_restart_the_delay() -> None:
    state = running(spec(delay=3.0))
    state.handle(FromMaster(Kill(run_ids=["1.0.0"]), 1.0))
    assert state.handle(FromMaster(Kill(run_ids=["1.0.0"]), 2.0)) == []
    assert signals(state.handle(Tick(4.0, Usage()))) == [signal.SIGTERM]
    assert signals(state.handle(FromMaster(Kill(run_ids=["1.0.0"]), 5.0))) == []


def test_a_time_limit_terms_at_once_whatever_the_delay() -> None:
    state = running(spec(grace=2.0, delay=3.0, time_limit=10.0))
    assert state.next_due() == 10.0
    assert signals(state.handle(Tick(10.0, Usage()))) == [signal.SIGTERM]
    assert signals(state.handle(Tick(12.0, Usage()))) == [signal.SIGKILL]
    assert reports(state.handle(Exited("1.0.0", -9, 12.1)))[0][1] is TaskState.FAILED


@pytest.mark.parametrize("kill_at", [10.5, 12.5], ids=["in its grace", "after its SIGKILL"])
def test_a_kill_after_a_time_limits_sigterm_sends_nothing_more(kill_at: float) -> None:
    state = running(spec(grace=2.0, delay=3.0, time_limit=10.0))
    sent = signals(state.handle(Tick(10.0, Usage())))
    if kill_at > 12.0:
        sent += signals(state.handle(Tick(12.0, Usage())))
    commands = state.handle(FromMaster(Kill(run_ids=["1.0.0"]), kill_at))
    assert commands == [SaveTable(tuple(state.runs.values()))]  # marked, and saved: nothing sent
    for now in (11.0, 12.0, 13.0, 13.5, 14.0, 15.5, 20.0):
        if now > kill_at:
            sent += signals(state.handle(Tick(now, Usage())))
    assert sent == [signal.SIGTERM, signal.SIGKILL]  # once each, SIGKILL at the grace's end
    assert reports(state.handle(Exited("1.0.0", -15, 20.1))) == [("1.0.0", TaskState.KILLED, -15)]


@pytest.mark.parametrize(
    ("spawned_at", "at_spawn"), [(1.0, []), (5.0, [signal.SIGTERM])], ids=["within", "after"]
)
def test_a_run_killed_before_it_started_still_waits_out_its_delay(
    spawned_at: float, at_spawn: list[signal.Signals]
) -> None:
    state = launched_with(spec(delay=3.0))
    assert state.handle(FromMaster(Kill(run_ids=["1.0.0"]), 0.0)) == [SaveTable(tuple(state.runs.values()))]
    assert signals(state.handle(Spawned("1.0.0", 7, 1.0, spawned_at))) == at_spawn
    state.handle(FromMaster(Ack(reports=[("1.0.0", TaskState.RUNNING)]), spawned_at))
    if not at_spawn:
        assert state.next_due() == 3.0
        assert signals(state.handle(Tick(2.9, Usage()))) == []
        assert signals(state.handle(Tick(3.0, Usage()))) == [signal.SIGTERM]
    assert state.next_due() == max(spawned_at, 3.0) + 5.0  # SIGKILL after the grace


def test_a_run_that_ends_within_its_delay_gets_no_signal() -> None:
    state = running(spec(delay=3.0))
    state.handle(FromMaster(Kill(run_ids=["1.0.0"]), 1.0))
    assert reports(state.handle(Exited("1.0.0", 0, 1.5))) == [("1.0.0", TaskState.KILLED, 0)]
    assert state.next_due() == 3.5  # its report again, no more
    assert signals(state.handle(Tick(4.0, Usage()))) == []


def test_a_restarted_agent_honours_a_delay_under_way() -> None:
    state = running(spec(delay=3.0))
    saved = next(
        c for c in state.handle(FromMaster(Kill(run_ids=["1.0.0"]), 1.0)) if isinstance(c, SaveTable)
    )
    table = TypeAdapter(list[RunEntry])  # as the agent writes runs.json and reads it back
    entries = table.validate_json(table.dump_json(list(saved.entries)))
    assert entries[0].term_at == 4.0
    restarted = AgentState(sim_node("n1"), entries)
    assert signals(restarted.handle(Recovered(frozenset({"1.0.0"}), {}, 2.0))) == []
    assert restarted.next_due() == 4.0
    assert signals(restarted.handle(Tick(3.9, Usage()))) == []
    assert signals(restarted.handle(Tick(4.0, Usage()))) == [signal.SIGTERM]


# --- self-fencing: a node cut off from every master stops its runs before they are lost ---


def _signals(commands: list) -> list[tuple[str, int]]:
    return [(c.run_id, c.signal) for c in commands if isinstance(c, Signal)]


def welcomed(timeout: float = 10.0, grace: float = 5.0) -> AgentState:
    state = AgentState(sim_node("n1"))
    state.handle(FromMaster(Welcome(heartbeat_timeout=timeout, fence=True), 0.0))
    state.handle(FromMaster(Launch(runs=[spec("1.0.0", grace=grace)]), 0.0))
    state.handle(Spawned("1.0.0", 42, 1.0, 0.0))
    return state


def test_no_fencing_before_a_master_has_said_its_timeout_nor_unless_it_asks() -> None:
    state = launched("1.0.0")
    state.handle(Spawned("1.0.0", 42, 1.0, 0.0))
    assert _signals(state.handle(Tick(1000.0, Usage()))) == []
    state.handle(FromMaster(Welcome(heartbeat_timeout=10.0), 1000.0))  # fence: False
    assert _signals(state.handle(Tick(2000.0, Usage()))) == []


def test_silence_stops_every_run_before_the_master_would_call_it_lost() -> None:
    state = welcomed(timeout=10.0, grace=5.0)
    assert _signals(state.handle(Tick(5.9, Usage()))) == []
    assert state.next_due() == pytest.approx(FENCE_AFTER * 10)
    assert _signals(state.handle(Tick(6.0, Usage()))) == [("1.0.0", signal.SIGTERM)]
    # Its grace is cut to FENCE_GRACE of the timeout: killed by 8 s, before the master's 10.
    assert _signals(state.handle(Tick(7.9, Usage()))) == []
    assert _signals(state.handle(Tick(8.0, Usage()))) == [("1.0.0", signal.SIGKILL)]
    ended = reports(state.handle(Exited("1.0.0", -9, 8.1)))
    assert ended == [("1.0.0", TaskState.LOST, -9)]
    assert "no master heard for 6.0s" in state.runs["1.0.0"].message


def test_each_answer_of_a_master_puts_the_fence_off() -> None:
    state = welcomed(timeout=10.0)
    state.handle(FromMaster(Ack(reports=[]), 5.0))  # a heartbeat answered
    assert _signals(state.handle(Tick(10.9, Usage()))) == []
    assert _signals(state.handle(Tick(11.0, Usage()))) == [("1.0.0", signal.SIGTERM)]


def test_masters_that_all_refuse_or_hold_an_election_count_no_silence() -> None:
    state = welcomed(timeout=10.0)
    state.handle(Unled(5.0))  # every master refused, or knew no leader, from 5 s on
    assert _signals(state.handle(Tick(10.9, Usage()))) == []
    assert _signals(state.handle(Tick(11.0, Usage()))) == [("1.0.0", signal.SIGTERM)]
    state = welcomed(timeout=10.0)
    state.handle(FromMaster(Ack(reports=[]), 5.0))
    state.handle(Unled(3.0))  # older than the last answer: changes nothing
    assert _signals(state.handle(Tick(11.0, Usage()))) == [("1.0.0", signal.SIGTERM)]


def test_a_run_launched_as_the_fence_falls_is_stopped_once_it_starts() -> None:
    state = AgentState(sim_node("n1"))
    state.handle(FromMaster(Welcome(heartbeat_timeout=10.0, fence=True), 0.0))
    state.handle(FromMaster(Launch(runs=[spec("1.0.0")]), 0.0))
    state.handle(Tick(6.0, Usage()))
    assert _signals(state.handle(Spawned("1.0.0", 42, 1.0, 6.5))) == [("1.0.0", signal.SIGTERM)]


@given(
    heard=st.lists(st.floats(0, 100), max_size=5),
    timeout=st.floats(2, 30),
    grace=st.floats(0, 30),
    tick=st.floats(0.1, 1),
)
def test_a_silent_agent_has_killed_every_run_before_the_masters_timeout(
    heard: list[float], timeout: float, grace: float, tick: float
) -> None:
    """Whatever the master's last answer, every run has had SIGKILL by FENCE_AFTER +
    FENCE_GRACE of the master's timeout after it (give or take the agent's ticks): before the
    master, counting from then, calls the node down."""
    state = welcomed(timeout=timeout, grace=grace)
    last = 0.0
    killed_at = None
    now = 0.0
    answers = sorted(heard)
    while now < 200 and killed_at is None:
        now += tick
        while answers and answers[0] <= now:
            last = answers.pop(0)
            state.handle(FromMaster(Ack(reports=[]), last))
        if ("1.0.0", signal.SIGKILL) in _signals(state.handle(Tick(now, Usage()))):
            killed_at = now
    assert killed_at is not None
    assert killed_at <= last + (FENCE_AFTER + FENCE_GRACE) * timeout + 2 * tick


def test_the_agent_hangs_up_on_a_quiet_master_but_not_between_heartbeats() -> None:
    state = welcomed(timeout=10.0)  # the master last answered at 0
    assert not state.gone_quiet(2.5, interval=1.0)
    assert state.gone_quiet(2.6, interval=1.0)  # a quarter of the timeout
    assert not state.gone_quiet(2.6, interval=2.0)  # but never within two heartbeats and a half
    assert state.gone_quiet(5.1, interval=2.0)


def test_fencing_cuts_the_grace_of_a_run_already_stopping() -> None:
    state = welcomed(timeout=10.0, grace=300.0)
    state.handle(FromMaster(Kill(run_ids=["1.0.0"]), 0.5))  # SIGTERM, with 300 s to go
    state.handle(Tick(6.5, Usage()))  # 6 s since the master last spoke: at most 2 s more
    assert _signals(state.handle(Tick(8.4, Usage()))) == []
    assert _signals(state.handle(Tick(8.5, Usage()))) == [("1.0.0", signal.SIGKILL)]
