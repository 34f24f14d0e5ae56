"""The event stream's log: every change the ledger makes, as events with an index. Pure.

An event is one record changed (or gone) under a topic: a job, a task, a node, a
framework, a migration, a registered service, or something not in the ledger that people
follow as well (offers made, audit records, services' endpoints changed). Each is encoded
once, as the server-sent-events frame every subscriber gets, when it is appended. A job's
tasks are pending from the job's own event on (the ledger makes them with it); their
`tasks` events are their changes after that.

An event on a node names it (`node`); a task's event that took it off a node (lost, moved,
preempted, run again elsewhere) names that one too (`left`), so a stream of that node sees
the task go. The log knows which node each active task was on from its events (`Known`),
and from the ledger for those it had none of (`Known.learn`).

The log keeps the newest `capacity` events in a ring, fewer when their frames come to more
than `max_bytes` (the newest always, however large). A subscriber reads from the index
after the last one it had; one that asks for an index the ring no longer holds is told
which is the oldest it does hold (`Gone`), never handed a stream with a hole in it.

Indexes grow by one per event and start, when a master starts, from a base above any index
an earlier master gave (the shell passes the clock in microseconds): a client resuming from
an index of the master before a restart or a failover is told that index is gone, and
lists afresh, rather than missing what changed meanwhile.

Who sees what: an event of a job (its job, its tasks, offers and migrations aside) carries
the job's owner; a user's stream holds only their own jobs' events and the cluster's nodes
and services. A job's removal carries its owner too: the ledger has let the job go by then,
so the log keeps each job's owner (`Known`) until its removal. Frameworks and offers are
for admins and readers, audit records for admins (as `GET /v1/audit`: the stream route
leaves the topic out for anyone else).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from shoal.master.events import Persist
from shoal.model import JobRecord, TaskRecord
from shoal.sse import TOPICS

PUBLIC = frozenset({"nodes", "services"})  # topics a user sees whole: the cluster's own
CAPACITY = 65_536  # events the log keeps, at most
# Bytes of frames the log keeps, at most: room for CAPACITY events of 2 KiB, three times what a
# job's or a task's event takes, while a few jobs whose specs come near the 4 MiB a request
# may hold (max_body), each with an event at every change, would otherwise keep gigabytes.
MAX_BYTES = 128 << 20


@dataclass(frozen=True, slots=True)
class Event:
    index: int
    topic: str
    job: int | None  # the job it is of, if any
    node: str | None  # the node it is on, if any
    left: str | None  # the node a task left with this change, if any
    owner: str | None  # the job's owner: a user sees only their own
    frame: bytes  # as sent: "id: <index>\nevent: <topic>\ndata: <json>\n\n"


@dataclass(frozen=True, slots=True)
class Filter:
    """Which events a subscriber gets. `user`: only that user's jobs' events (and the public
    topics); None for admins and readers, who see all."""

    topics: frozenset[str] = frozenset(TOPICS)
    job: int | None = None
    node: str | None = None
    user: str | None = None

    def admits(self, event: Event) -> bool:
        if event.topic not in self.topics:
            return False
        if self.job is not None and event.job != self.job:
            return False
        if self.node is not None and self.node != event.node and self.node != event.left:
            return False
        if self.user is None:
            return True
        return event.owner == self.user if event.owner is not None else event.topic in PUBLIC


class Gone(Exception):
    """The index asked for is no longer (or never was) in this master's log."""

    def __init__(self, asked: int, oldest: int, room: str) -> None:
        super().__init__(
            f"event {asked} is not in this master's stream, which holds the events after "
            f"{oldest - 1} (the newest since it started or took over, {room}): resume after "
            f"{oldest - 1} for what it holds, or list afresh and follow from now"
        )
        self.asked = asked
        self.oldest = oldest


