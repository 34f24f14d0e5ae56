"""Rebalancing and drains in the master's state machine, event by event."""

from __future__ import annotations

from shoal.checks import TASK_CHECK, CheckResult, CheckStatus
from shoal.core.rebalance import RebalancePolicy
from shoal.master.events import Drain, FromAgent, Persist, RebalanceNow, Reply, Send, Submit, Tick
from shoal.master.moves import Rebalancing
from shoal.master.state import MasterState
from shoal.model import JobSpec, RunUsage, TaskRecord, TaskState, Usage
from shoal.testing.sim import sim_node
from shoal.wire import Heartbeat, Kill, Launch, Register, RunReport, RunReports


class Harness:
    def __init__(self, nodes: int = 3, **rebalancing) -> None:
        self.state = MasterState(rebalancing=Rebalancing(**rebalancing))
        self.now = 0.0
        self.sent: list[Send] = []
        for i in range(1, nodes + 1):
            self.handle(FromAgent(f"n{i}", Register(node=sim_node(f"n{i}", cpus=4)), self.now))

    def handle(self, *events) -> list[Reply]:
        replies = []
        for c in self.state.handle(*events):
            if isinstance(c, Send):
                self.sent.append(c)
            elif isinstance(c, Reply):
                replies.append(c)
        return replies

    def request(self, event):
        [reply] = self.handle(event)
        assert reply.error is None, reply.error
        return reply.value

    def run_all(self) -> None:
        """Agents report every assigned task running."""
        for task in list(self.state.ledger.tasks.values()):
            if task.state is TaskState.ASSIGNED:
                self.report(task.node, task.id, task.attempt, TaskState.RUNNING)

    def report(self, node: str, task_id: str, attempt: int, state: TaskState) -> None:
        run = RunReport(run_id=f"{task_id}.{attempt}", task_id=task_id, attempt=attempt, state=state)
        self.handle(FromAgent(node, RunReports(reports=[run]), self.now))

    def heartbeats(self, busy: float = 1.0) -> None:
        """Every node reports its tasks using `busy` cores each, CPU summed over its cpus."""
        self.now += 1
        for name in self.state.ledger.nodes:
            runs = {
                t.run_id: RunUsage(cpu_seconds=busy * self.now, rss=64)
                for t in self.state.ledger.tasks.values()
                if t.node == name and t.state is TaskState.RUNNING
            }
            usage = Usage(cpu_percent=min(100.0, 100 * busy * len(runs) / 4), runs=runs)
            self.handle(FromAgent(name, Heartbeat(usage=usage), self.now))

    def killed(self) -> set[str]:
        return {r for s in self.sent if isinstance(s.frame, Kill) for r in s.frame.run_ids}

    def launched_on(self, node: str) -> list[str]:
        return [
            r.task_id
            for s in self.sent
            if s.node == node and isinstance(s.frame, Launch)
            for r in s.frame.runs
        ]


def only_n1(h: Harness, *specs: JobSpec) -> list[int]:
    """Jobs started while n2 and n3 take no work: all on n1."""
    for name in ("n2", "n3"):
        h.state.ledger.table.set_schedulable(name, False)
    jobs = [h.request(Submit(i, "alice", spec, h.now)) for i, spec in enumerate(specs, start=100)]
    for name in ("n2", "n3"):
        h.state.ledger.table.set_schedulable(name, True)
    h.run_all()
    return jobs


def test_migrations_restart_on_the_target_and_are_events_with_a_duration() -> None:
    h = Harness(policy=RebalancePolicy(cooldown=0))
    [job] = only_n1(h, JobSpec(command="spin", count=3, resources={"cpus": 1}))
    for _ in range(8):
        h.heartbeats()
    assert h.state.ledger.nodes["n1"].load > 60 and h.state.ledger.nodes["n2"].load == 0
    started = h.request(RebalanceNow(2, h.now))
    assert len(started) == 2 and {m.target for m in started} == {"n2", "n3"}
    for m in started:
        assert f"{m.task_id}.0" in h.killed()
        h.report("n1", m.task_id, 0, TaskState.KILLED)
        task = h.state.ledger.tasks[m.task_id]
        assert task.history[-1].state is TaskState.MIGRATED
        assert task.state is TaskState.ASSIGNED and task.node == m.target and task.attempt == 1
        assert m.task_id in h.launched_on(m.target)
    h.now += 2
    h.run_all()
    events = sorted(h.state.ledger.migrations.values(), key=lambda m: m.id)
    assert all(e.running_at == h.now and e.duration == 2 and e.node == e.target for e in events)
    # Moved tasks wait out their cooldown; the job itself never failed.
    assert all(t.state is TaskState.RUNNING for t in h.state.ledger.tasks_of(job))


