"""Static ports and colocation: the core's rules (table-driven cases and hypothesis
properties checked by an independent reading of the placements), the ledger's plan check and
book of ports, the reasons a waiting job gives, and the ledger state machine under jobs that
use both (its invariants after every event)."""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import rule
from test_ledger_machine import LedgerMachine, job_specs

from shoal.core.cluster import MaskCache, NodeTable
from shoal.core.fairness import UsageBook
from shoal.core.placement import Group
from shoal.core.plan import Placement, Plan, Reservation, Running
from shoal.core.scheduler import Policy, schedule
from shoal.core.tags import JOB, PORT, SERVICE, Colocate, Presence, Tag, presence
from shoal.core.targets import best_target
from shoal.master.events import FromAgent, Submit
from shoal.master.ledger import Ledger
from shoal.master.state import MasterState
from shoal.model import JobSpec, NodeInfo, Resources, Strategy, TaskState
from shoal.testing.sim import sim_node
from shoal.wire import Register


def table(*names: str, cpus: float = 4) -> NodeTable:
    t = NodeTable()
    for name in names:
        t.upsert(name, Resources(cpus=cpus, mem=4096), {"name": name}, True)
    return t


def job(
    job_id: int,
    count: int = 1,
    name: str = "",
    services: tuple[str, ...] = (),
    ports: tuple[int, ...] = (),
    rules: tuple[Colocate, ...] = (),
    **kw: object,
) -> Group:
    return Group(
        job_id=job_id,
        tasks=tuple(f"{job_id}.{i}" for i in range(count)),
        ask=Resources(cpus=1, mem=256),
        presence=presence(name, services, ports, rules),
        **kw,  # type: ignore[arg-type]
    )


def running(
    t: NodeTable, node: str, name: str = "", services: tuple[str, ...] = (), ports=(), rules=()
) -> None:
    """A task of such a job runs on `node`: the tags the ledger would put there."""
    p = presence(name, services, ports, rules)
    assert p is not None
    t.tags.add(t.index[node], p.provides)


def run(t: NodeTable, groups: list[Group], strategy: Strategy = Strategy.SPREAD) -> Plan:
    return schedule(t, MaskCache(t), groups, UsageBook(), (), Policy(strategy=strategy), now=0.0)


def where(plan: Plan, job_id: int | None = None) -> Counter[str]:
    return Counter(p.node for p in plan.placements if job_id is None or p.task_id.startswith(f"{job_id}."))


def keep_away(kind: str, name: str) -> Colocate:
    return Colocate((kind, name), -100, hard=True)


def only_near(kind: str, name: str) -> Colocate:
    return Colocate((kind, name), 100, hard=True)


# --- static ports -------------------------------------------------------------------------


def test_a_static_port_held_on_a_node_keeps_other_jobs_off_it() -> None:
    t = table("a", "b", "c")
    running(t, "a", "dns", ports=(53,))
    running(t, "b", "resolver", ports=(53,))
    plan = run(t, [job(1, 2, "other-dns", ports=(53,))])
    assert where(plan) == {"c": 1}
    assert plan.waiting == {1: "3 nodes hold port 53"}  # a and b by others, c by its first task


def test_tasks_of_one_job_with_a_static_port_never_share_a_node() -> None:
    t = table("a", "b", "c", cpus=16)
    for strategy in Strategy:
        plan = run(t, [job(1, 5, "web", ports=(8080,))], strategy)
        assert where(plan) == {"a": 1, "b": 1, "c": 1}, strategy
        assert plan.waiting[1] == "3 nodes hold port 8080"


def test_another_port_held_on_a_node_does_not_bind() -> None:
    t = table("a")
    running(t, "a", "dns", ports=(53,))
    assert where(run(t, [job(1, 1, "web", ports=(80,)), job(2, 3)], Strategy.BINPACK)) == {"a": 4}


def test_a_gang_with_a_static_port_needs_as_many_free_nodes_as_tasks() -> None:
    t = table("a", "b", "c")
    running(t, "c", ports=(53,))
    plan = run(t, [job(1, 3, ports=(53,), gang=True), job(2, 2, ports=(53,), gang=True)])
    assert where(plan, 1) == {} and where(plan, 2) == {"a": 1, "b": 1}
    assert plan.waiting[1].startswith("gang: 2 of 3 tasks fit now")
    assert t.tags.rows((PORT, 53)) == {t.index["c"]: 1}  # the cycle gave back what it marked


