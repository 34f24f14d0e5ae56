"""The service registry in the master's state machine, event by event: endpoints follow
tasks and their checks, leave before a stopped task is signalled, switch with a
make-before-break move, go with a lost node; registrations lapse; a restart keeps it all."""

from __future__ import annotations

from pathlib import Path

import pytest

from shoal.checks import CheckResult, CheckStatus
from shoal.errors import Forbidden, SpecError
from shoal.master.events import (
    AgentGone,
    CheckService,
    DeregisterService,
    Drain,
    FromAgent,
    KillJob,
    MastersSeen,
    RegisterService,
    Reply,
    Send,
    Submit,
    Tick,
)
from shoal.master.ha import endpoint_of
from shoal.master.leadership import Member
from shoal.master.registry import RegistryPolicy
from shoal.master.state import MasterState
from shoal.master.store.sqlite import SqliteStore
from shoal.model import Caller, JobSpec, Role, TaskState, Usage
from shoal.services import AGENT_SERVICE, MASTER_SERVICE, Endpoint, Registration
from shoal.testing import invariants
from shoal.testing.sim import sim_node
from shoal.wire import Heartbeat, Kill, Launch, Register, RunReport, RunReports

PASSING, WARNING, CRITICAL = CheckStatus.PASSING, CheckStatus.WARNING, CheckStatus.CRITICAL
ALICE = Caller(name="alice", role=Role.USER)

WEB = JobSpec(
    name="web",
    command="serve",
    count=2,
    resources={"cpus": 1},
    ports=["http", "metrics"],
    services=[
        {"name": "web", "port": "http", "tags": ["v1"], "check": {"http": "http/healthz"}},
        {"name": "web-metrics", "port": "metrics"},  # no check: passing while it runs
    ],
)


class Harness:
    def __init__(self, nodes: int = 3, store: SqliteStore | None = None, **kw) -> None:
        self.store = store
        self.state = MasterState(heartbeat_timeout=5, snapshot=store.load() if store else None, **kw)
        self.now = 1.0
        self.sent: list[Send] = []
        for i in range(1, nodes + 1):
            node = sim_node(f"n{i}", address=f"10.0.0.{i}")
            self.handle(FromAgent(f"n{i}", Register(node=node), self.now))
        self._requests = 100

    def handle(self, *events) -> list[Reply]:
        replies = []
        for c in self.state.handle(*events):
            if isinstance(c, Send):
                self.sent.append(c)
            elif isinstance(c, Reply):
                replies.append(c)
            elif self.store is not None:
                self.store.apply(c)
        invariants.check(self.state)
        return replies

    def request(self, make):
        self._requests += 1
        [reply] = self.handle(make(self._requests))
        if reply.error is not None:
            raise reply.error
        return reply.value

    def submit(self, spec: JobSpec) -> int:
        return self.request(lambda r: Submit(r, "alice", spec, self.now))

    def report(self, task_id: str, state: TaskState = TaskState.RUNNING, **checks: CheckStatus) -> None:
        task = self.state.ledger.tasks[task_id]
        copy = task.successor
        attempt, node = (copy.attempt, copy.node) if copy is not None else (task.attempt, task.node)
        run = RunReport(
            run_id=f"{task_id}.{attempt}",
            task_id=task_id,
            attempt=attempt,
            state=state,
            checks={
                name.replace("_", "-"): CheckResult(s, f"said {s.value}", self.now)
                for name, s in checks.items()
            },
        )
        self.handle(FromAgent(node or "", RunReports(reports=[run]), self.now))

    def endpoints(self, service: str, passing: bool = True) -> list[tuple[str, str, int, CheckStatus]]:
        return [
            (e.id, e.address, e.port, e.status)
            for e in self.state.registry.endpoints(service, passing=passing)
        ]

    def heartbeats(self, *nodes: str) -> None:
        for node in nodes:
            self.handle(FromAgent(node, Heartbeat(usage=Usage()), self.now))


def running_web(h: Harness) -> int:
    job = h.submit(WEB)
    for task in h.state.ledger.tasks_of(job):
        h.report(task.id)
    return job


