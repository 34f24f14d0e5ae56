"""The rebalancer: table-driven cases for each rule, and properties (hypothesis)."""

from __future__ import annotations

import math

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from shoal.core.rebalance import Cluster, Movable, RebalancePolicy, applied, rebalance, smooth
from shoal.model import Migrate

DIMS = 2  # cpus, mem


def cluster(
    loads: list[list[float]], cores: float = 8.0, down: tuple[int, ...] = ()
) -> tuple[Cluster, list[Movable]]:
    """Nodes of `cores` cores, each task asking for what it uses (and 256 MiB)."""
    tasks = [
        Movable(f"t{row}.{i}", row, load, np.array([load, 256.0]))
        for row, node in enumerate(loads)
        for i, load in enumerate(node)
    ]
    n = len(loads)
    capacity = np.array([[cores, 16384.0]] * n)
    held = np.zeros((n, DIMS))
    for t in tasks:
        held[t.row] += t.ask
    used = np.array([sum(node) for node in loads])
    schedulable = np.array([i not in down for i in range(n)])
    return Cluster(np.full(n, cores), used, capacity - held, schedulable), tasks


# --- rules ------------------------------------------------------------------------------------


def test_a_hot_node_sheds_its_largest_tasks_to_the_coolest_nodes() -> None:
    c, tasks = cluster([[3, 2, 1, 1], [1], [0.5]])
    moves = rebalance(c, tasks, RebalancePolicy(), now=1000)
    assert [m.task_id for m in moves] == ["t0.0", "t0.1"]
    assert {m.target for m in moves} == {1, 2}
    after, _ = applied(c, tasks, moves, 0.0)
    assert after.utilization.max() - after.used.sum() / 24 <= 0.10


def test_nothing_moves_inside_the_threshold() -> None:
    c, tasks = cluster([[3], [2.5], [2.2]])
    assert rebalance(c, tasks, RebalancePolicy(), now=1000) == []


def test_modes_cooldown_priority_and_budget() -> None:
    c, tasks = cluster([[2, 2, 2, 1], [0], [0]])
    tasks[0] = Movable("t0.0", 0, 2, np.array([2.0, 256]), mode=Migrate.NEVER)
    tasks[1] = Movable("t0.1", 0, 2, np.array([2.0, 256]), moved_at=900)  # moved 100 s ago
    tasks[2] = Movable("t0.2", 0, 2, np.array([2.0, 256]), priority=5)
    tasks[3] = Movable("t0.3", 0, 1, np.array([1.0, 256]))
    moves = rebalance(c, tasks, RebalancePolicy(budget=1), now=1000)
    assert [m.task_id for m in moves] == ["t0.2"]  # the largest the rules allow, one move
    moves = rebalance(c, tasks, RebalancePolicy(budget=5), now=1000)
    assert {m.task_id for m in moves} <= {"t0.2", "t0.3"}


def test_constraints_and_room_decide_the_target() -> None:
    c, tasks = cluster([[2, 2, 2], [0], [0]])
    allowed = np.array([True, False, True])
    tasks[0] = Movable("t0.0", 0, 2, np.array([2.0, 256]), allowed=allowed)
    moves = rebalance(c, tasks, RebalancePolicy(), now=1000)
    assert {(m.task_id, m.target) for m in moves} == {("t0.0", 2), ("t0.1", 1)}
    full = Cluster(c.cores, c.used, np.array([[1, 16384], [0.5, 16384], [0.5, 16384]]), c.schedulable)
    assert rebalance(full, tasks, RebalancePolicy(), now=1000) == []  # no room anywhere


def test_a_node_that_joins_gets_work() -> None:
    c, tasks = cluster([[2, 2], [2, 2], [2, 2], []])  # 50% everywhere, one empty newcomer
    moves = rebalance(c, tasks, RebalancePolicy(), now=1000)
    assert moves and all(m.target == 3 for m in moves)
    after, _ = applied(c, tasks, moves, 0.0)
    assert after.utilization[3] >= 0.25


def test_consolidate_empties_the_least_used_nodes_wholly() -> None:
    c, tasks = cluster([[4, 1], [0.5], [0.5, 0.25], [3]])
    moves = rebalance(c, tasks, RebalancePolicy(mode="consolidate", low=0.2, high=0.8), now=1000)
    emptied = {m.source for m in moves}
    assert emptied == {1, 2}
    after, _ = applied(c, tasks, moves, 0.0)
    assert after.used[1] == 0 and after.used[2] == 0
    assert after.utilization.max() <= 0.8