def test_a_reservation_holds_one_node_per_task_of_a_static_port() -> None:
    t = table("a", "b", cpus=8)
    ends = []
    for node, task, limit in (("a", "90.0", 100.0), ("b", "91.0", 200.0)):
        t.allocate(t.index[node], t.vector(Resources(cpus=8)))
        ends.append(Running(task, 90, node, Resources(cpus=8), started_at=0.0, time_limit=limit))
    g = job(1, 2, "dns", ports=(53,))
    plan = schedule(t, MaskCache(t), [g], UsageBook.of(t, ends), ends, Policy(), now=0.0)
    # a alone has room for both at 100, but holds one port 53: the second waits for b
    assert plan.reservations == (Reservation(1, 200.0, (("a", 1), ("b", 1))),)


def test_preemption_makes_room_for_a_static_port_on_as_many_nodes_as_tasks() -> None:
    t = table("a", "b")
    low = []
    for node, task, cpus in (("a", "90.0", 4), ("b", "91.0", 2), ("b", "91.1", 2)):
        t.allocate(t.index[node], t.vector(Resources(cpus=cpus)))
        low.append(Running(task, int(task[:2]), node, Resources(cpus=cpus), started_at=0.0))
    plan = schedule(
        t, MaskCache(t), [job(1, 2, "dns", ports=(53,), priority=5)], UsageBook.of(t, low), low, Policy(), 0.0
    )
    # evicting a's one task makes room for both, but a takes one port 53
    assert sorted(node for _, node in plan.nominations) == ["a", "b"]
    assert sorted(e.task_id for e in plan.evictions) == ["90.0", "91.0"]


# --- colocation ---------------------------------------------------------------------------


def test_soft_weights_change_the_chosen_node() -> None:
    t = table("a", "b")
    t.allocate(t.index["b"], t.vector(Resources(cpus=1)))  # spread alone picks a
    running(t, "b", "db")
    assert where(run(t, [job(1)])) == {"a": 1}
    assert where(run(t, [job(2, rules=(Colocate((JOB, "db"), 60),))])) == {"b": 1}
    running(t, "a", services=("cache",))
    assert where(run(t, [job(3, rules=(Colocate((SERVICE, "cache"), -60),))])) == {"b": 1}
    # a preference, not a rule: a full preferred node is passed over
    t.allocate(t.index["b"], t.vector(Resources(cpus=3)))
    assert where(run(t, [job(4, rules=(Colocate((JOB, "db"), 100),))])) == {"a": 1}


def test_a_soft_weight_against_its_own_name_spreads_a_binpacked_job() -> None:
    t = table("a", "b", "c", cpus=16)
    assert where(run(t, [job(1, 3, "web")], Strategy.BINPACK)) == {"a": 3}
    plan = run(t, [job(2, 3, "web", rules=(Colocate((JOB, "web"), -100),))], Strategy.BINPACK)
    assert where(plan) == {"a": 1, "b": 1, "c": 1}


def test_hard_positive_colocation_places_only_next_to_the_named_job_or_service() -> None:
    t = table("a", "b", "c", "d", cpus=2)
    running(t, "b", "db")
    running(t, "d", services=("cache",))
    plan = run(t, [job(1, 4, rules=(only_near(JOB, "db"),)), job(2, 4, rules=(only_near(SERVICE, "cache"),))])
    assert where(plan, 1) == {"b": 2} and where(plan, 2) == {"d": 2}
    assert plan.waiting[1] == "3 nodes run no job db, 1 node lacks free cpus"
    assert plan.waiting[2] == "3 nodes run no service cache, 1 node lacks free cpus"


def test_hard_anti_colocation_on_its_own_name_is_one_task_per_node() -> None:
    t = table("a", "b", "c", cpus=16)
    plan = run(t, [job(1, 5, "web", rules=(keep_away(JOB, "web"),))], Strategy.BINPACK)
    assert where(plan) == {"a": 1, "b": 1, "c": 1}
    assert plan.waiting[1] == "3 nodes run job web"


def test_hard_anti_colocation_binds_both_ways() -> None:
    t = table("a", "b")
    running(t, "a", "batch", rules=(keep_away(SERVICE, "api"),))
    plan = run(t, [job(1, 2, "web", services=("api",))], Strategy.BINPACK)
    assert where(plan) == {"b": 2}
    alone = run(t, [job(2, 1, "web", services=("api",), nodes=frozenset({"a"}))])
    assert alone.waiting[2] == "1 node is outside the node set, 1 node runs a job that keeps service api away"