def test_drain_moves_everything_that_may_move_and_the_rest_at_the_deadline() -> None:
    h = Harness()
    pinned, movable = only_n1(
        h,
        JobSpec(command="b", resources={"cpus": 1}, migrate="never"),
        JobSpec(command="c", resources={"cpus": 1}),
    )
    moved = h.request(Drain(4, "n1", True, h.now, deadline=30))
    assert [m.task_id for m in moved] == [f"{movable}.0"]
    h.report("n1", f"{movable}.0", 0, TaskState.KILLED)
    task = h.state.ledger.tasks_of(movable)[0]
    assert task.state is TaskState.ASSIGNED and task.node != "n1"  # the scheduler placed it elsewhere
    assert f"{pinned}.0.0" not in h.killed()
    for _ in range(31):
        h.heartbeats()
        h.handle(Tick(h.now))
    assert f"{pinned}.0.0" in h.killed()  # the deadline moves even what never migrates
    # A drained node takes no new work until undrained.
    late = h.request(
        Submit(5, "alice", JobSpec(command="d", resources={"cpus": 1}), h.now, frozenset({"n1"}))
    )
    assert h.state.ledger.tasks_of(late)[0].state is TaskState.PENDING
    h.request(Drain(6, "n1", False, h.now))
    assert h.state.ledger.tasks_of(late)[0].state is TaskState.ASSIGNED


def test_draining_an_unknown_node_is_a_404() -> None:
    h = Harness()
    [reply] = h.handle(Drain(1, "ghost", True, h.now))
    assert reply.error is not None and "ghost" in str(reply.error)


SERVICE = JobSpec(
    command="serve",
    resources={"cpus": 1},
    ports=["web"],
    migrate="make-before-break",
    health={"http": "web/"},
)


def test_make_before_break_starts_the_new_copy_and_stops_the_old_only_once_it_serves() -> None:
    h = Harness(policy=RebalancePolicy(cooldown=0))
    [job] = only_n1(h, SERVICE)
    task = h.state.ledger.tasks_of(job)[0]
    old_port = task.ports["web"]
    [move] = h.request(Drain(7, "n1", True, h.now))
    copy = task.successor
    assert copy is not None and copy.node != "n1" and copy.attempt == 1
    [launch] = [
        r for s in h.sent if s.node == copy.node and isinstance(s.frame, Launch) for r in s.frame.runs
    ]
    assert launch.run_id == f"{task.id}.1" and launch.checks
    assert launch.env["SHOAL_PORT_WEB"] == str(copy.ports["web"])
    assert f"{task.id}.0" not in h.killed()  # the old copy serves on meanwhile
    # Running but not serving yet: nothing changes.
    h.handle(FromAgent(copy.node, RunReports(reports=[_run(task.id, 1, healthy=False)]), h.now))
    assert task.node == "n1" and task.ports["web"] == old_port
    h.now += 3
    h.handle(FromAgent(copy.node, RunReports(reports=[_run(task.id, 1, healthy=True)]), h.now))
    assert task.node == copy.node and task.attempt == 1 and task.successor is None
    assert task.history[-1].state is TaskState.MIGRATED and task.state is TaskState.RUNNING
    assert f"{task.id}.0" in h.killed()  # asked to stop at once: its agent waits out the delay
    assert launch.shutdown_delay == 3.0  # the default for jobs clients follow to their new copy
    event = h.state.ledger.migrations[move.id]
    assert event.duration == 3 and event.node == copy.node
    # The table holds the task once, on its new node.
    assert h.state.ledger.allocated("n1").cpus == 0 and h.state.ledger.allocated(copy.node).cpus == 1


def test_what_a_new_copys_checks_say_is_kept_as_the_tasks_other_changes_are() -> None:
    """A master that restarts while the new copy starts knows what its checks last said."""
    h = Harness(policy=RebalancePolicy(cooldown=0))
    [job] = only_n1(h, SERVICE)
    task = h.state.ledger.tasks_of(job)[0]
    h.request(Drain(7, "n1", True, h.now))
    copy = task.successor
    assert copy is not None
    report = FromAgent(copy.node, RunReports(reports=[_run(task.id, 1, healthy=False)]), h.now)
    kept = [t for c in h.state.handle(report) if isinstance(c, Persist) for t in c.tasks if t.id == task.id]
    assert kept and kept[-1].successor is not None
    assert kept[-1].successor.checks[TASK_CHECK].status is CheckStatus.CRITICAL