def test_consolidate_moves_idle_tasks_too_but_spread_leaves_them() -> None:
    c, tasks = cluster([[0.0, 0.0], [0.0], [3.0]])  # tasks that hold room but use no CPU
    moves = rebalance(c, tasks, RebalancePolicy(mode="consolidate"), now=1000)
    assert {m.source for m in moves} == {0, 1} and {m.target for m in moves} == {2}
    assert rebalance(c, tasks, RebalancePolicy(), now=1000) == []


def test_smoothing_damps_a_spike_and_follows_a_sustained_change() -> None:
    levels: list[float] = []
    for sample in (0.2, 0.2, 0.2, 1.0, 0.2, 0.2):
        levels.append(smooth(levels[-1] if levels else None, sample))
    assert max(levels) < 0.5  # one sample at 100% does not make a node hot
    for _ in range(7):
        levels.append(smooth(levels[-1], 1.0))
    assert levels[-1] > 0.9


# --- properties -------------------------------------------------------------------------------

task_st = st.sampled_from([0.25, 0.5, 1.0, 2.0, 3.0])
node_st = st.lists(task_st, max_size=6).filter(lambda ts: sum(ts) <= 8)
instance_st = st.tuples(
    st.lists(node_st, min_size=2, max_size=12),
    st.lists(st.sampled_from(list(Migrate)), min_size=1, max_size=5),
    st.integers(0, 2**16),
    st.sampled_from(["spread", "consolidate"]),
    st.integers(1, 20),
)


def _instance(loads, modes, seed, mode, budget):
    c, tasks = cluster(loads)
    rng = np.random.default_rng(seed)
    n = len(loads)
    shaped = []
    for i, t in enumerate(tasks):
        allowed = rng.random(n) < 0.7 if rng.random() < 0.3 else None
        moved_at = 950.0 if rng.random() < 0.2 else -math.inf
        shaped.append(
            Movable(
                t.task_id,
                t.row,
                t.load,
                t.ask,
                modes[i % len(modes)],
                int(rng.integers(3)),
                moved_at,
                allowed,
            )
        )
    return c, shaped, RebalancePolicy(mode=mode, budget=budget)


@settings(max_examples=300, deadline=None)
@given(instance_st)
def test_a_round_never_raises_the_peak_breaks_a_rule_or_passes_its_budget(instance) -> None:
    """Spreading never makes the hottest node hotter; consolidating packs, but never past
    `high`; neither breaks a task's rules, a node's room or the budget."""
    c, tasks, policy = _instance(*instance)
    moves = rebalance(c, tasks, policy, now=1000)
    assert len(moves) <= policy.budget
    assert len({m.task_id for m in moves}) == len(moves)  # a task moves once a round
    by_id = {t.task_id: t for t in tasks}
    for m in moves:
        t = by_id[m.task_id]
        assert t.row == m.source != m.target
        assert t.mode is not Migrate.NEVER and 1000 - t.moved_at >= policy.cooldown
        assert t.allowed is None or t.allowed[m.target]
        assert c.schedulable[m.target]
    after, _ = applied(c, tasks, moves, 0.0)
    assert np.all(after.free >= -1e-9), "a target was given more than its room"
    if policy.mode == "spread":
        assert after.utilization.max() <= c.utilization.max() + 1e-9, "the hottest node got hotter"
    for m in moves:
        assert after.utilization[m.target] <= max(policy.high, c.utilization[m.target]) + 1e-9


small_node_st = st.lists(st.sampled_from([0.25, 0.5]), max_size=16)


@settings(max_examples=150, deadline=None)
@given(st.lists(small_node_st, min_size=3, max_size=12))
def test_spread_settles_within_the_threshold_in_three_rounds(loads) -> None:
    """With tasks of at most half a core on 8-core nodes, a node at or below the mean can
    always take one without passing the trigger: three rounds bring every node inside it."""
    c, tasks = cluster(loads)
    policy = RebalancePolicy(budget=100, cooldown=0)
    mean = c.used.sum() / c.cores.sum()
    for _ in range(3):
        moves = rebalance(c, tasks, policy, now=1000)
        c, tasks = applied(c, tasks, moves, 0.0)
    assert c.utilization.max() - mean <= policy.threshold + 1e-9