def test_tasks_placed_earlier_in_the_cycle_count() -> None:
    t = table("a", "b", "c", "d", cpus=8)
    groups = [
        job(1, 2, "web", ports=(80,)),
        job(2, 4, "proxy", rules=(keep_away(JOB, "web"),)),
        job(3, 2, "sidecar", rules=(only_near(JOB, "web"),)),
        job(4, 4, "lb", ports=(80,)),  # web took port 80 on two nodes this cycle
    ]
    plan = run(t, groups, Strategy.BINPACK)
    web = set(where(plan, 1))
    assert len(web) == 2
    assert not web & set(where(plan, 2)) and sum(where(plan, 2).values()) == 4
    assert set(where(plan, 3)) <= web and sum(where(plan, 3).values()) == 2
    assert not web & set(where(plan, 4)) and sum(where(plan, 4).values()) == 2
    assert plan.waiting[4] == "4 nodes hold port 80"
    # the rule of a job placed earlier binds the jobs placed after it (it binds both ways)
    later = run(table("a", "b"), [job(5, 1, "batch", rules=(keep_away(JOB, "web"),)), job(6, 2, "web")])
    assert where(later, 5) == {"a": 1} and where(later, 6) == {"b": 2}


def test_a_moving_task_keeps_to_static_ports_and_colocation() -> None:
    t = table("a", "b", "c", "d")
    running(t, "a", "web", ports=(80,))
    running(t, "b", "web", ports=(80,))
    running(t, "c", "db")
    g = job(1, 1, "web", ports=(80,), rules=(Colocate((JOB, "db"), 100),))
    assert best_target(t, MaskCache(t), g, "a", Strategy.SPREAD) == "c"
    running(t, "c", ports=(80,))
    assert best_target(t, MaskCache(t), g, "a", Strategy.SPREAD) == "d"


# --- properties: hard rules hold for every placement a cycle makes --------------------------

NAMES = ("a", "b", "c")
SERVICES = ("s", "t")
TARGETS: tuple[Tag, ...] = ((JOB, "a"), (JOB, "b"), (SERVICE, "s"))


@dataclass(frozen=True)
class Kind:
    """A job as the independent check reads it."""

    name: str
    services: tuple[str, ...]
    ports: tuple[int, ...]
    rules: tuple[Colocate, ...]

    def is_(self, tag: Tag) -> bool:
        kind, name = tag
        return self.name == name if kind == JOB else name in self.services

    def presence(self) -> Presence | None:
        return presence(self.name, self.services, self.ports, self.rules)


kinds = st.builds(
    Kind,
    name=st.sampled_from(NAMES),
    services=st.lists(st.sampled_from(SERVICES), max_size=2, unique=True).map(tuple),
    ports=st.lists(st.sampled_from([53, 80]), max_size=2, unique=True).map(tuple),
    rules=st.lists(
        st.builds(Colocate, st.sampled_from(TARGETS), st.sampled_from([-100, -30, 30, 100]), st.booleans()),
        max_size=2,
    ).map(tuple),
)


def broken(here: Kind, others: list[Kind]) -> str | None:
    """Which hard rule a task of `here` breaks beside the `others` on its node, read from the
    job kinds alone."""
    for other in others:
        if set(here.ports) & set(other.ports):
            return f"port {set(here.ports) & set(other.ports)} twice"
        for a, b in ((here, other), (other, here)):
            for r in a.rules:
                if r.hard and r.weight < 0 and b.is_(r.tag):
                    return f"{a} keeps {r.tag} away, yet {b} is there"
    for r in here.rules:
        if r.hard and r.weight > 0 and not any(o.is_(r.tag) for o in others):
            return f"{here} needs {r.tag}, which is not there"
    return None


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    cpus=st.lists(st.integers(1, 4), min_size=1, max_size=6),
    existing=st.lists(st.tuples(st.integers(0, 5), kinds), max_size=6),
    jobs=st.lists(st.tuples(kinds, st.integers(1, 4), st.booleans()), min_size=1, max_size=5),
    strategy=st.sampled_from(list(Strategy)),
)
def test_hard_rules_hold_for_every_placement_and_only_they_keep_tasks_waiting(
    cpus: list[int], existing: list[tuple[int, Kind]], jobs: list[tuple[Kind, int, bool]], strategy: Strategy
) -> None:
    t = NodeTable()
    for i, c in enumerate(cpus):
        t.upsert(f"n{i}", Resources(cpus=c, mem=4096), {}, True)
    on_node: dict[str, list[Kind]] = defaultdict(list)
    for i, kind in existing:
        node = f"n{i % len(cpus)}"
        on_node[node].append(kind)
        if (p := kind.presence()) is not None:
            t.tags.add(t.index[node], p.provides)
    tags_before = t.tags.counts()
    groups = [
        Group(
            job_id=j,
            tasks=tuple(f"{j}.{i}" for i in range(count)),
            ask=Resources(cpus=1, mem=64),
            presence=kind.presence(),
            gang=gang,
        )
        for j, (kind, count, gang) in enumerate(jobs, start=1)
    ]
    plan = run(t, groups, strategy)
    assert t.tags.counts() == tags_before, "the cycle left its marks on the table"
    placed = [(p.node, jobs[int(p.task_id.split(".")[0]) - 1][0]) for p in plan.placements]
    for node, kind in placed:
        on_node[node].append(kind)
    for k, (node, kind) in enumerate(placed):
        others = list(on_node[node])
        others.remove(kind)  # itself (any equal kind is as good)
        assert broken(kind, others) is None, (node, broken(kind, others), plan.placements[k])
    # and no rule is made up: a task that waits breaks one on every node with room for it
    # (a job that needs a job or service nearby aside: what it needs may come later in the cycle)
    room = {
        name: t.free[row, 0] - where(plan)[name] for name, row in t.index.items()
    }  # the cycle gave it back
    for g, (kind, count, gang) in zip(groups, jobs, strict=True):
        if where(plan, g.job_id).total() < count and not gang and not g.presence.need:
            for name in (n for n, free in room.items() if free >= 1):
                assert broken(kind, on_node[name]) is not None, (g.job_id, name, plan.waiting)