def test_a_new_copy_that_never_serves_is_given_up_and_the_task_stays() -> None:
    h = Harness(policy=RebalancePolicy(cooldown=0))
    [job] = only_n1(h, SERVICE)
    task = h.state.ledger.tasks_of(job)[0]
    [move] = h.request(Drain(7, "n1", True, h.now))
    copy = task.successor
    assert copy is not None
    h.handle(FromAgent(copy.node, RunReports(reports=[_run(task.id, 1, healthy=False)]), h.now))
    for _ in range(61):
        h.heartbeats()
        h.handle(Tick(h.now))
    assert task.successor is None and task.node == "n1" and task.state is TaskState.RUNNING
    assert f"{task.id}.1" in h.killed() and f"{task.id}.0" not in h.killed()
    assert "did not serve" in h.state.ledger.migrations[move.id].failed
    assert h.state.ledger.allocated(copy.node).cpus == 0


def _run(task_id: str, attempt: int, healthy: bool) -> RunReport:
    return RunReport(
        run_id=f"{task_id}.{attempt}",
        task_id=task_id,
        attempt=attempt,
        state=TaskState.RUNNING,
        checks={TASK_CHECK: CheckResult(CheckStatus.PASSING if healthy else CheckStatus.CRITICAL)},
    )


def test_a_new_copy_that_dies_is_given_up_at_once() -> None:
    h = Harness()
    [job] = only_n1(h, SERVICE)
    task = h.state.ledger.tasks_of(job)[0]
    [move] = h.request(Drain(7, "n1", True, h.now))
    copy = task.successor
    assert copy is not None
    ended = RunReport(
        run_id=f"{task.id}.1",
        task_id=task.id,
        attempt=1,
        state=TaskState.FAILED,
        message="exited with status 3",
    )
    h.handle(FromAgent(copy.node, RunReports(reports=[ended]), h.now))
    assert task.successor is None and task.node == "n1" and task.state is TaskState.RUNNING
    assert "exited with status 3" in h.state.ledger.migrations[move.id].failed


def labelled(h: Harness, name: str, **labels: str) -> None:
    info = sim_node(name, cpus=4).model_copy(update={"labels": labels})
    h.handle(FromAgent(name, Register(node=info), h.now))


def test_a_drained_service_moves_only_to_a_node_its_constraints_allow() -> None:
    h = Harness(nodes=0, policy=RebalancePolicy(cooldown=0))
    labelled(h, "n1", rack="r1")
    labelled(h, "n2", rack="r2")  # roomier than n3, but outside the job's constraint
    labelled(h, "n3", rack="r1")
    h.state.ledger.table.set_schedulable("n3", False)
    [job] = [h.request(Submit(1, "alice", SERVICE.model_copy(update={"constraints": ["rack == r1"]}), h.now))]
    h.state.ledger.table.set_schedulable("n3", True)
    h.run_all()
    h.request(
        Submit(2, "bob", JobSpec(command="x", resources={"cpus": 3}, nodes="n3"), h.now, frozenset({"n3"}))
    )
    task = h.state.ledger.tasks_of(job)[0]
    assert task.node == "n1"
    [move] = h.request(Drain(3, "n1", True, h.now))
    assert task.successor is not None and task.successor.node == "n3" and move.target == "n3"


def pinned_service() -> tuple[Harness, TaskRecord]:
    """A service that may run on rack r1 only, running on n1, the one node of r1."""
    h = Harness(nodes=0, policy=RebalancePolicy(cooldown=0))
    labelled(h, "n1", rack="r1")
    labelled(h, "n2", rack="r2")
    service = SERVICE.model_copy(update={"constraints": ["rack == r1"]})
    job = h.request(Submit(1, "alice", service, h.now))
    h.run_all()
    return h, h.state.ledger.tasks_of(job)[0]


