"""Frameworks in the master's state machine, event by event: offers, calls, updates, failover."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shoal.core.scheduler import Policy, QueuePolicy
from shoal.errors import Forbidden, NotFound, SpecError
from shoal.framework import protocol as p
from shoal.master.events import (
    CloseStream,
    FrameworkCall,
    FromAgent,
    KillJob,
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
from shoal.master.state import MasterState
from shoal.master.store import Snapshot
from shoal.model import JobSpec, TaskState
from shoal.testing.sim import sim_node
from shoal.wire import Heartbeat, Kill, Launch, Register, RunReport, RunReports, Usage

ADMIN = Principal("ops", admin=True)
POLICY = Policy(queues={"default": QueuePolicy(), "heavy": QueuePolicy(weight=2)})


class Harness:
    """A ledger with nodes, and what it told each framework stream."""

    def __init__(self, nodes: int = 2, cpus: float = 4, **policy: float) -> None:
        self.state = MasterState(policy=POLICY, framework_policy=FrameworkPolicy(**policy))
        self.now = 0.0
        self.requests = 0
        self.streams: dict[int, list[p.Told]] = {}
        self.closed: set[int] = set()
        self.stored: list[Persist] = []
        self.sent: list[Send] = []
        for i in range(nodes):
            self.handle(FromAgent(f"n{i}", Register(node=sim_node(f"n{i}", cpus=cpus)), self.now))

    def handle(self, *events) -> list[Reply]:
        replies = []
        for command in self.state.handle(*events):
            match command:
                case Persist():
                    self.stored.append(command)
                case ToFramework(connection=c, event=event):
                    # Through the real encoding, as a framework reads it.
                    self.streams[c].append(p.EVENT.validate_json(self.state.frameworks.encode(event)))
                case CloseStream(connection=c):
                    self.closed.add(c)
                case Send():
                    self.sent.append(command)
                case Reply():
                    replies.append(command)
        return replies

    def subscribe(self, name: str = "fw", principal: Principal = ADMIN, **body) -> tuple[str, int]:
        self.requests += 1
        connection = 1000 + self.requests
        self.streams[connection] = []
        [reply] = self.handle(
            SubscribeFramework(self.requests, principal, p.Subscribe(name=name, **body), connection, self.now)
        )
        if reply.error is not None:
            raise reply.error
        return reply.value, connection

    def call(self, framework: str, call, principal: Principal = ADMIN):
        self.requests += 1
        [reply] = self.handle(FrameworkCall(self.requests, principal, framework, call, self.now))
        if reply.error is not None:
            raise reply.error
        return reply.value

    def offers(self, connection: int) -> list[p.OfferInfo]:
        return [o for e in self.streams[connection] if isinstance(e, p.Offers) for o in e.offers]

    def events(self, connection: int, kind: type) -> list:
        return [e for e in self.streams[connection] if isinstance(e, kind)]

    def report(self, node: str, task_id: str, state: TaskState, exit_code: int | None = None) -> None:
        run = RunReport(run_id=f"{task_id}.0", task_id=task_id, attempt=0, state=state, exit_code=exit_code)
        self.handle(FromAgent(node, RunReports(reports=[run]), self.now))

    def tick(self, seconds: float) -> None:
        self.now += seconds
        for name in self.state.ledger.nodes:
            self.handle(FromAgent(name, Heartbeat(usage=Usage()), self.now))
        self.handle(Tick(self.now))


def task(name: str, cpus: float = 1, mem: int = 256) -> p.TaskLaunch:
    return p.TaskLaunch(name=name, command="sleep 100", resources={"cpus": cpus, "mem": mem})


def test_a_subscriber_is_told_its_id_then_offered_every_node() -> None:
    h = Harness(nodes=2)
    framework, stream = h.subscribe()
    assert isinstance(h.streams[stream][0], p.Subscribed) and h.streams[stream][0].framework_id == framework
    offers = h.offers(stream)
    assert sorted(o.node for o in offers) == ["n0", "n1"]
    assert all(o.resources.cpus == 4 and o.resources.mem == 8192 for o in offers)


def test_accept_launches_on_the_offered_node_and_returns_the_rest() -> None:
    h = Harness(nodes=1)
    framework, stream = h.subscribe()
    [offer] = h.offers(stream)
    jobs = h.call(framework, p.Accept(offer_ids=[offer.id], tasks=[task("a"), task("b")])).jobs
    assert set(jobs) == {"a", "b"}
    [launch] = [s for s in h.sent if isinstance(s.frame, Launch)]
    assert launch.node == "n0" and len(launch.frame.runs) == 2
    job = h.state.ledger.jobs[jobs["a"]]
    assert job.framework == framework and job.spec.queue == "default" and job.owner == "ops"
    # What the tasks left (2 cpus) is offered again at once.
    again = h.offers(stream)[-1]
    assert again.id != offer.id and again.resources.cpus == 2


def test_status_updates_are_delivered_until_acknowledged() -> None:
    h = Harness(nodes=1, retry=10)
    framework, stream = h.subscribe()
    [offer] = h.offers(stream)
    jobs = h.call(framework, p.Accept(offer_ids=[offer.id], tasks=[task("a")])).jobs
    h.report("n0", f"{jobs['a']}.0", TaskState.RUNNING)
    h.report("n0", f"{jobs['a']}.0", TaskState.FINISHED, exit_code=0)
    updates = [e.status for e in h.events(stream, p.Update)]
    assert [(u.task, u.state) for u in updates] == [("a", TaskState.RUNNING), ("a", TaskState.FINISHED)]
    assert all(u.uuid for u in updates)
    h.call(framework, p.Acknowledge(uuids=[updates[0].uuid]))
    h.tick(11)
    again = [e.status for e in h.events(stream, p.Update)][2:]
    assert [u.state for u in again] == [TaskState.FINISHED]  # only the one not acknowledged
    assert any(updates[0].uuid in c.acked for c in h.stored)


@pytest.mark.parametrize(
    ("make", "error", "field"),
    [
        (lambda o: p.Accept(offer_ids=["nope"], tasks=[task("a")]), SpecError, "offer_ids"),
        (lambda o: p.Accept(offer_ids=[o[0].id, o[1].id], tasks=[task("a")]), SpecError, "offer_ids"),
        (lambda o: p.Accept(offer_ids=[o[0].id], tasks=[task("a", cpus=5)]), SpecError, "tasks"),
        (lambda o: p.Accept(offer_ids=[o[0].id, o[0].id], tasks=[task("a")]), SpecError, "offer_ids"),
    ],
)
def test_a_bad_accept_is_refused_and_changes_nothing(make, error, field) -> None:
    h = Harness(nodes=2)
    framework, stream = h.subscribe()
    offers = sorted(h.offers(stream), key=lambda o: o.node)
    with pytest.raises(error) as refused:
        h.call(framework, make(offers))
    assert refused.value.field == field
    assert not [s for s in h.sent if isinstance(s.frame, Launch)]
    # The offers stand: a good accept still works.
    h.call(framework, p.Accept(offer_ids=[offers[0].id], tasks=[task("a")]))


def test_an_offer_accepted_once_cannot_be_accepted_again() -> None:
    h = Harness(nodes=1)
    framework, stream = h.subscribe()
    [offer] = h.offers(stream)
    h.call(framework, p.Accept(offer_ids=[offer.id], tasks=[task("a")]))
    with pytest.raises(SpecError) as refused:
        h.call(framework, p.Accept(offer_ids=[offer.id], tasks=[task("b")]))
    assert refused.value.status == 409


def test_a_live_task_name_cannot_be_reused() -> None:
    h = Harness(nodes=1)
    framework, stream = h.subscribe()
    [offer] = h.offers(stream)
    h.call(framework, p.Accept(offer_ids=[offer.id], tasks=[task("a")]))
    rest = h.offers(stream)[-1]
    with pytest.raises(SpecError, match="still live"):
        h.call(framework, p.Accept(offer_ids=[rest.id], tasks=[task("a")]))


def test_another_frameworks_offer_is_unknown_to_a_framework() -> None:
    h = Harness(nodes=2)
    first, stream = h.subscribe("one")
    second, _ = h.subscribe("two")
    mine = h.offers(stream)[0]
    with pytest.raises(SpecError) as refused:
        h.call(second, p.Accept(offer_ids=[mine.id], tasks=[task("a")]))
    assert refused.value.status == 409


def test_declined_nodes_go_to_others_and_come_back_after_the_filter() -> None:
    h = Harness(nodes=1)
    framework, stream = h.subscribe()
    [offer] = h.offers(stream)
    h.call(framework, p.Decline(offer_ids=[offer.id], refuse_seconds=5))
    other, other_stream = h.subscribe("other")
    assert [o.node for o in h.offers(other_stream)] == ["n0"]
    h.call(other, p.Decline(offer_ids=[h.offers(other_stream)[0].id], refuse_seconds=60))
    assert len(h.offers(stream)) == 1
    h.tick(6)
    assert len(h.offers(stream)) == 2


def test_suppress_rescinds_and_stops_offers_until_revive() -> None:
    h = Harness(nodes=1)
    framework, stream = h.subscribe()
    [offer] = h.offers(stream)
    h.call(framework, p.Suppress())
    assert [e.offer_id for e in h.events(stream, p.Rescind)] == [offer.id]
    h.tick(1)
    assert len(h.offers(stream)) == 1
    h.call(framework, p.Revive())
    assert len(h.offers(stream)) == 2


def test_offers_expire() -> None:
    h = Harness(nodes=1, offer_timeout=3)
    framework, stream = h.subscribe()
    [offer] = h.offers(stream)
    h.tick(2)
    assert h.events(stream, p.Rescind) == []  # still good before its timeout
    h.tick(2)
    assert [e.offer_id for e in h.events(stream, p.Rescind)] == [offer.id]
    assert len(h.offers(stream)) == 2  # offered anew
    with pytest.raises(SpecError) as refused:
        h.call(framework, p.Accept(offer_ids=[offer.id], tasks=[task("late")]))
    assert refused.value.status == 409 and refused.value.field == "offer_ids"


def test_tasks_outlive_a_disconnect_within_the_failover_timeout_only() -> None:
    h = Harness(nodes=1)
    framework, stream = h.subscribe(failover_timeout=10)
    [offer] = h.offers(stream)
    jobs = h.call(framework, p.Accept(offer_ids=[offer.id], tasks=[task("a")])).jobs
    task_id = f"{jobs['a']}.0"
    h.report("n0", task_id, TaskState.RUNNING)
    h.handle(StreamClosed(stream, h.now))
    h.tick(5)
    assert not [s for s in h.sent if isinstance(s.frame, Kill)]
    again, stream2 = h.subscribe(framework_id=framework, failover_timeout=10)
    assert again == framework
    h.handle(StreamClosed(stream2, h.now))
    h.tick(9)
    assert not [s for s in h.sent if isinstance(s.frame, Kill)]
    h.tick(2)
    assert [s.frame.run_ids for s in h.sent if isinstance(s.frame, Kill)] == [[f"{task_id}.0"]]
    with pytest.raises(SpecError) as gone:
        h.subscribe(framework_id=framework)
    assert gone.value.status == 404


def test_a_newer_subscription_replaces_the_stream() -> None:
    h = Harness(nodes=1)
    framework, stream = h.subscribe()
    h.subscribe(framework_id=framework)
    assert stream in h.closed and isinstance(h.streams[stream][-1], p.Error)


def test_a_lost_node_is_a_failure_then_lost_updates() -> None:
    h = Harness(nodes=2)
    framework, stream = h.subscribe()
    offer = next(o for o in h.offers(stream) if o.node == "n1")
    jobs = h.call(framework, p.Accept(offer_ids=[offer.id], tasks=[task("a")])).jobs
    h.report("n1", f"{jobs['a']}.0", TaskState.RUNNING)
    h.now += 20
    h.handle(FromAgent("n0", Heartbeat(usage=Usage()), h.now), Tick(h.now))
    assert [e.node for e in h.events(stream, p.Failure)] == ["n1"]
    assert h.events(stream, p.Update)[-1].status.state is TaskState.LOST


def test_reconcile_answers_for_named_unknown_and_all_live_tasks() -> None:
    h = Harness(nodes=1)
    framework, stream = h.subscribe()
    [offer] = h.offers(stream)
    h.call(framework, p.Accept(offer_ids=[offer.id], tasks=[task("a")]))
    h.call(framework, p.Reconcile(tasks=["a", "ghost"]))
    h.call(framework, p.Reconcile())
    answers = [e.status for e in h.events(stream, p.Update)]
    assert [(a.task, a.state, a.uuid) for a in answers] == [
        ("a", TaskState.ASSIGNED, None),
        ("ghost", TaskState.LOST, None),
        ("a", TaskState.ASSIGNED, None),
    ]


def test_teardown_kills_the_tasks_and_ends_the_framework() -> None:
    h = Harness(nodes=1)
    framework, stream = h.subscribe()
    [offer] = h.offers(stream)
    h.call(framework, p.Accept(offer_ids=[offer.id], tasks=[task("a")]))
    h.call(framework, p.Teardown())
    assert stream in h.closed
    assert [s for s in h.sent if isinstance(s.frame, Kill)]
    with pytest.raises(NotFound):
        h.call(framework, p.Revive())


def test_roles_come_from_the_token() -> None:
    h = Harness()
    alice = Principal("alice", roles=frozenset({"heavy"}))
    with pytest.raises(Forbidden):
        h.subscribe(principal=alice, role="default")
    framework, _ = h.subscribe(principal=alice, role="heavy")
    with pytest.raises(NotFound):
        h.call(framework, p.Suppress(), principal=Principal("mallory", roles=frozenset({"heavy"})))
    with pytest.raises(SpecError, match="no role"):
        h.subscribe(role="nosuch")


def test_native_jobs_and_frameworks_draw_from_one_ledger() -> None:
    h = Harness(nodes=1)
    framework, stream = h.subscribe()
    [offer] = h.offers(stream)
    [reply] = h.handle(Submit(99, "alice", JobSpec(command="true", resources={"cpus": 1}), h.now))
    assert reply.error is None
    # The node is held in the offer: the native job waits rather than take it.
    assert h.state.why_waiting(reply.value)
    h.call(framework, p.Decline(offer_ids=[offer.id], refuse_seconds=30))
    assert h.state.ledger.tasks_of(reply.value)[0].state is TaskState.ASSIGNED


def test_updates_survive_a_master_restart() -> None:
    h = Harness(nodes=1)
    framework, stream = h.subscribe()
    [offer] = h.offers(stream)
    jobs = h.call(framework, p.Accept(offer_ids=[offer.id], tasks=[task("a")])).jobs
    h.report("n0", f"{jobs['a']}.0", TaskState.RUNNING)
    # What a store would hold, from the persisted changes.
    frameworks = {f.id: f for c in h.stored for f in c.frameworks}
    acked = {u for c in h.stored for u in c.acked}
    updates = [(fw, s) for c in h.stored for fw, s in c.updates if s.uuid not in acked]
    jobs_ = {j.id: j for c in h.stored for j in c.jobs}
    tasks = {t.id: t for c in h.stored for t in c.tasks}
    snapshot = Snapshot(
        list(jobs_.values()), list(tasks.values()), [], list(frameworks.values()), updates, []
    )
    restarted = MasterState(policy=POLICY, snapshot=snapshot, now=100.0)
    h.state, h.now = restarted, 100.0
    again, stream2 = h.subscribe(framework_id=framework)
    assert [e.status.state for e in h.events(stream2, p.Update)] == [TaskState.RUNNING]


def test_a_filter_lapses_as_soon_as_more_is_free_than_was_refused() -> None:
    h = Harness(nodes=1)
    framework, stream = h.subscribe()
    [offer] = h.offers(stream)
    jobs = h.call(framework, p.Accept(offer_ids=[offer.id], tasks=[task("a", cpus=4)])).jobs
    [rest] = h.offers(stream)[1:]
    assert rest.resources.cpus == 0
    h.call(framework, p.Decline(offer_ids=[rest.id], refuse_seconds=600))
    h.report("n0", f"{jobs['a']}.0", TaskState.FINISHED, exit_code=0)
    assert h.offers(stream)[-1].resources.cpus == 4  # long before the 600 s


def test_native_work_leaves_freed_room_to_a_framework_below_its_fair_share() -> None:
    h = Harness(nodes=1)
    [reply] = h.handle(Submit(99, "alice", JobSpec(command="sleep 9", count=8, resources={"cpus": 1}), h.now))
    running = [t for t in h.state.ledger.tasks_of(reply.value) if t.state is TaskState.ASSIGNED]
    assert len(running) == 4
    framework, stream = h.subscribe(role="heavy")
    for offer in h.offers(stream):  # what the native tasks leave: memory, no cpus
        h.call(framework, p.Decline(offer_ids=[offer.id], refuse_seconds=600))
    h.report("n0", running[0].id, TaskState.FINISHED, exit_code=0)
    # The queue holds 3/4 of the cpus, past its fair third while "heavy" (weight 2) has none:
    # the freed cpu is offered to the framework, and the native task waits.
    assert h.offers(stream)[-1].resources.cpus == 1
    assert sum(t.state is TaskState.PENDING for t in h.state.ledger.tasks_of(reply.value)) == 4
    h.call(framework, p.Suppress())
    # A framework with nothing to run suppresses; the native queue has the cluster again.
    assert sum(t.state is TaskState.PENDING for t in h.state.ledger.tasks_of(reply.value)) == 3


# --- the ledger's invariants under any sequence of calls (hypothesis) ----------------------

op_st = st.lists(
    st.tuples(
        st.sampled_from(
            ["accept", "decline", "suppress", "revive", "kill", "finish", "tick", "close", "native"]
        ),
        st.integers(0, 2),  # which framework
        st.integers(0, 50),  # which offer or task, modulo what there is
        st.sampled_from([0.5, 1, 3]),  # cpus asked
    ),
    max_size=40,
)


@settings(max_examples=120, deadline=None)
@given(op_st)
def test_offers_and_tasks_never_hold_more_than_a_node_and_the_table_adds_up(ops) -> None:
    h = Harness(nodes=3, offer_timeout=5)
    frameworks = [h.subscribe(f"f{i}", role=("default", "heavy")[i % 2]) for i in range(3)]
    native = 0
    for op, which, pick, cpus in ops:
        framework, stream = frameworks[which]
        desk = h.state.frameworks
        held = [o for o in desk.offers.values() if o.framework == framework]
        live = [t for t in h.state.ledger.tasks.values() if t.state.active]
        try:
            if op == "accept" and held:
                offer = held[pick % len(held)]
                h.call(framework, p.Accept(offer_ids=[offer.id], tasks=[task(f"t{h.requests}", cpus=cpus)]))
            elif op == "decline" and held:
                h.call(framework, p.Decline(offer_ids=[held[pick % len(held)].id], refuse_seconds=cpus))
            elif op in ("suppress", "revive"):
                h.call(framework, p.Suppress() if op == "suppress" else p.Revive())
            elif op == "kill" and live:
                h.handle(KillJob(20_000 + pick, live[pick % len(live)].job_id, h.now))
            elif op == "finish" and live:
                t = live[pick % len(live)]
                h.report(t.node, t.id, TaskState.FINISHED, exit_code=0)
            elif op == "tick":
                h.tick(cpus * 2)
            elif op == "close":
                h.handle(StreamClosed(stream, h.now))
                frameworks[which] = h.subscribe(
                    f"f{which}", framework_id=framework, role=("default", "heavy")[which % 2]
                )
            elif op == "native":
                native += 1
                h.handle(
                    Submit(10_000 + native, "alice", JobSpec(command="true", resources={"cpus": cpus}), h.now)
                )
        except SpecError:
            pass  # refused (over-use, a live name): must change nothing, checked below
        _check(h)


def _check(h: Harness) -> None:
    state = h.state
    table = state.ledger.table
    expected = np.zeros_like(table.allocated)
    for task_id in state.ledger.active:
        t = state.ledger.tasks[task_id]
        expected[table.index[t.node]] += table.vector(state.ledger.jobs[t.job_id].spec.resources)
    for offer in state.frameworks.offers.values():
        expected[offer.row, : len(offer.amount)] += offer.amount
    assert np.allclose(table.allocated, expected), "the table is off what tasks and offers hold"
    assert np.all(table.allocated <= table.capacity + 1e-6), "a node holds more than it has"
    for fw in state.frameworks.frameworks.values():
        assert set(fw.offers) <= set(state.frameworks.offers)