# --- the ledger: the book of ports and the plan check -------------------------------------


def node(name: str, ports: tuple[int, int] = (20000, 20003)) -> NodeInfo:
    return NodeInfo(name=name, hostname=name, capacity=Resources(cpus=4, mem=4096), port_range=ports)


def ledger(*names: str) -> Ledger:
    book = Ledger()
    for name in names:
        book.register_node(node(name), 0.0)
    return book


def place(book: Ledger, spec: JobSpec, *nodes: str) -> dict[str, str]:
    """Submit `spec` (one task per node given) and place it there: the rejected, with why."""
    added = book.add_job("alice", spec.model_copy(update={"count": len(nodes)}), 0.0)
    tasks = [f"{added.id}.{i}" for i in range(len(nodes))]
    plan = Plan(tuple(Placement(t, n, added.spec.resources) for t, n in zip(tasks, nodes, strict=True)))
    return book.place(plan, 0.0).rejected


def spec(name: str = "", ports: list | None = None, **fields: object) -> JobSpec:
    return JobSpec.model_validate(
        {"command": "serve", "name": name, "ports": ports or [], "resources": {"cpus": 0.5}, **fields}
    )


def test_static_ports_are_never_handed_out_as_dynamic_ones() -> None:
    book = ledger("n1", "n2")
    assert book.free_ports("n1") == 4
    static = spec("dns", [{"name": "dns", "static": 20001}, {"name": "admin", "static": 9}])
    assert place(book, static, "n1") == {}
    assert book.tasks["1.0"].ports == {"dns": 20001, "admin": 9}
    # 20001 is taken on n1, and kept from dynamic ports on every node while job 1 lives
    assert book.free_ports("n1") == 3 and book.free_ports("n2") == 3
    dynamic = spec("web", ["a", "b", "c"])
    assert place(book, dynamic, "n2") == {}
    assert sorted(book.tasks["2.0"].ports.values()) == [20000, 20002, 20003]
    assert place(book, spec("more", ["x"]), "n2") == {"3.0": "node has too few free ports (stale plan)"}
    book.kill_job(1, 1.0)
    book.transition(book.tasks["1.0"], TaskState.KILLED, 1.0)  # its agent stopped it
    assert book.free_ports("n1") == 4 and book.free_ports("n2") == 1


def test_a_dynamic_port_held_before_a_static_job_came_keeps_it_off_that_node() -> None:
    book = ledger("n1", "n2")
    assert place(book, spec("web", ["http"]), "n1") == {}
    assert book.tasks["1.0"].ports == {"http": 20000}
    late = book.add_job("alice", spec("dns", [{"name": "dns", "static": 20000}], count=2), 0.0)
    plan = schedule(
        book.table, book.masks, [book.group(late.id, ["2.0", "2.1"])], book.usage, (), Policy(), 0.0
    )
    assert where(plan) == {"n2": 1} and plan.waiting[2] == "2 nodes hold port 20000"


