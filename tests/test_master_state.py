"""The master's state machine, event by event: exact commands back."""

from __future__ import annotations

import pytest

from shoal.core.placement import NO_NODES
from shoal.errors import ShoalError, SpecError
from shoal.master.events import AgentGone, Disconnect, FromAgent, KillJob, Persist, Reply, Send, Submit, Tick
from shoal.master.state import MasterState
from shoal.master.store import Snapshot
from shoal.model import JobSpec, NodeStatus, TaskState
from shoal.testing.sim import sim_node
from shoal.wire import Ack, Heartbeat, Kill, Launch, Register, RunReport, RunReports


def register(state: MasterState, name: str, now: float = 0.0, runs: list[RunReport] = ()) -> list:
    return state.handle(FromAgent(name, Register(node=sim_node(name, cpus=2), runs=list(runs)), now))


def submit(state: MasterState, now: float = 0.0, **spec) -> tuple[int, list]:
    commands = state.handle(Submit(1, "alice", JobSpec(**{"command": "true", **spec}), now))
    reply = next(c for c in commands if isinstance(c, Reply))
    assert reply.error is None, reply.error
    return reply.value, commands


def report(task_id: str, state: TaskState, attempt: int = 0, exit_code: int | None = None) -> RunReport:
    return RunReport(
        run_id=f"{task_id}.{attempt}", task_id=task_id, attempt=attempt, state=state, exit_code=exit_code
    )


def test_submit_persists_before_it_replies_and_launches() -> None:
    state = MasterState()
    register(state, "n1")
    job, commands = submit(state, count=2, resources={"cpus": 1})
    kinds = [type(c) for c in commands]
    assert kinds == [Persist, Send, Reply]
    persist, send, reply = commands
    assert {t.id for t in persist.tasks} == {"1.0", "1.1"} and persist.jobs[0].id == job == 1
    assert isinstance(send.frame, Launch) and [r.run_id for r in send.frame.runs] == ["1.0.0", "1.1.0"]
    assert send.frame.runs[0].env["SHOAL_TASK_INDEX"] == "0"


def test_index_is_substituted_in_command_and_env() -> None:
    state = MasterState()
    register(state, "n1")
    _, commands = submit(
        state, command="echo {index}", env={"SHARD": "part-{index}"}, count=2, resources={"cpus": 0.5}
    )
    runs = next(c for c in commands if isinstance(c, Send)).frame.runs
    assert [r.argv for r in runs] == [["/bin/sh", "-c", "echo 0"], ["/bin/sh", "-c", "echo 1"]]
    assert [r.env["SHARD"] for r in runs] == ["part-0", "part-1"]


def test_unschedulable_submission_is_refused_and_changes_nothing() -> None:
    state = MasterState()
    register(state, "n1")
    commands = state.handle(Submit(7, "alice", JobSpec(command="x", resources={"cpus": 3}), 0.0))
    assert commands == [Reply(7, error=commands[0].error)]
    assert isinstance(commands[0].error, SpecError) and "the largest node has 2" in commands[0].error.reason
    assert state.ledger.jobs == {} and state.ledger.next_job_id == 1


def test_before_any_node_joins_every_pending_job_waits_for_one_and_no_other() -> None:
    state = MasterState()
    waiting, _ = submit(state)
    killed, _ = submit(state)
    state.handle(KillJob(2, killed, 0.0))
    later, _ = submit(state)  # after the cycle that found no node, before the next
    assert [state.why_waiting(job) for job in (waiting, killed, later, 99)] == [NO_NODES, "", NO_NODES, ""]
    register(state, "n1")
    assert state.why_waiting(waiting) == ""


def test_reports_move_tasks_and_are_acknowledged() -> None:
    state = MasterState()
    register(state, "n1")
    submit(state, resources={"cpus": 1})
    commands = state.handle(FromAgent("n1", RunReports(reports=[report("1.0", TaskState.RUNNING)]), 1.0))
    assert state.ledger.tasks["1.0"].state is TaskState.RUNNING
    assert commands[-1] == Send("n1", Ack(reports=[("1.0.0", TaskState.RUNNING)]))
    state.handle(FromAgent("n1", RunReports(reports=[report("1.0", TaskState.FINISHED, exit_code=0)]), 2.0))
    assert state.ledger.tasks["1.0"].state is TaskState.FINISHED
    assert state.ledger.allocated("n1").cpus == 0


