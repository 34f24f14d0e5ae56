"""Each owner's jobs, newest first: a user's page of `GET /v1/jobs` without a walk through
everyone else's jobs. Pure.

The index follows a ledger's jobs (a dict in id order, as jobs are added) from what the dict
holds, never told of a change. Jobs only come with ids above every id before them, so the
new ones are those at the end of the dict past the last one indexed. Jobs go (pruned) from
anywhere: an id found gone is passed over, and the index is made afresh once it holds more
than twice as many ids as there are jobs, so what it keeps stays in proportion.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator

from shoal.model import JobRecord

SLACK = 1000  # ids gone the index may hold beyond the jobs' own number before it is made afresh


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


_INDEXES: weakref.WeakKeyDictionary[object, Owners] = weakref.WeakKeyDictionary()


def owners_of(ledger: object) -> Owners:
    """The index of `ledger`'s jobs (made at the first call, gone with the ledger)."""
    index = _INDEXES.get(ledger)
    if index is None:
        index = _INDEXES[ledger] = Owners()
    return index