def test_the_plan_check_refuses_a_stale_plan() -> None:
    book = ledger("n1", "n2")
    dns = book.add_job("alice", spec("dns", [{"name": "dns", "static": 53}], count=2), 0.0)
    anti = book.add_job("alice", spec("batch", colocation=[{"job": "web", "hard": True}]), 0.0)
    near = book.add_job(
        "alice", spec("side", colocation=[{"service": "api", "weight": 5, "hard": True}]), 0.0
    )
    stale = Plan(
        (
            Placement("1.0", "n1", dns.spec.resources),
            Placement("1.1", "n1", dns.spec.resources),  # the same node twice: the second is refused
            Placement(f"{anti.id}.0", "n2", anti.spec.resources),
            Placement(f"{near.id}.0", "n2", near.spec.resources),
        )
    )
    assert (
        place(
            book,
            spec("web", [{"name": "http", "static": 53}], services=[{"name": "api", "port": "http"}]),
            "n2",
        )
        == {}
    )
    verdict = book.place(stale, 0.0)
    assert [p.task_id for p in verdict.accepted] == ["1.0", f"{near.id}.0"]
    assert verdict.rejected == {
        "1.1": "node holds port 53 (stale plan)",
        f"{anti.id}.0": "node runs job web (stale plan)",
    }
    assert book.allocated("n2").cpus == 1.0  # web and side: the refused task holds nothing
    assert book.table.tags.rows((PORT, 53)) == {0: 1, 1: 1}
    # and a plan placing a task next to what it needs, when that is gone, is refused too
    book.kill_job(4, 1.0)
    book.transition(book.tasks["4.0"], TaskState.KILLED, 1.0)
    again = book.add_job("alice", near.spec, 1.0)
    assert book.place(Plan((Placement(f"{again.id}.0", "n2", near.spec.resources),)), 1.0).rejected == {
        f"{again.id}.0": "node runs no service api (stale plan)"
    }


def test_a_waiting_job_says_which_rule_keeps_it_waiting() -> None:
    state = MasterState()
    for name in ("n1", "n2"):
        state.handle(FromAgent(name, Register(node=sim_node(name), runs=[]), 0.0))
    submissions = [
        {"name": "dns", "count": 3, "ports": [{"name": "dns", "static": 53}]},
        {"name": "web", "count": 3, "colocation": [{"job": "web", "hard": True}]},
        {"name": "side", "colocation": [{"service": "cache", "weight": 50, "hard": True}]},
        {"name": "batch", "colocation": [{"job": "dns", "hard": True}]},
    ]
    for i, fields in enumerate(submissions, start=1):
        state.handle(Submit(i, "alice", JobSpec(command="serve", resources={"cpus": 0.5}, **fields), 0.0))
    assert {job: state.why_waiting(job) for job in range(1, 6)} == {
        1: "2 nodes hold port 53",
        2: "2 nodes run job web",
        3: "2 nodes run no service cache",
        4: "2 nodes run job dns",
        5: "",
    }


# --- the ledger state machine, with jobs that use both -------------------------------------


@st.composite
def placed_specs(draw: st.DrawFn) -> JobSpec:
    spec = draw(job_specs())
    name = draw(st.sampled_from(["web", "db", "batch"]))
    ports = [{"name": p.name} for p in spec.ports]
    if draw(st.booleans()):
        ports.append({"name": "fixed", "static": draw(st.sampled_from([53, 20002]))})
    rules = draw(
        st.lists(
            st.fixed_dictionaries(
                {
                    "job": st.sampled_from(["web", "db", "batch"]),
                    "weight": st.sampled_from([-100, -20, 20, 100]),
                    "hard": st.booleans(),
                }
            ),
            max_size=2,
        )
    )
    return JobSpec.model_validate({**spec.model_dump(), "name": name, "ports": ports, "colocation": rules})


class PortsAndColocationMachine(LedgerMachine):
    """The ledger machine, its jobs now named, with static ports and colocation rules."""

    @rule(specs=st.lists(placed_specs(), min_size=1, max_size=3))
    def submit(self, specs: list[JobSpec]) -> None:
        super().submit(specs)


TestPortsAndColocationMachine = PortsAndColocationMachine.TestCase
# 30 runs of 40 steps: 1,200 steps of named jobs with ports and colocation rules, the invariants
# checked after every event (the ledger machine's own 3,000 steps cover the other rules).
TestPortsAndColocationMachine.settings = settings(
    max_examples=30, stateful_step_count=40, deadline=None, suppress_health_check=list(HealthCheck)
)


def test_tags_are_rebuilt_from_the_records_after_a_restart() -> None:
    book = ledger("n1", "n2")
    assert place(book, spec("web", [{"name": "http", "static": 80}, "admin"]), "n1", "n2") == {}
    restarted = Ledger(jobs=book.jobs.values(), tasks=book.tasks.values(), nodes=book.nodes.values(), now=1.0)
    assert restarted.table.tags.counts() == book.table.tags.counts()
    assert np.array_equal(restarted.port_room(spec(ports=["x", "y", "z"])), np.array([True, True]))