def test_report_of_an_old_attempt_is_killed_not_adopted() -> None:
    state = MasterState()
    register(state, "n1")
    submit(state, resources={"cpus": 1})
    commands = state.handle(
        FromAgent("n1", RunReports(reports=[report("1.0", TaskState.RUNNING, attempt=5)]), 1.0)
    )
    assert Send("n1", Kill(run_ids=["1.0.5"])) in commands
    assert state.ledger.tasks["1.0"].state is TaskState.ASSIGNED


def test_a_heartbeat_keeps_only_the_nodes_own_runs() -> None:
    state = MasterState()
    register(state, "n1")
    register(state, "n2")
    submit(state, count=2, max_per_node=1, resources={"cpus": 1})
    mine = next(t.run_id for t in state.ledger.tasks.values() if t.node == "n1")
    theirs = next(t.run_id for t in state.ledger.tasks.values() if t.node == "n2")
    runs = {run: {"cpu_seconds": 1.0} for run in (mine, theirs, "", "x", "1.0.x", "nobody.0.1")}
    commands = state.handle(FromAgent("n1", Heartbeat(usage={"runs": runs}), 1.0))
    assert commands[-1] == Send("n1", Ack(reports=[]))
    assert list(state.ledger.nodes["n1"].usage.runs) == [mine]


def test_heartbeat_timeout_loses_tasks_and_restarts_them_after_the_delay() -> None:
    state = MasterState(heartbeat_timeout=3)
    register(state, "n1")
    register(state, "n2")
    submit(state, resources={"cpus": 2}, restart={"attempts": 1, "delay": 10})
    node = state.ledger.tasks["1.0"].node
    other = "n2" if node == "n1" else "n1"
    state.handle(FromAgent(other, Heartbeat(usage={}), 3.5))
    commands = state.handle(Tick(3.5))
    assert Disconnect(node) in commands and state.ledger.nodes[node].status is NodeStatus.DOWN
    task = state.ledger.tasks["1.0"]
    assert (task.state, task.attempt, task.history[0].state) == (TaskState.PENDING, 1, TaskState.LOST)
    assert state.handle(Tick(5.0)) == [] and state.ledger.tasks["1.0"].state is TaskState.PENDING
    state.handle(FromAgent(other, Heartbeat(usage={}), 13.0))
    commands = state.handle(Tick(13.6))
    assert any(isinstance(c, Send) and isinstance(c.frame, Launch) and c.node == other for c in commands)


def test_register_reconciles_the_agent_table() -> None:
    state = MasterState()
    register(state, "n1")
    submit(state, count=3, resources={"cpus": 0.5})
    state.handle(
        FromAgent(
            "n1",
            RunReports(reports=[report("1.0", TaskState.RUNNING), report("1.1", TaskState.RUNNING)]),
            1.0,
        )
    )
    # the agent comes back knowing 1.0 only, plus a stranger; 1.2 was never received
    commands = register(
        state, "n1", 2.0, [report("1.0", TaskState.RUNNING), report("9.0", TaskState.RUNNING)]
    )
    assert state.ledger.tasks["1.0"].state is TaskState.RUNNING
    assert state.ledger.tasks["1.1"].state is TaskState.LOST
    relaunch = [c.frame for c in commands if isinstance(c, Send) and isinstance(c.frame, Launch)]
    assert [r.run_id for r in relaunch[0].runs] == ["1.2.0"]
    assert Send("n1", Kill(run_ids=["9.0.0"])) in commands


def test_kill_pending_and_running_tasks() -> None:
    state = MasterState()
    register(state, "n1")
    submit(state, count=3, resources={"cpus": 1})  # 2 fit on the 2-cpu node, 1 pends
    commands = state.handle(KillJob(2, 1, 1.0))
    assert state.ledger.tasks["1.2"].state is TaskState.KILLED
    kills = [c.frame.run_ids for c in commands if isinstance(c, Send) and isinstance(c.frame, Kill)]
    assert sorted(kills) == [["1.0.0"], ["1.1.0"]]
    state.handle(FromAgent("n1", RunReports(reports=[report("1.0", TaskState.FAILED, exit_code=-15)]), 2.0))
    assert state.ledger.tasks["1.0"].state is TaskState.KILLED  # a requested kill is a kill, not a failure


def test_closed_connection_alone_does_not_take_a_node_down() -> None:
    state = MasterState(heartbeat_timeout=10)
    register(state, "n1")
    state.handle(AgentGone("n1", 1.0))
    state.handle(Tick(5.0))
    assert state.ledger.nodes["n1"].status is NodeStatus.UP


