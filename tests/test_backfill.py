"""Backfill: strict order, EASY and conservative reservations, cycle by cycle and over whole
workloads replayed through the core (every instant: ends, submissions, one cycle)."""

from __future__ import annotations

import heapq
import math
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from shoal.core.backfill import Profile, Slot
from shoal.core.cluster import MaskCache, NodeTable
from shoal.core.fairness import UsageBook
from shoal.core.placement import Group
from shoal.core.plan import Plan, Reservation, Running
from shoal.core.scheduler import Policy, QueuePolicy, apply_plan, schedule
from shoal.model import Resources
from shoal.testing import backfill_reference as reference


def table(**cpus: float) -> NodeTable:
    t = NodeTable()
    for name, c in cpus.items():
        t.upsert(name, Resources(cpus=c, mem=0), {}, True)
    return t


def holding(
    t: NodeTable, node: str, task: str, cpus: float, limit: float | None, started: float | None = 0.0
):
    t.allocate(t.index[node], t.vector(Resources(cpus=cpus, mem=0)))
    return Running(
        task, int(task.split(".")[0]), node, Resources(cpus=cpus, mem=0), started_at=started, time_limit=limit
    )


def job(job_id: int, count: int = 1, cpus: float = 1, limit: float | None = None, **kw) -> Group:
    ask = Resources(cpus=cpus, mem=0)
    return Group(job_id, tuple(f"{job_id}.{i}" for i in range(count)), ask, time_limit=limit, **kw)


def cycle(t: NodeTable, groups, running=(), now: float = 0.0, **queue) -> Plan:
    policy = Policy(queues={"default": QueuePolicy(order="fifo", **queue)})
    return schedule(t, MaskCache(t), groups, UsageBook.of(t, running), running, policy, now)


def started(plan: Plan) -> list[str]:
    return [p.task_id for p in plan.placements]


# --- one cycle ------------------------------------------------------------------------------


def test_easy_runs_what_ends_before_the_reservation_or_uses_room_the_head_will_not_need() -> None:
    t = table(a=8, b=1)
    running = [holding(t, "a", "90.0", 6, limit=100), holding(t, "b", "91.0", 1, limit=None)]
    head = job(1, cpus=4)  # 2 cpus free now; at 100, a has 8: 4 for the head, 4 to spare
    short = job(2, cpus=1, limit=50)  # ends before the head's start
    extra = job(3, cpus=1)  # never ends, but fits in what the head leaves at 100
    too_much = job(4, cpus=4, limit=500)
    plan = cycle(t, [head, short, extra, too_much], running)
    assert started(plan) == ["2.0", "3.0"]
    assert plan.reservations == (Reservation(1, 100.0, (("a", 1),)),)
    assert plan.waiting[1].endswith("; a is held for it from 100s on")


def test_the_extra_room_is_used_up_by_what_runs_past_the_reservation() -> None:
    t = table(a=8)
    running = [holding(t, "a", "90.0", 4, limit=100)]
    # At 100 the head takes 6 of 8: two cpus to spare, and four free now.
    plan = cycle(
        t,
        [job(1, cpus=6), job(2, cpus=1), job(3, cpus=1), job(4, cpus=1), job(5, cpus=1, limit=100)],
        running,
    )
    assert started(plan) == ["2.0", "3.0", "5.0"]


def test_none_keeps_strict_order_behind_a_job_that_cannot_start() -> None:
    t = table(a=4)
    running = [holding(t, "a", "90.0", 3, limit=100)]
    plan = cycle(t, [job(1, cpus=4), job(2, cpus=1, limit=10)], running, backfill="none")
    assert started(plan) == [] and plan.reservations == ()
    assert plan.waiting[2] == "behind job 1: queue default keeps strict order"


def test_placed_but_unstarted_work_ends_by_its_limit_from_now() -> None:
    t = table(a=4)
    running = [holding(t, "a", "90.0", 4, limit=100, started=None)]
    plan = cycle(t, [job(1, cpus=4)], running, now=30.0)
    assert plan.reservations == (Reservation(1, 130.0, (("a", 1),)),)


def test_work_started_earlier_in_the_cycle_counts_toward_the_shadow_time() -> None:
    t = table(a=4)
    plan = cycle(t, [job(1, cpus=3, limit=60), job(2, cpus=4), job(3, cpus=1, limit=100)])
    # Job 1 starts now and holds 3 cpus until 60: job 2 is promised 60, and job 3, which
    # would run past it on the cpu job 2 needs, waits.
    assert started(plan) == ["1.0"]
    assert plan.reservations == (Reservation(2, 60.0, (("a", 1),)),)