def test_an_endpoint_serves_once_its_check_passes_and_leaves_when_it_fails() -> None:
    h = Harness()
    job = running_web(h)
    tasks = h.state.ledger.tasks_of(job)
    # A check that has not run yet is critical: nothing answers for `web`, `web-metrics` serves.
    assert h.endpoints("web") == []
    assert [status for *_, status in h.endpoints("web", passing=False)] == [CRITICAL, CRITICAL]
    assert len(h.endpoints("web-metrics")) == 2
    h.report(tasks[0].id, web=PASSING)
    [(endpoint, address, port, _)] = h.endpoints("web")
    assert endpoint == f"{tasks[0].id}/web"
    assert address == f"10.0.0.{tasks[0].node[1:]}" and port == tasks[0].ports["http"]
    h.report(tasks[0].id, web=WARNING)
    assert h.endpoints("web") == []  # only passing endpoints answer
    [summary] = [s for s in h.state.registry.summaries() if s.name == "web"]
    assert (summary.passing, summary.warning, summary.critical, summary.tags) == (0, 1, 1, ["v1"])


def test_a_killed_task_leaves_its_services_before_the_kill_goes_out() -> None:
    h = Harness()
    job = running_web(h)
    for task in h.state.ledger.tasks_of(job):
        h.report(task.id, web=PASSING)
    launched = [r for s in h.sent if isinstance(s.frame, Launch) for r in s.frame.runs]
    assert {r.shutdown_delay for r in launched} == {3.0}  # the master's default for jobs with services
    assert set(launched[0].checks) == {"web"}
    before = h.state.registry.index_of("web")
    h.sent.clear()
    commands = h.state.handle(KillJob(1, job, h.now))
    kills = [c for c in commands if isinstance(c, Send) and isinstance(c.frame, Kill)]
    assert len(kills) == 2  # sent, and by then (the same turn) the registry has let them go
    assert h.endpoints("web", passing=False) == [] and h.endpoints("web-metrics", passing=False) == []
    assert h.state.registry.index_of("web") > before


def test_a_job_without_services_is_signalled_at_once_and_one_may_choose_its_delay() -> None:
    h = Harness()
    plain = h.submit(JobSpec(command="x", resources={"cpus": 1}))
    quick = h.submit(WEB.model_copy(update={"shutdown_delay": 0.5, "count": 1}))
    delays = {
        r.task_id.split(".")[0]: r.shutdown_delay
        for s in h.sent
        if isinstance(s.frame, Launch)
        for r in s.frame.runs
    }
    assert delays == {str(plain): 0.0, str(quick): 0.5}


def test_a_lost_node_takes_its_endpoints_at_once() -> None:
    h = Harness()
    job = running_web(h)
    for task in h.state.ledger.tasks_of(job):
        h.report(task.id, web=PASSING)
    lost = h.state.ledger.tasks_of(job)[0].node
    alive = [n for n in h.state.ledger.nodes if n != lost]
    h.now += 4
    h.heartbeats(*alive)
    h.now += 2
    h.handle(Tick(h.now))
    assert h.state.ledger.nodes[lost].status.value == "down"
    assert all(f"10.0.0.{lost[1:]}" != address for _, address, _, _ in h.endpoints("web", passing=False))
    agents = {e.id: e.status for e in h.state.registry.endpoints(AGENT_SERVICE, passing=False)}
    assert agents[lost] is CRITICAL and all(agents[n] is PASSING for n in alive)


