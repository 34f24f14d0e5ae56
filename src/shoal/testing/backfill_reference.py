"""A reference backfill simulator: rigid jobs on one pool of processors, written plainly.

The oracle shoal's scheduler is checked against (tests and `bench/sim_trace.py`); it shares
no code with shoal. The rules:

- Events: at each instant, every job that ends then (start + run) and every submission at
  that time are taken in first, then one scheduling pass runs. A pass may start jobs that
  run 0 s: they end at once and another pass runs at the same instant.
- The queue is in submission order, ties in input order.
- A running job is expected to end at start + limit (its actual run is not known).
- The profile is the free processors as a step function of time from now: the free ones
  now, each running job's released at its expected end, less what this pass has started
  (held over [now, now + limit)) and its reservations (held over [T, T + limit)). A job of
  p processors and limit l fits at t when free(τ) >= p for every τ in [t, t + l).
- none: jobs start in order while each fits now; the first that does not ends the pass.
- easy: in order, a job that fits now starts; the first that does not gets a reservation
  at the earliest time it fits; every later job starts if it fits now, around it.
- conservative: as easy, but each of the first `depth` jobs that do not fit gets a
  reservation, in order, each against the profile holding the earlier ones.
"""

from __future__ import annotations

import bisect
import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

Mode = Literal["none", "easy", "conservative"]


@dataclass(frozen=True, slots=True)
class Job:
    id: int
    submit: float
    procs: int
    run: float
    limit: float

    def __post_init__(self) -> None:
        if not (0 <= self.run <= self.limit and 0 < self.limit < math.inf):
            raise ValueError(f"job {self.id}: needs 0 <= run <= limit < inf and limit > 0")
        if self.procs < 1:
            raise ValueError(f"job {self.id}: needs at least one processor")


@dataclass
class Outcome:
    starts: dict[int, float] = field(default_factory=dict)  # job id -> when it started
    promised: dict[int, float] = field(default_factory=dict)  # job id -> its first reservation


class Profile:
    """Free processors from `now` on: `free[k]` over [times[k], times[k + 1]), the last
    step lasting for ever."""

    def __init__(self, now: float, free_now: int, releases: Sequence[tuple[float, int]]) -> None:
        self.times = [now]
        self.free = [free_now]
        for when, procs in sorted(releases):
            if when > self.times[-1]:
                self.times.append(when)
                self.free.append(self.free[-1])
            self.free[-1] += procs

    def earliest(self, procs: int, limit: float) -> float:
        """The earliest time at which `procs` fit for `limit`: now or a step's start."""
        begin: float | None = None
        for k in range(len(self.times)):
            if self.free[k] < procs:
                begin = None
                continue
            if begin is None:
                begin = self.times[k]
            if k + 1 == len(self.times) or self.times[k + 1] >= begin + limit:
                return begin
        raise AssertionError("the last step frees every processor: something always fits")

    def fits_now(self, procs: int, limit: float) -> bool:
        end = self.times[0] + limit
        for when, free in zip(self.times, self.free, strict=True):
            if when >= end:
                return True
            if free < procs:
                return False
        return True

    def hold(self, start: float, procs: int, limit: float) -> None:
        """Take `procs` over [start, start + limit)."""
        first = self._step_at(start)
        last = self._step_at(start + limit)
        for k in range(first, last):
            self.free[k] -= procs

    def _step_at(self, when: float) -> int:
        """The index of the step starting at `when`, splitting a step there if need be."""
        k = bisect.bisect_left(self.times, when)
        if k < len(self.times) and self.times[k] == when:
            return k
        self.times.insert(k, when)
        self.free.insert(k, self.free[k - 1])
        return k


class _Pool:
    def __init__(self, procs: int, mode: Mode, depth: int) -> None:
        self.procs = procs
        self.reservations = {"none": 0, "easy": 1, "conservative": depth}[mode]
        self.mode = mode
        self.queue: list[Job] = []
        self.running: list[tuple[Job, float]] = []  # (job, start)
        self.outcome = Outcome()

    def end_jobs(self, now: float) -> None:
        self.running = [(job, start) for job, start in self.running if start + job.run > now]

    def next_end(self) -> float:
        return min((start + job.run for job, start in self.running), default=math.inf)

    def schedule(self, now: float) -> list[Job]:
        """One pass; returns the jobs it started."""
        busy = sum(job.procs for job, _ in self.running)
        releases = [(start + job.limit, job.procs) for job, start in self.running]
        profile = Profile(now, self.procs - busy, releases)
        started: list[Job] = []
        reserved = 0
        for job in self.queue:
            if profile.fits_now(job.procs, job.limit):
                profile.hold(now, job.procs, job.limit)
                started.append(job)
            elif self.mode == "none":
                break
            elif reserved < self.reservations:
                when = profile.earliest(job.procs, job.limit)
                profile.hold(when, job.procs, job.limit)
                self.outcome.promised.setdefault(job.id, when)
                reserved += 1
        for job in started:
            self.queue.remove(job)
            self.running.append((job, now))
            self.outcome.starts[job.id] = now
        return started


def simulate(jobs: Sequence[Job], procs: int, mode: Mode = "easy", depth: int = 1) -> Outcome:
    """When each job starts on a pool of `procs` processors under `mode` backfill."""
    for job in jobs:
        if job.procs > procs:
            raise ValueError(f"job {job.id}: {job.procs} processors, the pool has {procs}")
    arrivals = deque(sorted(jobs, key=lambda j: j.submit))  # stable: ties in input order
    pool = _Pool(procs, mode, depth)
    while arrivals or pool.running:
        now = min(arrivals[0].submit if arrivals else math.inf, pool.next_end())
        while True:
            pool.end_jobs(now)
            while arrivals and arrivals[0].submit <= now:
                pool.queue.append(arrivals.popleft())
            if not any(job.run == 0 for job in pool.schedule(now)):
                break
    assert not pool.queue, "an empty pool starts the head of the queue"
    return pool.outcome
