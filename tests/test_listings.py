"""The owners' index lists each owner's jobs newest first, as a walk through every job
would, while jobs come and go (pruned) between its reads; a kept summary is the one made
afresh, whatever changed since it was kept; a page asked of an owner, a state and a queue
is that page of the summaries that match, made afresh."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from shoal.master.ledger import Ledger
from shoal.master.listings import JobQuery, Listings, Owners, Summaries
from shoal.model import JobRecord, JobSpec, JobState, TaskRecord, TaskState
from shoal.views import JobView

OWNERS = ["alice", "bob", "carol"]
SPEC = JobSpec(command=["true"])

steps = st.lists(
    st.one_of(
        st.tuples(st.just("add"), st.sampled_from(OWNERS), st.integers(1, 5)),
        st.tuples(st.just("prune"), st.integers(0, 1000), st.integers(1, 8)),
        st.tuples(st.just("read"), st.sampled_from(OWNERS), st.integers(0, 30)),
    ),
    max_size=60,
)


@given(steps, st.integers(0, 6))
def test_an_owners_jobs_come_newest_first_as_a_walk_through_all_gives(steps: list, slack: int) -> None:
    jobs: dict[int, JobRecord] = {}
    index = Owners(slack=slack)
    next_id = 1
    for kind, a, b in steps:
        if kind == "add":
            for _ in range(b):
                jobs[next_id] = JobRecord(id=next_id, owner=a, spec=SPEC, submitted_at=0.0)
                next_id += 1
        elif kind == "prune" and jobs:
            ids = sorted(jobs)
            for job_id in ids[a % len(ids) :][:b]:
                del jobs[job_id]
        else:
            walked = [j.id for j in reversed(jobs.values()) if j.owner == a]
            assert [j.id for j in index.newest(jobs, a)][:b] == walked[:b]


@given(
    st.lists(
        st.tuples(
            st.integers(0, 9),  # the job
            st.integers(0, 3),  # its task
            st.sampled_from(list(TaskState)),
            st.booleans(),  # the job killed
        ),
        max_size=80,
    ),
    st.integers(0, 3),
)
def test_a_kept_summary_is_the_summary_made_afresh_as_tasks_change(changes: list, slack: int) -> None:
    jobs = {
        i: JobRecord(
            id=i, owner=OWNERS[i % 3], spec=SPEC.model_copy(update={"name": f"j{i}"}), submitted_at=i
        )
        for i in range(10)
    }
    # Jobs 0 and 5 have more tasks than Summaries tells apart by their states: it counts them.
    # Those beyond the four that change have finished, so the four can end the job.
    sizes = {i: 12 if i % 5 == 0 else 1 + i % 4 for i in jobs}
    tasks = {
        i: [
            TaskRecord(
                id=f"{i}.{t}", job_id=i, index=t, state=TaskState.FINISHED if t > 3 else TaskState.PENDING
            )
            for t in range(sizes[i])
        ]
        for i in jobs
    }
    summaries = Summaries(slack=slack)
    for job_id, index, state, killed in changes:
        if job_id not in jobs:
            continue
        task = tasks[job_id][index % len(tasks[job_id])]
        task.state = state
        jobs[job_id].killed = killed
        if index == 3 and len(jobs) > 1:  # pruned: gone from the jobs there are
            del jobs[job_id]
            continue
        fresh = JobView.summary(jobs[job_id], tasks[job_id]).model_dump_json().encode()
        assert summaries.encoded(jobs, jobs[job_id], tasks[job_id]) == fresh


def test_a_large_job_killed_once_all_its_tasks_ended_is_summarized_afresh() -> None:
    job = JobRecord(id=1, owner="alice", spec=SPEC, submitted_at=0.0)
    tasks = [TaskRecord(id=f"1.{t}", job_id=1, index=t, state=TaskState.FINISHED) for t in range(20)]
    summaries = Summaries()
    assert b'"state":"complete"' in summaries.encoded({1: job}, job, tasks)
    job.killed = True  # the same counts of states: only the kill tells the summaries apart
    assert b'"state":"killed"' in summaries.encoded({1: job}, job, tasks)


@given(
    st.lists(
        st.tuples(
            st.sampled_from(OWNERS),
            st.sampled_from(["default", "batch"]),
            st.lists(st.sampled_from(list(TaskState)), min_size=1, max_size=3),  # its tasks' states
            st.booleans(),  # killed
        ),
        max_size=25,
    ),
    st.lists(
        st.tuples(
            st.sampled_from([None, *OWNERS]),
            st.sampled_from([None, *JobState]),
            st.sampled_from([None, "default", "batch", "none"]),
            st.integers(0, 12),  # offset
            st.integers(1, 12),  # limit
        ),
        min_size=1,
        max_size=6,
    ),
)
def test_a_filtered_page_is_that_page_of_the_matching_summaries_made_afresh(jobs: list, asks: list) -> None:
    records, tasks = [], []
    for i, (owner, queue, states, killed) in enumerate(jobs, start=1):
        spec = SPEC.model_copy(update={"queue": queue, "count": len(states)})
        records.append(JobRecord(id=i, owner=owner, spec=spec, submitted_at=i, killed=killed))
        tasks += [TaskRecord(id=f"{i}.{t}", job_id=i, index=t, state=s) for t, s in enumerate(states)]
    ledger = Ledger(jobs=records, tasks=tasks)
    listings = Listings()
    for owner, state, queue, offset, limit in asks:
        summaries = [JobView.summary(job, ledger.tasks_of(job.id)) for job in reversed(records)]
        matching = [
            v.model_dump(mode="json")
            for v in summaries
            if owner in (None, v.owner) and state in (None, v.state) and queue in (None, v.spec.queue)
        ]
        page = listings.page(ledger, JobQuery(owner, state, queue), offset, limit)
        assert json.loads(page) == matching[offset : offset + limit]