def test_a_make_before_break_move_switches_the_endpoint_when_the_new_copy_passes() -> None:
    h = Harness()
    spec = {**WEB.model_dump(), "count": 1, "migrate": "make-before-break", "health": {"tcp": "http"}}
    job = h.submit(JobSpec.model_validate(spec))
    [task] = h.state.ledger.tasks_of(job)
    h.report(task.id, web=PASSING, **{"": PASSING})
    old = h.endpoints("web")
    h.request(lambda r: Drain(r, task.node, True, h.now))
    copy = task.successor
    assert copy is not None
    h.report(task.id, web=CRITICAL, **{"": CRITICAL})  # the new copy runs, does not serve yet
    assert h.endpoints("web") == old  # the old copy answers meanwhile
    h.report(task.id, web=CRITICAL, **{"": PASSING})  # its own check passes, its service's not yet
    assert h.endpoints("web") == old and task.successor is copy
    h.report(task.id, web=PASSING, **{"": PASSING})
    [(_, address, port, status)] = h.endpoints("web")
    assert (address, port, status) == (f"10.0.0.{copy.node[1:]}", copy.ports["http"], PASSING)


def test_a_change_to_one_service_moves_only_its_index() -> None:
    h = Harness()
    running_web(h)
    h.state.registry.take_changed()
    web = h.state.registry.index_of("web")
    h.request(
        lambda r: RegisterService(
            r, ALICE, Registration(id="db1", name="db", address="10.1.0.1", port=5432), h.now
        )
    )
    assert h.state.registry.take_changed() == {"db"}
    assert h.state.registry.index_of("web") == web < h.state.registry.index_of("db") == h.state.registry.index


def test_a_registration_lapses_unless_passed_within_its_ttl() -> None:
    h = Harness()
    spec = Registration(id="db1", name="db", address="10.1.0.1", port=5432, ttl=5)
    h.request(lambda r: RegisterService(r, ALICE, spec, h.now))
    assert h.state.next_due() == h.now + 5
    h.now += 4
    h.request(lambda r: CheckService(r, ALICE, "db1", WARNING, "replica lag 3s", h.now))
    assert h.endpoints("db", passing=False) == [("db1", "10.1.0.1", 5432, WARNING)]
    assert h.state.registry.endpoints("db", passing=False)[0].output == "replica lag 3s"
    h.now += 4.5  # 8.5 s after registering, 4.5 after the last word
    h.handle(Tick(h.now))
    assert len(h.endpoints("db", passing=False)) == 1
    h.now += 0.5
    h.handle(Tick(h.now))
    assert h.endpoints("db", passing=False) == [] and "db1" not in h.state.registry.registrations


def test_only_its_owner_or_an_admin_changes_a_registration() -> None:
    h = Harness()
    spec = Registration(id="db1", name="db", address="10.1.0.1", port=5432)
    h.request(lambda r: RegisterService(r, ALICE, spec, h.now))
    bob = Caller(name="bob", role=Role.USER)
    with pytest.raises(Forbidden):
        h.request(lambda r: DeregisterService(r, bob, "db1", h.now))
    with pytest.raises(Forbidden):
        h.request(lambda r: RegisterService(r, bob, spec, h.now))
    h.request(lambda r: DeregisterService(r, Caller(name="root", role=Role.ADMIN), "db1", h.now))
    assert h.endpoints("db", passing=False) == []


def test_a_restarted_master_has_the_same_registry(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "shoal.db")
    h = Harness(store=store)
    job = running_web(h)
    first, second = h.state.ledger.tasks_of(job)
    h.report(first.id, web=PASSING)
    h.report(second.id, web=CRITICAL)
    h.request(
        lambda r: RegisterService(
            r, ALICE, Registration(id="db1", name="db", address="10.1.0.1", port=1), h.now
        )
    )
    h.request(lambda r: CheckService(r, ALICE, "db1", WARNING, "slow", h.now))
    gone = Registration(id="old", name="db", address="10.1.0.2", port=1)
    h.request(lambda r: RegisterService(r, ALICE, gone, h.now))
    h.request(lambda r: DeregisterService(r, ALICE, "old", h.now))
    restarted = MasterState(heartbeat_timeout=5, snapshot=store.load(), now=h.now)
    for name in ("web", "web-metrics", "db"):
        assert restarted.registry.endpoints(name, passing=False) == h.state.registry.endpoints(
            name, passing=False
        )
    assert restarted.registry.next_due() == h.now + 30  # a whole TTL again


