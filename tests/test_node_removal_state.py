"""A removed node leaves the listings but not the ledger: its record is kept, marked removed
(and stored so), its tasks are lost and placed elsewhere as for any lost node, a second
removal finds no node, and a registration under its name, after it joined again, brings it
back. The master's state machine, event by event, and a master started from what it stored."""

from __future__ import annotations

from shoal.errors import NotFound
from shoal.master.events import Command, FromAgent, Persist, RemoveNode, Reply, Send, Submit, Tick
from shoal.master.state import MasterState
from shoal.master.store import Snapshot
from shoal.model import JobSpec, NodeRecord, NodeStatus, TaskState
from shoal.testing.sim import sim_node
from shoal.wire import Launch, Register, RunReport, RunReports


def register(state: MasterState, name: str, now: float) -> list[Command]:
    return state.handle(FromAgent(name, Register(node=sim_node(name, cpus=1)), now))


def running_on_n1() -> MasterState:
    """n1 and n2 up, a task running on n1 (the only node when it was placed) that may run
    once more."""
    state = MasterState()
    register(state, "n1", 0.0)
    state.handle(Submit(1, "alice", JobSpec(command="true", restart={"attempts": 1, "delay": 0}), 0.0))
    register(state, "n2", 0.0)
    report = RunReport(run_id="1.0.0", task_id="1.0", attempt=0, state=TaskState.RUNNING)
    state.handle(FromAgent("n1", RunReports(reports=[report]), 1.0))
    assert state.ledger.tasks["1.0"].node == "n1"
    return state


def stored_nodes(commands: list[Command]) -> dict[str, NodeRecord]:
    persisted = [c for c in commands if isinstance(c, Persist)]
    return {n.name: n for p in persisted for n in p.nodes}


def launched_on(commands: list[Command]) -> list[str]:
    return [c.node for c in commands if isinstance(c, Send) and isinstance(c.frame, Launch)]


def test_a_removed_node_is_kept_marked_and_its_task_runs_elsewhere() -> None:
    state = running_on_n1()
    commands = state.handle(RemoveNode(7, "n1", 5.0))
    assert Reply(7, ["1.0"]) in commands
    n1 = state.ledger.nodes["n1"]
    assert n1.removed == 5.0 and n1.status is NodeStatus.DOWN
    assert stored_nodes(commands)["n1"].removed == 5.0  # a master started afresh knows it too
    task = state.ledger.tasks["1.0"]
    assert task.history[-1].state is TaskState.LOST and task.history[-1].node == "n1"
    assert task.state is TaskState.ASSIGNED and task.node == "n2" and launched_on(commands) == ["n2"]
    [again] = [c for c in state.handle(RemoveNode(8, "n1", 6.0)) if isinstance(c, Reply)]
    assert isinstance(again.error, NotFound) and "no node n1" in str(again.error)


def test_a_node_down_already_is_removed_too() -> None:
    state = running_on_n1()
    state.handle(Tick(state.heartbeat_timeout + 2.0))  # n1 and n2 are silent: both lost
    assert state.ledger.nodes["n1"].status is NodeStatus.DOWN
    commands = state.handle(RemoveNode(7, "n1", 20.0))
    assert Reply(7, []) in commands and state.ledger.nodes["n1"].removed == 20.0


def test_a_removed_node_that_registers_again_is_back() -> None:
    state = running_on_n1()
    state.handle(RemoveNode(7, "n1", 5.0))
    commands = register(state, "n1", 6.0)
    n1 = state.ledger.nodes["n1"]
    assert n1.removed is None and n1.status is NodeStatus.UP
    assert stored_nodes(commands)["n1"].removed is None
    only_n1 = Submit(8, "alice", JobSpec(command="true", nodes="n1"), 7.0, frozenset({"n1"}))
    assert launched_on(state.handle(only_n1)) == ["n1"]  # it takes work again


def test_a_master_started_from_its_store_keeps_the_node_removed_until_it_registers() -> None:
    state = running_on_n1()
    state.handle(RemoveNode(7, "n1", 5.0))
    snapshot = Snapshot(
        jobs=list(state.ledger.jobs.values()),
        tasks=list(state.ledger.tasks.values()),
        nodes=[node.model_copy(deep=True) for node in state.ledger.nodes.values()],
        frameworks=[],
        updates=[],
        migrations=[],
    )
    started = MasterState(snapshot=snapshot, now=10.0)
    assert started.ledger.nodes["n1"].removed == 5.0
    assert not started.ledger.table.schedulable[started.ledger.table.index["n1"]]
    [missing] = [c for c in started.handle(RemoveNode(8, "n1", 11.0)) if isinstance(c, Reply)]
    assert isinstance(missing.error, NotFound)
    register(started, "n1", 12.0)
    assert started.ledger.nodes["n1"].removed is None
    assert started.ledger.table.schedulable[started.ledger.table.index["n1"]]
