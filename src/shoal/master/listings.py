"""What `GET /v1/jobs` reads instead of every job: each owner's jobs, newest first, and
each job's summary as JSON. Pure.

A listing asked of jobs in one state or one queue (`JobQuery`) reads the jobs, or the
owner's, newest first, until its page is full: a job's state comes from its tasks' and is
never kept, so such a page may read every job the master keeps (bounded by retention).

`Owners` lets a user's page skip everyone else's jobs. It follows a ledger's jobs (a dict
in id order, as jobs are added) from what the dict holds, never told of a change. Jobs only
come with ids above every id before them, so the new ones are those at the end of the dict
past the last one indexed. Jobs go (pruned) from anywhere: an id found gone is passed over,
and the index is made afresh once it holds more than twice as many ids as there are jobs,
so what it keeps stays in proportion.

`Summaries` keeps each job's summary encoded: a page is mostly job specs, which never change
once submitted, and encoding them is most of a page's cost. A summary changes only with the
job's tasks' states (and whether it was killed), so it is encoded again only then. What it
keeps stays in proportion to the jobs as the owners' index does.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import islice

from shoal.master.ledger import Ledger
from shoal.model import JobRecord, JobState, TaskRecord, job_state
from shoal.views import JobView, tally

SLACK = 1000  # ids gone the index may hold beyond the jobs' own number before it is made afresh
STATES_LISTED = 8  # tasks of a job whose states, rather than their counts, tell its summary's changes


class Owners:
    def __init__(self, slack: int = SLACK) -> None:
        self.slack = slack
        self._owned: dict[str, list[int]] = {}  # owner -> ids of its jobs, oldest first
        self._last = 0  # the largest id indexed
        self._held = 0  # ids indexed, gone ones too

    def newest(self, jobs: dict[int, JobRecord], owner: str) -> Iterator[JobRecord]:
        """`owner`'s jobs of `jobs`, newest first."""
        self._catch_up(jobs)
        for job_id in reversed(self._owned.get(owner, ())):
            job = jobs.get(job_id)
            if job is not None:
                yield job

    def _catch_up(self, jobs: dict[int, JobRecord]) -> None:
        if self._held > 2 * len(jobs) + self.slack:
            self._owned, self._last, self._held = {}, 0, 0
        new = []
        for job_id in reversed(jobs):
            if job_id <= self._last:
                break
            new.append(job_id)
        for job_id in reversed(new):
            self._owned.setdefault(jobs[job_id].owner, []).append(job_id)
        if new:
            self._last = new[0]
            self._held += len(new)


def _made_of(job: JobRecord, tasks: list[TaskRecord]) -> tuple[object, ...]:
    """What of a job its summary shows that may change: whether it was killed and its tasks'
    states; of a job of a few tasks, the states as they are, which is cheaper than counting
    them (a page of twenty asks this of twenty jobs)."""
    if len(tasks) <= STATES_LISTED:
        return (job.killed, *[t.state for t in tasks])
    return (job.killed, *tally(tasks).items())


class Summaries:
    def __init__(self, slack: int = SLACK) -> None:
        self.slack = slack
        self._kept: dict[int, tuple[tuple[object, ...], bytes]] = {}  # job id -> (_made_of, JSON)

    def encoded(self, jobs: dict[int, JobRecord], job: JobRecord, tasks: list[TaskRecord]) -> bytes:
        """`JobView.summary(job, tasks)` as JSON; `jobs`: all the jobs there are."""
        key = _made_of(job, tasks)
        kept = self._kept.get(job.id)
        if kept is not None and kept[0] == key:
            return kept[1]
        if len(self._kept) > 2 * len(jobs) + self.slack:
            self._kept = {job_id: kept for job_id, kept in self._kept.items() if job_id in jobs}
        data = JobView.summary(job, tasks).model_dump_json().encode()
        self._kept[job.id] = (key, data)
        return data


@dataclass(frozen=True, slots=True)
class JobQuery:
    """Which jobs a listing holds: an owner's, in a state, in a queue (None: any)."""

    owner: str | None = None
    state: JobState | None = None
    queue: str | None = None


@dataclass(slots=True)
class Listings:
    owners: Owners = field(default_factory=Owners)
    summaries: Summaries = field(default_factory=Summaries)

    def page(self, ledger: Ledger, query: JobQuery, offset: int, limit: int) -> bytes:
        """A page of `GET /v1/jobs` as its JSON array: `limit` jobs from `offset`, newest
        first, of those `query` holds."""
        jobs = ledger.jobs
        seen = reversed(jobs.values()) if query.owner is None else self.owners.newest(jobs, query.owner)
        if (queue := query.queue) is not None:
            seen = (job for job in seen if job.spec.queue == queue)
        if (state := query.state) is not None:
            seen = (job for job in seen if job_state(job, ledger.tasks_of(job.id)) is state)
        shown = islice(seen, offset, offset + limit)
        encoded = self.summaries.encoded
        return b"[" + b",".join(encoded(jobs, job, ledger.tasks_of(job.id)) for job in shown) + b"]"


_LISTINGS: weakref.WeakKeyDictionary[Ledger, Listings] = weakref.WeakKeyDictionary()


def listings_of(ledger: Ledger) -> Listings:
    """The indexes of `ledger`'s jobs (made at the first call, gone with the ledger)."""
    listings = _LISTINGS.get(ledger)
    if listings is None:
        listings = _LISTINGS[ledger] = Listings()
    return listings