def test_without_time_limits_there_is_no_reservation_and_the_queue_default_gives_one() -> None:
    t = table(a=4)
    running = [holding(t, "a", "90.0", 3, limit=None)]
    plan = cycle(t, [job(1, cpus=4), job(2, cpus=1)], running)
    assert plan.reservations == () and started(plan) == ["2.0"]
    t = table(a=4)
    running = [holding(t, "a", "90.0", 3, limit=None)]
    plan = cycle(t, [job(1, cpus=4), job(2, cpus=1), job(3, cpus=1, limit=4000)], running, default_limit=3600)
    # Job 2 runs for the default 3600 s too: it is gone when job 1 may start; job 3 is not.
    assert plan.reservations == (Reservation(1, 3600.0, (("a", 1),)),) and started(plan) == ["2.0"]


def test_a_gang_over_several_nodes_gets_a_reservation_on_enough_of_them() -> None:
    t = table(a=4, b=4, c=4)
    running = [
        holding(t, "a", "90.0", 4, limit=100),
        holding(t, "b", "91.0", 4, limit=200),
        holding(t, "c", "92.0", 2, limit=50),
    ]
    gang = job(1, count=2, cpus=4, gang=True)
    plan = cycle(t, [gang, job(2, cpus=2, limit=300), job(3, cpus=2, limit=40)], running)
    assert plan.reservations == (Reservation(1, 100.0, (("a", 1), ("c", 1))),)
    assert started(plan) == ["3.0"]  # job 2 would hold c past 100
    assert plan.waiting[1].startswith("gang: 0 of 2 tasks fit now")


def test_conservative_protects_the_first_jobs_easy_only_the_first() -> None:
    def run(**queue) -> Plan:
        t = table(a=6)
        running = [holding(t, "a", "90.0", 4, limit=100)]
        # Job 3 fits beside job 1 from 100 to 150, but holds what job 2 needs from 150.
        return cycle(
            t,
            [job(1, cpus=4, limit=50), job(2, cpus=6, limit=50), job(3, cpus=2, limit=300)],
            running,
            **queue,
        )

    easy = run()
    assert [(r.job_id, r.start) for r in easy.reservations] == [(1, 100.0)] and started(easy) == ["3.0"]
    conservative = run(backfill="conservative", depth=2)
    assert [(r.job_id, r.start) for r in conservative.reservations] == [(1, 100.0), (2, 150.0)]
    assert started(conservative) == []
    assert started(run(backfill="conservative", depth=1)) == ["3.0"]


def test_work_past_its_limit_still_holds_its_room_and_the_head_keeps_its_reservation() -> None:
    t = table(a=4, b=4)
    running = [holding(t, "a", "90.0", 4, limit=10)]  # due to end at 10, still running at 11
    plan = cycle(t, [job(1, count=2, cpus=4, gang=True), job(2, cpus=4, limit=1000)], running, now=11.0)
    assert [r.job_id for r in plan.reservations] == [1] and 11.0 < plan.reservations[0].start < 11.001
    assert started(plan) == []


def test_a_node_short_of_room_held_for_evictions_counts_as_holding_no_task() -> None:
    # Row 0 is 4 cpus short (room held for a nominated task while its victims still run).
    profile = Profile(
        0.0, np.array([[-4.0], [0.0]]), np.array([100.0]), np.array([1]), np.array([[4.0]]), np.array([0])
    )
    start, slots = profile.earliest(np.array([4.0]), 1, 10.0, np.array([0, 1]), np.full(2, np.inf))
    assert start == 100.0 and slots == [Slot(1, 1)]


def test_a_gang_its_queue_may_not_hold_whole_waits_for_its_share() -> None:
    t = table(a=4, b=4)
    policy = Policy(queues={"default": QueuePolicy(limit=0.5)})
    plan = schedule(t, MaskCache(t), [job(1, count=2, cpus=4, gang=True)], UsageBook(), [], policy, 0.0)
    assert plan.waiting == {1: "queue default is at its max share (50%)"} and plan.reservations == ()


# --- whole workloads ------------------------------------------------------------------------


@dataclass(frozen=True)
class Job:
    id: int
    submit: int
    count: int
    cpus: int
    run: int
    limit: int | None
    gang: bool = False


@dataclass
class Outcome:
    starts: dict[int, list[float]]  # job -> its tasks' start times
    heads: dict[int, float]  # job -> the earliest start it was promised as its queue's head