def test_services_left_without_endpoints_are_forgotten_yet_never_answer_an_old_index_late() -> None:
    h = Harness()
    registry = h.state.registry
    for i in range(3):
        spec = Registration(id=f"r{i}", name=f"gone{i}", address="10.1.0.1", port=1)
        h.request(lambda r, spec=spec: RegisterService(r, ALICE, spec, h.now))
        index = registry.index_of(spec.name)
        h.request(lambda r, i=i: DeregisterService(r, ALICE, f"r{i}", h.now))
        # A client that saw the service at `index` is told of its removal at once.
        assert registry.index_of(spec.name) > index
    assert {s.name for s in registry.summaries()} == {"shoal-agent"}
    assert not {f"gone{i}" for i in range(3)} & set(registry._indexes)


def test_registrations_are_capped_per_owner_and_in_all() -> None:
    h = Harness(registry=RegistryPolicy(max_registrations=3, registrations_per_owner=2))
    bob = Caller(name="bob", role=Role.USER)

    def register(caller: Caller, rid: str) -> None:
        spec = Registration(id=rid, name="db", address="10.1.0.1", port=1)
        h.request(lambda r: RegisterService(r, caller, spec, h.now))

    register(ALICE, "a1")
    register(ALICE, "a2")
    register(ALICE, "a2")  # registering again replaces: no more room taken
    with pytest.raises(SpecError) as too_many:
        register(ALICE, "a3")
    assert too_many.value.status == 429 and "alice holds 2" in str(too_many.value)
    register(bob, "b1")
    with pytest.raises(SpecError) as full:
        register(bob, "b2")
    assert full.value.status == 429


def test_a_node_back_at_another_address_moves_its_endpoints() -> None:
    h = Harness()
    job = running_web(h)
    node = h.state.ledger.tasks_of(job)[0].node
    moved = sim_node(node, address="10.7.7.7")
    runs = [
        RunReport(run_id=t.run_id, task_id=t.id, attempt=t.attempt, state=TaskState.RUNNING)
        for t in h.state.ledger.tasks_of(job)
        if t.node == node
    ]
    h.handle(FromAgent(node, Register(node=moved, runs=runs), h.now))
    on_it = [e for e in h.state.registry.endpoints("web-metrics") if e.node == node]
    assert on_it and all(e.address == "10.7.7.7" for e in on_it)


def test_an_agent_whose_connection_closes_is_critical_until_it_registers_again() -> None:
    h = Harness()
    h.handle(AgentGone("n2", h.now))
    agents = {e.id: (e.status, e.output) for e in h.state.registry.endpoints(AGENT_SERVICE, passing=False)}
    assert agents["n2"] == (CRITICAL, "disconnected") and agents["n1"][0] is PASSING
    h.handle(FromAgent("n2", Register(node=sim_node("n2", address="10.0.0.2")), h.now))
    assert [e.id for e in h.state.registry.endpoints(AGENT_SERVICE)] == ["n1", "n2", "n3"]


def test_the_masters_alive_are_listed_and_those_gone_leave() -> None:
    def master(name: str, port: int) -> Endpoint:
        return endpoint_of(Member(name, f"http://10.0.1.1:{port}", dns_port=8600))

    h = Harness(masters=[master("m1", 8470)])
    index = h.state.registry.index_of(MASTER_SERVICE)
    h.handle(MastersSeen((master("m1", 8470), master("m2", 8471), master("m3", 8472)), h.now))
    assert [e[0] for e in h.endpoints(MASTER_SERVICE)] == ["10.0.1.1:8470", "10.0.1.1:8471", "10.0.1.1:8472"]
    assert h.state.registry.index_of(MASTER_SERVICE) > index
    h.handle(MastersSeen((master("m2", 8471), master("m3", 8472)), h.now))
    assert [e[0] for e in h.endpoints(MASTER_SERVICE)] == ["10.0.1.1:8471", "10.0.1.1:8472"]
    assert {e.meta["name"] for e in h.state.registry.endpoints(MASTER_SERVICE)} == {"m2", "m3"}
