"""The owners' index lists each owner's jobs newest first, as a walk through every job
would, while jobs come and go (pruned) between its reads."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from shoal.master.owners import Owners
from shoal.model import JobRecord, JobSpec

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