def test_restored_state_holds_the_same_allocations() -> None:
    state = MasterState()
    register(state, "n1")
    submit(state, count=2, resources={"cpus": 0.5, "mem": 100})
    ledger = state.ledger
    snapshot = Snapshot(
        list(ledger.jobs.values()), list(ledger.tasks.values()), list(ledger.nodes.values()), [], [], []
    )
    restored = MasterState(snapshot=snapshot, now=50.0)
    assert restored.ledger.allocated("n1") == state.ledger.allocated("n1")
    assert restored.ledger.nodes["n1"].last_seen == 50.0
    assert restored.ledger.next_job_id == 2


def test_an_illegal_transition_is_a_bug_not_a_silent_change() -> None:
    state = MasterState()
    register(state, "n1")
    submit(state, resources={"cpus": 1})
    state.handle(FromAgent("n1", RunReports(reports=[report("1.0", TaskState.FINISHED, exit_code=0)]), 1.0))
    with pytest.raises(ShoalError, match="illegal transition"):
        state.ledger.transition(state.ledger.tasks["1.0"], TaskState.RUNNING, 2.0)


def launched_env(commands: list) -> dict[str, dict[str, str]]:
    return {
        r.task_id: r.env
        for c in commands
        if isinstance(c, Send) and isinstance(c.frame, Launch)
        for r in c.frame.runs
    }


def test_gpu_devices_and_named_ports_are_handed_out_and_taken_back() -> None:
    state = MasterState()
    state.handle(FromAgent("g1", Register(node=sim_node("g1", cpus=8, gpus=4)), 0.0))
    _, commands = submit(state, count=2, resources={"cpus": 1, "gpus": 2}, ports=["http", "metrics"])
    env = launched_env(commands)
    assert {env["1.0"]["CUDA_VISIBLE_DEVICES"], env["1.1"]["CUDA_VISIBLE_DEVICES"]} == {"0,1", "2,3"}
    ports = {env[t][f"SHOAL_PORT_{p}"] for t in ("1.0", "1.1") for p in ("HTTP", "METRICS")}
    assert len(ports) == 4 and all(20000 <= int(p) <= 32000 for p in ports)
    state.handle(FromAgent("g1", RunReports(reports=[report("1.0", TaskState.FINISHED, exit_code=0)]), 1.0))
    freed = state.ledger.tasks["1.0"]
    commands = state.handle(Submit(2, "alice", JobSpec(command="x", resources={"cpus": 1, "gpus": 2}), 2.0))
    assert launched_env(commands)["2.0"]["CUDA_VISIBLE_DEVICES"] == env["1.0"]["CUDA_VISIBLE_DEVICES"]
    assert freed.gpus  # the finished task keeps the record of what it had


def test_a_resource_no_node_declares_is_refused_naming_it_and_never_widens_the_table() -> None:
    state = MasterState()
    state.handle(
        FromAgent("n1", Register(node=sim_node("n1").model_copy(update={"capacity": licensed})), 0.0)
    )
    commands = state.handle(
        Submit(1, "alice", JobSpec(command="x", resources={"custom": {"tokens": 1}}), 0.0)
    )
    [reply] = commands
    assert isinstance(reply.error, SpecError) and reply.error.status == 422
    assert reply.error.field == "resources.custom.tokens" and "tokens" in reply.error.reason
    assert state.ledger.table.dims == ["cpus", "mem", "disk", "gpus", "licenses"]
    assert state.ledger.jobs == {}
    job, _ = submit(state, resources={"cpus": 1, "custom": {"licenses": 2}})
    assert state.ledger.allocated("n1").custom == {"licenses": 2.0}
    too_many = state.handle(
        Submit(2, "alice", JobSpec(command="x", resources={"custom": {"licenses": 5}}), 0.0)
    )
    assert too_many[0].error.field == "resources" and "licenses" in too_many[0].error.reason


licensed = sim_node("n1").capacity.model_copy(update={"custom": {"licenses": 4.0}})


