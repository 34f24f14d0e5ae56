"""The reference backfill simulator, on cases worked out by hand and by its properties; then
shoal's scheduler, through `shoal sim`'s machinery, against it on random traces."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shoal.core.scheduler import Policy, QueuePolicy
from shoal.simulation import Cluster
from shoal.simulation import simulate as run_simulation
from shoal.testing.backfill_reference import Job, Mode, simulate
from shoal.workload import Arrival, Workload


def starts(jobs: list[Job], procs: int, mode: Mode, depth: int = 1) -> dict[int, float]:
    return dict(sorted(simulate(jobs, procs, mode, depth).starts.items()))


# --- by hand --------------------------------------------------------------------------------

EXTRA = [  # 10 processors
    Job(1, submit=0, procs=6, run=10, limit=10),
    Job(2, submit=1, procs=8, run=5, limit=5),
    Job(3, submit=2, procs=2, run=100, limit=100),
    Job(4, submit=3, procs=2, run=100, limit=100),
]


def test_easy_backfills_a_long_job_on_the_processors_the_reservation_leaves() -> None:
    # At 1, job 2 (8) finds 4 free: it is promised 10, when job 1's 6 come back, and needs 8
    # of the 10 then. At 2, job 3 (2 procs, 100 s) runs past 10 but on the 2 job 2 leaves
    # over: it starts. At 3 job 4 would need 2 more at 10, where none are left: it waits for
    # job 2 to end at 15.
    assert starts(EXTRA, 10, "easy") == {1: 0, 2: 10, 3: 2, 4: 15}
    assert simulate(EXTRA, 10, "easy").promised[2] == 10


def test_without_backfill_the_queue_goes_in_order() -> None:
    # Job 3 waits behind job 2 although 4 processors are free: it starts with job 2 at 10.
    assert starts(EXTRA, 10, "none") == {1: 0, 2: 10, 3: 10, 4: 15}


@pytest.mark.parametrize(("limit", "start"), [(8, 2), (9, 15)])
def test_a_job_may_end_exactly_at_the_shadow_time(limit: float, start: float) -> None:
    # 4 processors. Job 2 (all 4) is promised 10, when job 1 ends. Job 3 (2 procs) fits
    # in the 2 left over [2, 2 + limit): with a limit of 8 it hands them back at 10 sharp,
    # which the reservation may then use (the window is half-open); with 9 it must wait
    # for job 2 to end at 15.
    jobs = [Job(1, 0, 2, 10, 10), Job(2, 1, 4, 5, 5), Job(3, 2, 2, 8, limit)]
    assert starts(jobs, 4, "easy") == {1: 0, 2: 10, 3: start}


@pytest.mark.parametrize("mode", ["none", "easy", "conservative"])
def test_a_zero_length_job_ends_at_once_and_the_pass_runs_again(mode: Mode) -> None:
    # Job 1 takes all 4 processors for 0 s: job 2 starts at the same instant, in a second
    # pass. Job 3 waits for job 2's actual end at 3 (not its limit, 5).
    jobs = [Job(1, 0, 4, 0, 5), Job(2, 0, 4, 3, 5), Job(3, 0, 1, 1, 1)]
    assert starts(jobs, 4, mode, depth=5) == {1: 0, 2: 0, 3: 3}


CROWD = [  # 4 processors
    Job(1, submit=0, procs=3, run=10, limit=10),
    Job(2, submit=1, procs=2, run=10, limit=10),
    Job(3, submit=2, procs=4, run=1, limit=1),
    Job(4, submit=3, procs=1, run=30, limit=30),
]


def test_conservative_protects_every_reserved_job_easy_only_the_first() -> None:
    # Job 2 is promised 10-20 (2 procs). Under easy, job 4 (1 proc, 30 s) fits around it at
    # 3 and job 3 (all 4) then waits for job 4's end at 33. Under conservative with depth 2,
    # job 3 is promised 20-21 too, job 4 would cross it, and waits until 21.
    assert starts(CROWD, 4, "easy") == {1: 0, 2: 10, 3: 33, 4: 3}
    assert starts(CROWD, 4, "conservative", depth=1) == starts(CROWD, 4, "easy")
    assert starts(CROWD, 4, "conservative", depth=2) == {1: 0, 2: 10, 3: 20, 4: 21}


# --- properties ---------------------------------------------------------------------------

POOL = 8


@st.composite
def traces(draw: st.DrawFn, count: int = 12) -> list[Job]:
    jobs = []
    for i in range(1, draw(st.integers(1, count)) + 1):
        run = draw(st.integers(0, 20))
        jobs.append(
            Job(
                id=i,
                submit=draw(st.integers(0, 30)),
                procs=draw(st.integers(1, POOL)),
                run=run,
                limit=run + draw(st.integers(0 if run else 1, 10)),
            )
        )
    return jobs


MODES = st.sampled_from(["none", "easy", "conservative"])


@settings(max_examples=300, deadline=None)
@given(traces(), MODES, st.integers(1, 4))
def test_every_job_starts_after_its_submission_and_the_pool_never_overflows(
    jobs: list[Job], mode: Mode, depth: int
) -> None:
    got = simulate(jobs, POOL, mode, depth).starts
    assert set(got) == {j.id for j in jobs}
    assert all(got[j.id] >= j.submit for j in jobs)
    for t in got.values():
        assert sum(j.procs for j in jobs if got[j.id] <= t < got[j.id] + j.run) <= POOL


@settings(max_examples=300, deadline=None)
@given(traces())
def test_without_backfill_jobs_start_in_queue_order(jobs: list[Job]) -> None:
    got = simulate(jobs, POOL, "none").starts
    ordered = [got[j.id] for j in sorted(jobs, key=lambda j: j.submit)]
    assert ordered == sorted(ordered)


@settings(max_examples=300, deadline=None)
@given(traces())
def test_under_easy_a_reserved_job_starts_no_later_than_first_promised(jobs: list[Job]) -> None:
    outcome = simulate(jobs, POOL, "easy")
    assert all(outcome.starts[i] <= when for i, when in outcome.promised.items())


def test_a_job_larger_than_the_pool_is_refused() -> None:
    with pytest.raises(ValueError, match="job 7: 9 processors, the pool has 8"):
        simulate([Job(7, 0, 9, 1, 1)], POOL)


# --- shoal against the reference ------------------------------------------------------------


def shoal_starts(jobs: list[Job], procs: int, mode: Mode, depth: int) -> dict[int, float]:
    """Each job as one task of `procs` cpus on a single node of the pool's size."""
    arrivals = [
        Arrival(id=j.id, submit=j.submit, duration=j.run, procs=j.procs, time_limit=j.limit) for j in jobs
    ]
    policy = Policy(queues={"default": QueuePolicy(order="fifo", backfill=mode, depth=depth)})
    report = run_simulation(Workload(arrivals), Cluster(nodes=1, cpus=procs, mem=1024), policy)
    assert report.failed == 0
    return {r.id: r.start for r in report.runs}


@settings(max_examples=60, deadline=None)
@given(traces(count=30), MODES, st.integers(1, 4))
def test_shoal_starts_every_job_when_the_reference_does(jobs: list[Job], mode: Mode, depth: int) -> None:
    assert shoal_starts(jobs, POOL, mode, depth) == starts(jobs, POOL, mode, depth)


@pytest.mark.parametrize("mode", ["none", "easy", "conservative"])
def test_shoal_agrees_on_the_cases_worked_by_hand(mode: Mode) -> None:
    for jobs, procs in ((EXTRA, 10), (CROWD, 4)):
        assert shoal_starts(jobs, procs, mode, 2) == starts(jobs, procs, mode, 2)
