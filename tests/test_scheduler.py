"""The pure scheduler: table-driven cases and properties."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shoal.core.scheduler import (
    NO_NODES,
    NOT_BEFORE,
    STALE,
    UNKNOWN_NODE,
    Ask,
    NodeView,
    Placement,
    Plan,
    apply_plan,
    never_fits,
    schedule,
)
from shoal.model import NO_RESOURCES, Resources


def node(name: str, cpus: float = 4, mem: int = 4096, used_cpus: float = 0, up: bool = True) -> NodeView:
    return NodeView(name, Resources(cpus=cpus, mem=mem), Resources(cpus=used_cpus, mem=0), up)


def ask(task: str, cpus: float = 1, mem: int = 256, not_before: float = 0) -> Ask:
    return Ask(task, Resources(cpus=cpus, mem=mem), not_before)


@pytest.mark.parametrize(
    ("nodes", "asks", "placed", "unplaced"),
    [
        ([node("a")], [ask("t1")], {"t1": "a"}, {}),
        ([node("a", used_cpus=3), node("b")], [ask("t1")], {"t1": "b"}, {}),  # most free cpus
        ([node("a"), node("b")], [ask("t1"), ask("t2")], {"t1": "a", "t2": "b"}, {}),  # spreads
        ([node("a", cpus=2)], [ask("big", cpus=3), ask("small")], {"small": "a"}, {"big": "1 node lacks free cpus"}),
        ([node("a", mem=100)], [ask("t1", mem=200)], {}, {"t1": "1 node lacks free memory"}),
        ([], [ask("t1")], {}, {"t1": NO_NODES}),
        ([node("a", up=False)], [ask("t1")], {}, {"t1": NO_NODES}),
        ([node("a")], [ask("t1", not_before=5)], {}, {"t1": NOT_BEFORE}),
        (
            [node("a", cpus=1), node("b", cpus=1)],
            [ask("t1", cpus=2)],
            {},
            {"t1": "2 nodes lack free cpus"},
        ),
    ],
)
def test_schedule(nodes, asks, placed, unplaced) -> None:
    plan = schedule(nodes, asks, now=1.0)
    assert {p.task_id: p.node for p in plan.placements} == placed
    assert plan.unplaced == unplaced


def test_schedule_keeps_queue_order_when_space_runs_out() -> None:
    plan = schedule([node("a", cpus=2)], [ask("first"), ask("second"), ask("third")], now=0)
    assert [p.task_id for p in plan.placements] == ["first", "second"]
    assert list(plan.unplaced) == ["third"]


@pytest.mark.parametrize(
    ("capacities", "want", "reason"),
    [
        ([Resources(cpus=2)], Resources(cpus=64), "unschedulable: needs 64 cpus, the largest node has 2"),
        ([Resources(cpus=2, mem=100)], Resources(cpus=1, mem=500), "unschedulable: needs 500 MiB of memory, the largest node has 100"),
        (
            [Resources(cpus=8, mem=100), Resources(cpus=1, mem=9000)],
            Resources(cpus=4, mem=4000),
            "unschedulable: no single node has all of the resources asked for",
        ),
        ([Resources(cpus=2)], Resources(cpus=2), None),
        ([], Resources(cpus=64), None),  # no node yet: wait for one
    ],
)
def test_never_fits(capacities, want, reason) -> None:
    assert never_fits(capacities, want) == reason


def test_apply_plan_rejects_stale_and_unknown_parts() -> None:
    nodes = {"a": node("a", cpus=2, used_cpus=1.5), "b": node("b"), "down": node("down", up=False)}
    plan = Plan(
        (
            Placement("fits", "b", Resources(cpus=1)),
            Placement("stale", "a", Resources(cpus=1)),
            Placement("gone", "down", Resources(cpus=1)),
            Placement("ghost", "nowhere", Resources(cpus=1)),
        )
    )
    verdict = apply_plan(nodes, plan)
    assert [p.task_id for p in verdict.accepted] == ["fits"]
    assert verdict.rejected == {"stale": STALE, "gone": UNKNOWN_NODE, "ghost": UNKNOWN_NODE}


def test_apply_plan_counts_earlier_parts_of_the_same_plan() -> None:
    plan = Plan(tuple(Placement(f"t{i}", "a", Resources(cpus=1)) for i in range(3)))
    verdict = apply_plan({"a": node("a", cpus=2)}, plan)
    assert len(verdict.accepted) == 2 and verdict.rejected == {"t2": STALE}


nodes_st = st.lists(
    st.builds(
        lambda i, cpus, mem, used, up: NodeView(
            f"n{i}", Resources(cpus=cpus, mem=mem), Resources(cpus=min(used, cpus), mem=0), up
        ),
        st.integers(0, 10_000),
        st.sampled_from([1, 2, 4, 8, 16]),
        st.integers(256, 65536),
        st.sampled_from([0, 0.5, 1, 3]),
        st.booleans(),
    ),
    max_size=12,
    unique_by=lambda n: n.name,
)
asks_st = st.lists(
    st.builds(
        lambda i, cpus, mem: Ask(f"t{i}", Resources(cpus=cpus, mem=mem)),
        st.integers(0, 10_000),
        st.sampled_from([0.1, 0.5, 1, 2, 4, 32]),
        st.integers(1, 70000),
    ),
    max_size=60,
    unique_by=lambda a: a.task_id,
)


@settings(max_examples=300, deadline=None)
@given(nodes_st, asks_st)
def test_no_node_is_ever_over_committed(nodes: list[NodeView], asks: list[Ask]) -> None:
    plan = schedule(nodes, asks, now=0)
    used = {n.name: n.allocated for n in nodes}
    for p in plan.placements:
        used[p.node] = used[p.node] + p.resources
    by_name = {n.name: n for n in nodes}
    for name, total in used.items():
        assert total.shortfall(by_name[name].capacity) is None
    assert all(by_name[p.node].schedulable for p in plan.placements)
    # every ask is either placed or explained, never both
    placed = {p.task_id for p in plan.placements}
    assert placed | set(plan.unplaced) == {a.task_id for a in asks}
    assert not placed & set(plan.unplaced)
    # a plan made on this snapshot passes its own check untouched
    assert apply_plan(by_name, plan).rejected == {}


@settings(max_examples=200, deadline=None)
@given(nodes_st, asks_st)
def test_an_unplaced_ask_fits_on_no_node_after_the_plan(nodes: list[NodeView], asks: list[Ask]) -> None:
    plan = schedule(nodes, asks, now=0)
    free = {n.name: n.free for n in nodes if n.schedulable}
    for p in plan.placements:
        free[p.node] = free[p.node] - p.resources
    for a in asks:
        if a.task_id in plan.unplaced:
            assert all(a.resources.shortfall(room) is not None for room in free.values())


def test_resources_arithmetic() -> None:
    a = Resources(cpus=1.5, mem=100, gpus=1)
    assert a + a - a == a
    assert (a - a) == NO_RESOURCES
