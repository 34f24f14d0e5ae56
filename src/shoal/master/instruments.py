"""What the master counts as it goes, for its metrics (`shoal.master.metrics` serves them).

The core keeps no metrics: `MasterState` only counts its scheduling cycles (`cycles`), and
the ledger calls its watchers after every transition. `Instruments.handle` stands in for
`MasterState.handle` in the shell's dispatch and notes, around it:

- a dispatch that ran a scheduling cycle: how long it took, and how many tasks of native
  jobs it assigned (the cycle's placements, and a move's target taken in the same turn);
  the time is the whole dispatch's, the events of its batch included: the cycle itself
  reads no clock, and a batch that runs one is mostly that cycle;
- offers made (from the commands that carry them to frameworks) and offers declined (the
  outstanding offers a DECLINE names, looked up before the desk drops them);
- migrations started, by why (`MIGRATION_REASONS`: a few fixed words, never the free text
  the record keeps) and the task's mode, from the records a dispatch persists;
- tasks that entered each state: from the ledger's watcher, which sees a task move, and,
  for `pending`, the tasks of the jobs a dispatch added, which are made pending rather than
  moved there (found by the ledger's next job id, so a dispatch pays one comparison).

What the ledger can tell cheaply when asked (pending tasks, by job; nodes and their
heartbeats) is not counted here but read at scrape time. Tasks holding room (assigned,
running) are counted here, by queue and state, as they change: a scrape walking 50,000 of
them would cost more than all the increments between two scrapes.
Plain integers and dicts, and three histograms (prometheus_client's, in no registry: the
app's collector yields them), so a dispatch pays a few increments.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterable
from contextlib import AbstractContextManager

from prometheus_client import Histogram
from prometheus_client.metrics_core import Metric

from shoal.framework import protocol as fp
from shoal.master.events import Command, Event, FrameworkCall, OffersMade, Persist, ToFramework
from shoal.master.state import MasterState
from shoal.model import JobRecord, Migration, TaskRecord, TaskState

# Why a task was moved, as a metric's label: the moves desk's reasons, by what they start with
# or say (see shoal.core.rebalance and shoal.master.moves); anything else is "other".
MIGRATION_REASONS = ("drain", "drain_deadline", "hot_node", "new_capacity", "consolidation", "other")

_CYCLE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
_PLACED_BUCKETS = (0, 1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10_000, 50_000)
_WRITE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


def migration_reason(reason: str) -> str:
    """The label of a migration's free-text reason."""
    if reason == "drain":
        return "drain"
    if reason == "drain deadline":
        return "drain_deadline"
    if "over the mean" in reason:
        return "hot_node"
    if "new capacity" in reason:
        return "new_capacity"
    if reason.startswith("emptying"):
        return "consolidation"
    return "other"


class Instruments:
    """The counters and histograms of one master's ledger, fed by its dispatch."""

    def __init__(self, state: MasterState) -> None:
        self.state = state
        self.transitions: Counter[str] = Counter()  # tasks that entered each state
        # Tasks holding room now, by queue and state (assigned, running): kept by the watcher,
        # which sees every change of a task's state, rather than walked at every scrape.
        self.placed: Counter[tuple[str, TaskState]] = Counter(
            (state.ledger.jobs[t.job_id].spec.queue, t.state) for t in state.ledger.active_tasks()
        )
        self.migrations: Counter[tuple[str, str]] = Counter()  # (reason label, mode) -> moves begun
        self.offers_made = 0
        self.offers_declined = 0
        self._assigned = 0  # tasks of native jobs assigned to a node, ever
        self._newest_move = max(state.ledger.migrations, default=0)  # the last migration counted
        self.cycle_seconds = Histogram(
            "shoal_schedule_cycle_seconds",
            "Time of a dispatch that ran a scheduling cycle (the events of its batch included).",
            buckets=_CYCLE_BUCKETS,
            registry=None,
        )
        self.placements = Histogram(
            "shoal_schedule_placements",
            "Tasks of native jobs a scheduling cycle assigned to nodes.",
            buckets=_PLACED_BUCKETS,
            registry=None,
        )
        self.store_writes = Histogram(
            "shoal_store_write_seconds",
            "Time of one write of the ledger's changes to the store (a transaction, fsync included).",
            buckets=_WRITE_BUCKETS,
            registry=None,
        )
        state.ledger.watch(self._transitioned)

    def handle(self, *events: Event) -> list[Command]:
        """`MasterState.handle(*events)`, timed and counted."""
        state = self.state
        framed = bool(state.frameworks.frameworks)  # no framework: no offer to look for
        declining = _declining(state, events) if framed else ()
        cycles, assigned, next_job = state.cycles, self._assigned, state.ledger.next_job_id
        began = time.perf_counter()
        commands = state.handle(*events)
        if state.cycles != cycles:
            self.cycle_seconds.observe(time.perf_counter() - began)
            self.placements.observe(self._assigned - assigned)
        if state.ledger.next_job_id != next_job:
            self._added(next_job)
        if commands and isinstance(first := commands[0], Persist) and first.migrations:
            self._moves_begun(first.migrations)
        if declining:
            offers = state.frameworks.offers
            self.offers_declined += sum(1 for o in declining if o not in offers)  # the call took them
        if state.frameworks.frameworks:  # one may have subscribed in these events
            self.offers_made += sum(
                len(c.event.offers)
                for c in commands
                if isinstance(c, ToFramework) and isinstance(c.event, OffersMade)
            )
        return commands

    def writing(self) -> AbstractContextManager[object]:
        """Times a write to the store: `with instruments.writing(): store.apply(...)`."""
        return self.store_writes.time()

    def histograms(self) -> Iterable[Metric]:
        for histogram in (self.cycle_seconds, self.placements, self.store_writes):
            yield from histogram.collect()

    def _transitioned(self, task: TaskRecord, job: JobRecord, was: TaskState, now: float) -> None:
        to = task.state
        self.transitions[to.value] += 1
        if was.active:
            self.placed[(job.spec.queue, was)] -= 1
        if to.active:
            self.placed[(job.spec.queue, to)] += 1
            if to is TaskState.ASSIGNED and job.framework is None:
                self._assigned += 1

    def _added(self, first: int) -> None:
        """The jobs added from id `first` on: each of their tasks entered pending."""
        ledger = self.state.ledger
        jobs = (ledger.jobs.get(job_id) for job_id in range(first, ledger.next_job_id))
        self.transitions[TaskState.PENDING.value] += sum(job.spec.count for job in jobs if job is not None)

    def _moves_begun(self, records: Iterable[Migration]) -> None:
        newest = self._newest_move
        for record in records:
            if record.id > self._newest_move:  # a new one, not an update of one counted
                self.migrations[(migration_reason(record.reason), record.mode.value)] += 1
                newest = max(newest, record.id)
        self._newest_move = newest


def _declining(state: MasterState, events: Iterable[Event]) -> set[str]:
    """The outstanding offers that the DECLINE calls among `events` name, each of its own
    framework: those the calls are found to have dropped were declined."""
    offers = state.frameworks.offers
    named: set[str] = set()
    for event in events:
        if isinstance(event, FrameworkCall) and isinstance(event.call, fp.Decline):
            named.update(
                o
                for o in event.call.offer_ids
                if (offer := offers.get(o)) is not None and offer.framework == event.framework_id
            )
    return named