class EventLog:
    def __init__(self, base: int, capacity: int = CAPACITY, max_bytes: int = MAX_BYTES) -> None:
        self.capacity = capacity
        self.max_bytes = max_bytes
        self._ring: list[Event | None] = [None] * capacity
        self.first = base + 1  # the index of the oldest event kept
        self.next = base + 1  # the index the next event gets
        self.bytes = 0  # of the frames kept

    @property
    def last(self) -> int:
        """The index of the newest event (the base while there is none)."""
        return self.next - 1

    def append(
        self,
        topic: str,
        kind: str,
        record: object,
        at: float,
        *,
        job: int | None = None,
        node: str | None = None,
        left: str | None = None,
        owner: str | None = None,
    ) -> Event:
        """Add an event: `kind` ("changed", "removed", ...) of `record`, a JSON value or the
        bytes of one (encoded already: a record the store encodes is not encoded twice)."""
        index = self.next
        data = record if isinstance(record, bytes) else json.dumps(record, separators=(",", ":")).encode()
        fields = {"index": index, "topic": topic, "type": kind, "at": at, "job": job, "node": node}
        if left is not None:  # rare: not a field of every frame
            fields["left"] = left
        head = json.dumps(fields, separators=(",", ":")).encode()
        frame = b'id: %d\nevent: %s\ndata: %s,"record":%s}\n\n' % (index, topic.encode(), head[:-1], data)
        event = Event(index, topic, job, node, left, owner, frame)
        if index - self.first == self.capacity:  # full: the oldest's slot is the new one's
            self._drop_oldest()
        self._ring[index % self.capacity] = event
        self.bytes += len(frame)
        self.next = index + 1
        while self.bytes > self.max_bytes and self.first < index:
            self._drop_oldest()
        return event

    def _drop_oldest(self) -> None:
        slot = self.first % self.capacity
        event = self._ring[slot]
        assert event is not None
        self.bytes -= len(event.frame)
        self._ring[slot] = None
        self.first += 1

    def after(self, index: int) -> Iterator[Event]:
        """The events after `index`, oldest first. `Gone` (at once) when some are no longer
        kept, or `index` is not one this log could have given."""
        if index < self.first - 1 or index > self.last:
            room = f"{self.capacity:,} events in {self.max_bytes / (1 << 20):g} MiB at most"
            raise Gone(index, self.first, room)
        return self._from(index + 1, self.next)

    def _from(self, start: int, stop: int) -> Iterator[Event]:
        ring, capacity = self._ring, self.capacity
        for i in range(start, stop):
            event = ring[i % capacity]
            assert event is not None
            yield event


@dataclass(slots=True)
class Known:
    """What the log knows of records beyond their events, to tag the events that follow:
    each job's owner (its removal is tagged with it) and the node each active task is on (a
    task that leaves it is tagged with it). Learnt from the ledger once, as the master takes
    it (`learn`), kept up from the events after."""

    owners: dict[int, str] = field(default_factory=dict)  # job id -> its owner, until removed
    on: dict[str, str] = field(default_factory=dict)  # active task id -> its node
    learnt: bool = False

    def learn(self, jobs: Iterable[JobRecord], active: Iterable[TaskRecord]) -> None:
        """What the ledger holds: its jobs and its active tasks. Once; a no-op after."""
        if not self.learnt:
            self.learnt = True
            self.owners.update((j.id, j.owner) for j in jobs)
            self.on.update((t.id, t.node) for t in active if t.node is not None)

    def left(self, task: TaskRecord) -> str | None:
        """The node `task` left since its last event (None: it left none), kept up to date."""
        was = self.on.pop(task.id, None)
        if task.node is not None and task.state.active:
            self.on[task.id] = task.node
        return was if was != task.node else None


def record_changes(
    log: EventLog, changes: Persist, owner_of: Callable[[int], str | None], at: float, known: Known
) -> None:
    """The events of one batch of the ledger's changes. `owner_of`: a job's owner (None when
    the job is gone: the event is then for admins and readers)."""
    for job, doc in zip(changes.jobs, changes.job_docs, strict=True):
        known.owners[job.id] = job.owner
        log.append("jobs", "changed", doc.encode(), at, job=job.id, owner=job.owner)
    for job_id in changes.forgotten_jobs:  # past retention: gone with its tasks
        owner = known.owners.pop(job_id, None)
        log.append("jobs", "removed", {"id": job_id}, at, job=job_id, owner=owner)
    for task, record in zip(changes.tasks, changes.task_docs, strict=True):
        owner = owner_of(task.job_id)
        left = known.left(task)
        log.append("tasks", "changed", record, at, job=task.job_id, node=task.node, left=left, owner=owner)
    for node in changes.nodes:
        log.append("nodes", "changed", node.model_dump_json().encode(), at, node=node.name)
    for framework in changes.frameworks:
        log.append("frameworks", "changed", framework.model_dump_json().encode(), at)
    for move in changes.migrations:
        log.append(
            "migrations", "changed", move.model_dump_json().encode(), at, job=move.job_id, node=move.source
        )
    for move_id in changes.forgotten_migrations:
        log.append("migrations", "removed", {"id": move_id}, at)
    for registration in changes.registrations:
        log.append("services", "registered", registration.model_dump_json().encode(), at)
    for registration_id in changes.forgotten_registrations:
        log.append("services", "deregistered", {"id": registration_id}, at)