def test_finished_jobs_are_pruned_by_age_and_by_count_from_memory_and_the_store() -> None:
    from shoal.master.ledger import Retention
    from shoal.master.store.sqlite import SqliteStore

    store = SqliteStore(":memory:", fsync=False)
    state = MasterState(heartbeat_timeout=1e9, retention=Retention(age=60, count=2))

    def handle(*events) -> None:
        for command in state.handle(*events):
            if isinstance(command, Persist):
                store.apply(command)

    handle(FromAgent("n1", Register(node=sim_node("n1", cpus=8)), 0.0))
    jobs = []
    for i in range(4):
        handle(Submit(i, "alice", JobSpec(command="true", count=2, resources={"cpus": 1}), float(i)))
        jobs.append(max(state.ledger.jobs))
    running = jobs.pop()  # the last one never ends
    for i, job in enumerate(jobs):
        handle(FromAgent("n1", RunReports(reports=[report(f"{job}.0", TaskState.RUNNING)]), 10.0 + i))
        handle(FromAgent("n1", RunReports(reports=[report(f"{job}.1", TaskState.RUNNING)]), 10.0 + i))
        finish_events = [report(t, TaskState.FINISHED, exit_code=0) for t in (f"{job}.0", f"{job}.1")]
        handle(FromAgent("n1", RunReports(reports=finish_events), 20.0 + i))
    handle(Tick(30.0))  # three finished, two kept: the oldest goes
    assert sorted(state.ledger.jobs) == [jobs[1], jobs[2], running]
    assert sorted(j.id for j in store.load().jobs) == [jobs[1], jobs[2], running]
    assert {t.job_id for t in store.load().tasks} <= {jobs[1], jobs[2], running}
    assert f"{jobs[0]}.0" not in state.ledger.tasks
    handle(Tick(81.5))  # past the age of the one that ended at 21
    assert sorted(state.ledger.jobs) == [jobs[2], running]
    handle(Tick(200.0))
    assert sorted(state.ledger.jobs) == [running] == sorted(j.id for j in store.load().jobs)
    restarted = MasterState(snapshot=store.load(), now=200.0)
    assert sorted(restarted.ledger.jobs) == [running] and restarted.ledger.next_job_id == running + 1


def test_job_ids_are_never_given_twice_even_once_pruned_and_after_a_restart() -> None:
    from shoal.master.ledger import Retention
    from shoal.master.store.sqlite import SqliteStore

    store = SqliteStore(":memory:", fsync=False)
    state = MasterState(heartbeat_timeout=1e9, retention=Retention(age=0, count=0))

    def handle(*events) -> list:
        commands = state.handle(*events)
        for command in commands:
            if isinstance(command, Persist):
                store.apply(command)
        return commands

    handle(FromAgent("n1", Register(node=sim_node("n1")), 0.0))
    for i in (1, 2):
        handle(Submit(i, "alice", JobSpec(command="true"), 0.0))
        handle(FromAgent("n1", RunReports(reports=[report(f"{i}.0", TaskState.FINISHED, exit_code=0)]), 1.0))
    handle(Tick(2.0))
    assert state.ledger.jobs == {} and store.load().jobs == []  # the newest job is gone too
    state = MasterState(heartbeat_timeout=1e9, snapshot=store.load(), now=3.0)
    handle(FromAgent("n1", Register(node=sim_node("n1")), 3.0))
    [reply] = [c for c in handle(Submit(3, "alice", JobSpec(command="true"), 3.0)) if isinstance(c, Reply)]
    assert reply.value == 3


def test_a_restart_keeps_working_when_no_node_declares_a_resource_a_stored_job_asks_for() -> None:
    node = sim_node("n1").model_copy(update={"capacity": licensed})
    state = MasterState()
    state.handle(FromAgent("n1", Register(node=node), 0.0))
    job, _ = submit(state, count=2, resources={"cpus": 1, "custom": {"licenses": 4}})
    ledger = state.ledger
    snapshot = Snapshot(list(ledger.jobs.values()), list(ledger.tasks.values()), [], [], [], [])
    restarted = MasterState(snapshot=snapshot, now=10.0)  # its nodes are not back yet
    restarted.handle(FromAgent("n2", Register(node=sim_node("n2")), 10.0))
    restarted.handle(Tick(11.0))
    tasks = restarted.ledger.tasks_of(job)
    assert [t.state for t in tasks] == [TaskState.ASSIGNED, TaskState.PENDING]
    assert restarted.why_waiting(job) == "1 node lacks free licenses"


def test_killing_a_job_that_is_gone_is_a_404_and_disturbs_nothing() -> None:
    state = MasterState()
    register(state, "n1")
    [reply] = state.handle(KillJob(7, 99, 0.0))
    assert reply.error is not None and "no job 99" in str(reply.error)
