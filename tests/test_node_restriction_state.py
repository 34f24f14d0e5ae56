"""A node speaks for its own runs only, and removing a node puts it out as a lost one: the
master's state machine, event by event."""

from __future__ import annotations

from shoal.errors import NotFound
from shoal.master.events import Disconnect, FromAgent, RemoveNode, Reply, Send, Submit
from shoal.master.state import MasterState
from shoal.model import JobSpec, NodeStatus, TaskState
from shoal.testing.sim import sim_node
from shoal.wire import Kill, Register, RunReport, RunReports


def running_on_n1() -> MasterState:
    state = MasterState()
    state.handle(FromAgent("n1", Register(node=sim_node("n1", cpus=2)), 0.0))
    state.handle(Submit(1, "alice", JobSpec(command="true", nodes="n1", restart={"attempts": 1}), 0.0))
    state.handle(FromAgent("n2", Register(node=sim_node("n2", cpus=2)), 0.0))
    state.handle(FromAgent("n1", RunReports(reports=[report(TaskState.RUNNING)]), 1.0))
    assert state.ledger.tasks["1.0"].state is TaskState.RUNNING
    return state


def report(state: TaskState) -> RunReport:
    return RunReport(run_id="1.0.0", task_id="1.0", attempt=0, state=state, exit_code=0)


def test_another_nodes_report_of_a_run_changes_nothing() -> None:
    state = running_on_n1()
    for said in (TaskState.FINISHED, TaskState.FAILED, TaskState.KILLED):
        state.handle(FromAgent("n2", RunReports(reports=[report(said)]), 2.0))
    task = state.ledger.tasks["1.0"]
    assert task.state is TaskState.RUNNING and task.node == "n1" and task.attempt == 0
    # Claiming it runs there: n2 is told to stop a run it has no business running; n1 is untouched.
    commands = state.handle(FromAgent("n2", RunReports(reports=[report(TaskState.RUNNING)]), 3.0))
    assert Send("n2", Kill(run_ids=["1.0.0"])) in commands
    assert not any(isinstance(c, Send) and c.node == "n1" for c in commands)


def test_a_removed_node_is_lost_and_its_agent_put_out() -> None:
    state = running_on_n1()
    commands = state.handle(RemoveNode(7, "n1", 5.0))
    assert Reply(7, ["1.0"]) in commands
    [parting] = [c for c in commands if isinstance(c, Disconnect)]
    assert parting.node == "n1" and "n1 was removed from the cluster" in parting.reason
    assert state.ledger.nodes["n1"].status is NodeStatus.DOWN
    task = state.ledger.tasks["1.0"]
    assert task.history[-1].state is TaskState.LOST and task.attempt == 1  # its restart policy holds
    assert task.history[-1].message == "n1 was removed from the cluster"
    [missing] = [c for c in state.handle(RemoveNode(8, "n9", 6.0)) if isinstance(c, Reply)]
    assert isinstance(missing.error, NotFound)