def test_a_drained_service_with_no_allowed_target_serves_on_until_room_or_the_deadline() -> None:
    h, task = pinned_service()
    assert h.request(Drain(2, "n1", True, h.now, deadline=10)) == []  # nowhere to go yet
    h.now += 1
    h.handle(Tick(h.now))
    assert task.successor is None and f"{task.id}.0" not in h.killed()  # it serves on
    labelled(h, "n3", rack="r1")  # room where it may go: the drain moves it there
    h.now += 1
    h.handle(Tick(h.now))
    assert task.successor is not None and task.successor.node == "n3"


def test_a_drained_service_with_nowhere_to_go_is_stopped_at_the_deadline() -> None:
    h, task = pinned_service()
    h.request(Drain(2, "n1", True, h.now, deadline=5))
    for _ in range(6):
        h.now += 1
        h.handle(Tick(h.now))
    assert task.migrating == "" and f"{task.id}.0" in h.killed()
    [move] = h.state.ledger.migrations.values()
    assert move.reason == "drain deadline"


def test_a_move_never_targets_a_node_without_free_ports() -> None:
    h = Harness(nodes=0, policy=RebalancePolicy(cooldown=0))
    for name in ("n1", "n2"):
        info = sim_node(name, cpus=4).model_copy(update={"port_range": (20000, 20000)})
        h.handle(FromAgent(name, Register(node=info), h.now))
    [first, second] = [h.request(Submit(i, "alice", SERVICE, h.now)) for i in (1, 2)]
    h.run_all()
    nodes = {h.state.ledger.tasks_of(j)[0].node for j in (first, second)}
    assert nodes == {"n1", "n2"}  # one port each: both nodes are out of ports
    assert h.request(Drain(3, "n1", True, h.now)) == []
    assert all(h.state.ledger.tasks_of(j)[0].successor is None for j in (first, second))
    assert not h.killed()  # nothing stopped for a move that cannot happen


def on(h: Harness, nodes: set[str], spec: JobSpec) -> int:
    """A job placed while only `nodes` take work (it may move anywhere later)."""
    others = [name for name in h.state.ledger.nodes if name not in nodes]
    for name in others:
        h.state.ledger.table.set_schedulable(name, False)
    job = h.request(Submit(len(h.sent) + 100, "alice", spec, h.now))
    for name in others:
        h.state.ledger.table.set_schedulable(name, True)
    return job


def test_rebalancing_keeps_a_job_within_max_per_node() -> None:
    """The coolest node already runs the job's other task: the busiest task stays, and the
    round relieves the hot node with others'."""
    h = Harness(nodes=3, policy=RebalancePolicy(cooldown=0, threshold=0.05))
    pair = JobSpec(command="a", count=2, resources={"cpus": 1}, max_per_node=1)
    light = JobSpec(command="b", count=2, resources={"cpus": 0.5})
    jobs = [on(h, {"n1", "n2"}, pair), on(h, {"n1"}, light), on(h, {"n3"}, light)]
    h.run_all()
    tasks = {t.id: t for job in jobs for t in h.state.ledger.tasks_of(job)}
    [busy] = [t for t in h.state.ledger.tasks_of(jobs[0]) if t.node == "n1"]
    rate = {busy.id: 0.8, f"{jobs[1]}.0": 0.2, f"{jobs[1]}.1": 0.2, f"{jobs[2]}.0": 0.5, f"{jobs[2]}.1": 0.5}
    for _ in range(4):
        h.now += 1
        for name in ("n1", "n2", "n3"):
            mine = [t for t in tasks.values() if t.node == name]
            runs = {t.run_id: RunUsage(cpu_seconds=rate.get(t.id, 0.0) * h.now) for t in mine}
            percent = 100 * sum(rate.get(t.id, 0.0) for t in mine) / 4
            h.handle(FromAgent(name, Heartbeat(usage=Usage(cpu_percent=percent, runs=runs)), h.now))
    moves = h.request(RebalanceNow(4, h.now))
    assert moves and all(m.task_id != busy.id for m in moves), moves
    assert all(m.target == "n2" for m in moves)


def test_a_task_that_ends_while_moving_closes_its_migration() -> None:
    h = Harness()
    [job] = only_n1(h, JobSpec(command="c", resources={"cpus": 1}))
    [move] = h.request(Drain(4, "n1", True, h.now))
    h.report("n1", f"{job}.0", 0, TaskState.FINISHED)  # it ended on its own before the stop
    record = h.state.ledger.migrations[move.id]
    assert record.failed == "the task ended (finished) before it moved" and record.running_at is None
    assert h.state.ledger.tasks_of(job)[0].state is TaskState.FINISHED
