"""Job history, as Slurm's sacct: the work that has ended, as the ledger still holds it. Pure.

A row (`views.HistoryEntry`) is one task in an end state, as its last run left it: where it
ran, when it started and ended, how (its state, the status it exited with or the signal that
ended it), what it used (CPU time and peak memory, as its agent measured them when the run
ended) and how many times it ran. A task granted another run is not in an end state, so it
is listed once it has ended for good; the tasks of a job still under way are listed as each
ends.

History is what the ledger holds, no more: a finished job is forgotten with its tasks
`Retention.age` seconds after it ended, or once `Retention.count` finished jobs are newer
(the master's `job_retention` and `job_retention_count`), and leaves the history then.
There is no second store to ask.

Order and paging. Jobs newest first, a job's tasks in index order (the orders of `shoal jobs`
and `shoal job`), which needs no sorting: a page costs what it looks at. A page ends when it
holds `limit` rows, or when it has looked at `scan` tasks (a job passed over whole, as its
submission after `until` allows, counts as one), so that a filter matching little never
walks the whole ledger in one call; `next` then names the last task looked at, and the page
asked `after` it goes on from there. A cursor stays good while work ends and jobs are
forgotten: newer jobs come before it, forgotten ones are passed over.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import dropwhile
from typing import Literal

from shoal.master.ledger import Ledger
from shoal.master.listings import listings_of
from shoal.master.shapes import task_id
from shoal.model import TERMINAL, JobRecord, TaskRecord, TaskState
from shoal.views import HistoryEntry, HistoryPage

LIMIT = 1000  # rows a page holds at most
SCAN = 20_000  # tasks a page looks at, at most (a few milliseconds)

EndState = Literal["finished", "failed", "killed", "lost", "preempted", "migrated"]
CURSOR = r"^[0-9]{1,18}\.[0-9]{1,6}$"  # JOB.INDEX: the last task a page looked at


@dataclass(frozen=True, slots=True)
class Query:
    """Which ended tasks to list; None: any."""

    owner: str | None = None  # whose jobs (the API principal that submitted them)
    states: frozenset[TaskState] = TERMINAL
    since: float | None = None  # ended at or after this Unix time
    until: float | None = None  # ended before this Unix time
    node: str | None = None  # whose last run was on this node

    def admits(self, task: TaskRecord) -> bool:
        ended = task.finished_at
        return (
            task.state in self.states
            and task.state.terminal
            and (self.node is None or task.node == self.node)
            and (self.since is None or (ended is not None and ended >= self.since))
            and (self.until is None or (ended is not None and ended < self.until))
        )

    def may_hold(self, job: JobRecord) -> bool:
        """Whether any task of `job` may be admitted: none ends before its job was submitted."""
        return self.until is None or job.submitted_at < self.until


def page(
    ledger: Ledger,
    query: Query,
    after: tuple[int, int] | None = None,
    limit: int = LIMIT,
    scan: int = SCAN,
) -> HistoryPage:
    """The ended tasks `query` admits, newest jobs first, from the task after `after` (a job
    id and a task index; None: from the newest job), at most `limit` of them, looking at no
    more than `scan` tasks, a job passed over whole counting as one (see the module)."""
    entries: list[HistoryEntry] = []
    looked = 0
    for job in _jobs(ledger, query.owner, after):
        first = after[1] + 1 if after is not None and job.id == after[0] else 0
        last = job.spec.count - 1
        if first > last:
            continue  # the job the cursor is in, done
        if not query.may_hold(job):
            looked += 1  # passed over whole
        else:
            for index in range(first, job.spec.count):
                task = ledger.tasks.get(task_id(job.id, index))
                looked += 1
                if task is not None and query.admits(task):
                    entries.append(entry(job, task))
                if len(entries) >= limit or looked >= scan:
                    last = index
                    break
        if len(entries) >= limit or looked >= scan:
            return HistoryPage(entries=entries, next=f"{job.id}.{last}")
    return HistoryPage(entries=entries)


def _jobs(ledger: Ledger, owner: str | None, after: tuple[int, int] | None) -> Iterator[JobRecord]:
    """The jobs to look at, newest first: `owner`'s (None: everyone's), from `after`'s job on."""
    jobs = ledger.jobs
    newest = reversed(jobs.values()) if owner is None else listings_of(ledger).owners.newest(jobs, owner)
    return newest if after is None else dropwhile(lambda job: job.id > after[0], newest)


def parse_cursor(cursor: str) -> tuple[int, int]:
    """`JOB.INDEX` (as `CURSOR` matches) as a job id and a task index."""
    job, _, index = cursor.partition(".")
    return int(job), int(index)


def entry(job: JobRecord, task: TaskRecord) -> HistoryEntry:
    """`task` of `job`, ended, as history lists it."""
    code = task.exit_code
    return HistoryEntry(
        job_id=job.id,
        name=job.spec.name,
        task_id=task.id,
        index=task.index,
        owner=job.owner,
        run_as=job.spec.user,
        queue=job.spec.queue,
        node=task.node,
        submitted_at=job.submitted_at,
        started_at=task.started_at,
        finished_at=task.finished_at,
        state=task.state,
        exit_code=code if code is None or code >= 0 else None,
        signal=signal_name(-code) if code is not None and code < 0 else None,
        cpu_seconds=task.cpu_seconds,
        peak_mem=task.peak_mem,
        attempts=len(task.history) + (task.node is not None),
        message=task.message,
    )


def signal_name(number: int) -> str:
    """SIGKILL for 9; a number without a name (a real-time signal) as `signal 40`."""
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"