def replay(jobs: list[Job], nodes: dict[str, float], backfill: str, depth: int = 100) -> Outcome:
    """Every instant: the ends due, then the submissions, then one cycle, applied at once."""
    t = table(**nodes)
    policy = Policy(queues={"default": QueuePolicy(order="fifo", backfill=backfill, depth=depth)})
    by_id = {j.id: j for j in jobs}
    asks = {j.id: Resources(cpus=j.cpus, mem=0) for j in jobs}  # one per job, as a master has
    waiting: dict[int, list[str]] = {}
    running: dict[str, tuple[Running, float]] = {}
    ends: list[tuple[float, str]] = []
    arrivals = list(jobs)
    outcome = Outcome(defaultdict(list), {})
    while arrivals or ends or waiting:
        due = ([arrivals[0].submit] if arrivals else []) + ([ends[0][0]] if ends else [])
        assert due, f"jobs wait with nothing left to end: {sorted(waiting)}"
        now = min(due)
        while ends and ends[0][0] <= now:
            _, task = heapq.heappop(ends)
            r, _ = running.pop(task)
            t.release(t.index[r.node], t.vector(r.ask))
        while arrivals and arrivals[0].submit <= now:
            j = arrivals.pop(0)
            waiting[j.id] = [f"{j.id}.{i}" for i in range(j.count)]
        groups = [
            Group(i, tuple(ids), asks[i], time_limit=by_id[i].limit, gang=by_id[i].gang)
            for i, ids in sorted(waiting.items())
        ]
        holding = [r for r, _ in running.values()]
        plan = schedule(t, MaskCache(t), groups, UsageBook.of(t, holding), holding, policy, now)
        for r in plan.reservations:
            if r.head:
                outcome.heads[r.job_id] = min(r.start, outcome.heads.get(r.job_id, math.inf))
        verdict = apply_plan(t, plan)
        assert not verdict.rejected
        for p in verdict.accepted:
            j = by_id[int(p.task_id.split(".")[0])]
            waiting[j.id].remove(p.task_id)
            if not waiting[j.id]:
                del waiting[j.id]
            r = Running(p.task_id, j.id, p.node, p.resources, started_at=now, time_limit=j.limit)
            running[p.task_id] = (r, now + j.run)
            heapq.heappush(ends, (now + j.run, p.task_id))
            outcome.starts[j.id].append(now)
    return outcome


NODES = {"a": 4, "b": 4, "c": 4}


@st.composite
def workloads(draw, limits: bool = True) -> list[Job]:
    """Jobs numbered in submission order, as a master numbers them."""
    submits = sorted(draw(st.lists(st.integers(0, 60), min_size=1, max_size=14)))
    jobs = []
    for i, submit in enumerate(submits, start=1):
        count = draw(st.integers(1, 3))
        run = draw(st.integers(1, 40))
        limit = run + draw(st.integers(0, 30)) if limits or draw(st.booleans()) else None
        cpus = draw(st.sampled_from([1, 2, 3, 4]))
        jobs.append(Job(i, submit, count, cpus, run, limit, gang=count > 1 and draw(st.booleans())))
    return jobs


@settings(max_examples=150, deadline=None)
@given(st.booleans().flatmap(lambda limits: workloads(limits)), st.sampled_from(["easy", "conservative"]))
def test_no_head_starts_after_the_start_it_was_promised(jobs, backfill) -> None:
    """The first job that cannot start is promised a start no later job may delay. (Under
    conservative backfill later jobs' promises are recomputed in queue order every cycle, as
    in Slurm: an earlier job may take what a later one was promised, when ends come early.)"""
    outcome = replay(jobs, NODES, backfill)
    for job_id, promise in outcome.heads.items():
        assert max(outcome.starts[job_id]) <= promise + 1e-9, (job_id, promise, outcome.starts[job_id])


@settings(max_examples=150, deadline=None)
@given(workloads(limits=False))
def test_strict_order_never_starts_a_job_before_an_earlier_one(jobs) -> None:
    outcome = replay(jobs, NODES, "none")
    for earlier, later in zip(jobs, jobs[1:], strict=False):
        assert min(outcome.starts[later.id]) >= max(outcome.starts[earlier.id]), (earlier, later)


@settings(max_examples=150, deadline=None)
@given(workloads(), st.sampled_from(["none", "easy", "conservative"]))
def test_with_finite_limits_every_job_starts_within_a_bound(jobs, backfill) -> None:
    outcome = replay(jobs, NODES, backfill)
    # The last submission, then each job in turn for its whole time limit.
    bound = max(j.submit for j in jobs) + sum(j.limit or 0 for j in jobs)
    assert all(max(outcome.starts[j.id]) <= bound for j in jobs)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 80), st.integers(1, 8), st.integers(0, 40), st.integers(0, 40)),
        min_size=1,
        max_size=25,
    ),
    st.sampled_from(["none", "easy", "conservative"]),
    st.integers(1, 4),
)
def test_one_pool_starts_every_job_when_the_reference_does(shapes, backfill, depth) -> None:
    """On one node the core's decisions are the textbook's: the same start for every job."""
    shapes = sorted(shapes, key=lambda s: s[0])
    rigid = [
        reference.Job(i, submit, procs, run, run + slack or 1)
        for i, (submit, procs, run, slack) in enumerate(shapes, 1)
    ]
    jobs = [Job(j.id, int(j.submit), 1, j.procs, int(j.run), int(j.limit)) for j in rigid]
    ours = replay(jobs, {"pool": 8}, backfill, depth)
    theirs = reference.simulate(rigid, 8, backfill, depth)
    assert {j: s[0] for j, s in ours.starts.items()} == theirs.starts
