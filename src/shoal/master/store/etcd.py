"""The store on etcd, shared by several masters of which one leads and writes.

Keys, under `prefix` (default /shoal/):

    head                       the seq of the last whole log entry, in decimal
    log/<seq:016d>             one Persist: b"z" + the entry, or b"p" + the count of its parts
    part/<seq:016d>/<n:06d>    the parts of an entry too large to stand in its log key
    snapshot                   {"seq": S, "parts": N}: every record as of entry S
    snap/<S:016d>/<n:06d>      the snapshot's parts
    tokens/<digest>            a token's entry, as JSON: {"name", "role", "roles", "kind", ...}
    audit/<id:016d>            an audit record, as AuditRecord JSON
    refused/<minute>/<status>/<source>/<kind>  a minute's count of such refusals, as AuditRecord JSON
    identities/<node>          a node's certificates: {"name", "serials", "issued", "renewed", "key", ...}

A log of Persists, not a key per record. A Persist must be atomic however large it is (a
job of 100,000 tasks), and etcd takes at most 128 operations and 1.5 MiB in a transaction.
So `apply` writes the whole Persist as one entry: its parts first, each in a transaction of
its own, then the entry (inline, or naming its parts) together with `head` in one last
transaction. Parts above `head` mean nothing: a leader that died between them and the entry
left them, and the next entry of that seq overwrites them and deletes the rest. A key per
record would also make 100,000 keys of one job, each revision of each kept until compaction.

An entry is a msgpack map of tables; each record in it is the JSON document SqliteStore
keeps (`model_dump_json`, `TASK_RECORD.dump_json`), so records validate the same way on
either store. msgpack frames them as they are (a JSON frame would escape every quote: four
times slower at 100,000 tasks). Entries and snapshots are zlib-compressed at level 1.

Fencing: the caller holds a leadership key (`leader_key`) whose create_revision is `fence`.
Every write is one transaction that compares it, so a master that lost the leadership
cannot write, however late its writes arrive: `Deposed`, never retried. A store opened with
fence 0 only reads. When etcd does not answer a write, whether it took it is unknown:
`OutcomeUnknown` (a `Deposed` and an `EtcdUnavailable`), after which this store writes
nothing more; the caller steps down and the next leader, maybe this process again, loads
the store afresh.

Snapshots and compaction: the store keeps a mirror of the current records (their documents,
by id), so it can write them all as a snapshot without asking the ledger: parts first, then
one transaction that names it and deletes the log it covers and any older snapshot. Then
etcd is asked to compact its history at that revision: etcd keeps every old revision of
every key until told. A snapshot is due once the log after the last one holds
`snapshot_every` entries and at least as many bytes as that snapshot (so snapshots never
cost more writing than the log itself: one of 100,000 tasks takes a second or two), or
`snapshot_bytes` whatever its count. A load then replays at most about a snapshot's worth
of log, which is cheaper than validating the records it loads.

`load` reads the snapshot, then the log after it up to `head`, in pages at one revision,
and replays them with exactly SqliteStore's meaning: it returns what SqliteStore.load()
would after the same applies, records in the same order.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from typing import Any

import msgpack

from shoal.errors import ShoalError
from shoal.framework.protocol import FrameworkRecord, TaskStatus
from shoal.master.events import Persist
from shoal.master.store import AuditQuery, Deposed, NodeIdentity, Snapshot, TokenEntry
from shoal.master.store.gateway import (
    EtcdError,
    EtcdUnavailable,
    Gateway,
    Key,
    Op,
    created_at,
    delete_op,
    prefix_end,
    present,
    put_op,
    range_op,
)
from shoal.model import TASK_RECORD, JobRecord, Migration, NodeRecord, Role
from shoal.services import RegistrationRecord
from shoal.shell.protocol import AuditRecord

log = logging.getLogger("shoal.master")

CHUNK_BYTES = 1 << 20  # a part: with base64 and JSON it stays well under etcd's 1.5 MiB request
_INLINE_MAX = 64 << 10  # larger entries go in parts, so a page of log keys stays small
_SHORTEST_WRITE = 0.05  # seconds a write is given at least, however close the deadline
_LOG_PAGE = 256  # log keys a read: 16 MiB at the most
_PART_PAGE = 4  # parts a read: 4 MiB at the most
_INLINE, _PARTS = b"z", b"p"  # what a log key holds: the entry itself, or its count of parts
_TXN_OPS = 128  # operations etcd takes in one transaction, at most

Doc = str | bytes  # a record's JSON document


class OutcomeUnknown(Deposed, EtcdUnavailable):
    """etcd did not answer a write: it may or may not have taken it. The master must step
    down; the next leader loads what etcd holds."""


class Damaged(ShoalError):
    """The store's keys contradict each other (a log entry missing below `head`, a part
    missing): something other than shoal wrote or deleted them."""


class _Mirror:
    """The current records as documents, changed by entries exactly as SqliteStore.apply
    changes its tables (order included: an upsert moves a record to the end)."""

    def __init__(self) -> None:
        self.jobs: dict[int, Doc] = {}
        self.tasks: dict[str, tuple[int, Doc]] = {}  # id -> (job id, doc)
        self.job_tasks: dict[int, set[str]] = {}  # for forgetting a job's tasks with it
        self.nodes: dict[str, Doc] = {}
        self.frameworks: dict[str, Doc] = {}
        self.updates: dict[str, tuple[str, Doc]] = {}  # uuid -> (framework, doc), oldest first
        self.migrations: dict[int, Doc] = {}
        self.counters: dict[str, int] = {}
        self.registrations: dict[str, Doc] = {}

    def replay(self, entry: dict[str, list[Any]]) -> None:
        """Apply one entry (or a snapshot: an entry of every record into an empty mirror)."""
        for job_id, doc in entry.get("jobs", ()):
            _upsert(self.jobs, job_id, doc)
        for task_id, job_id, doc in entry.get("tasks", ()):
            old = self.tasks.pop(task_id, None)
            if old is not None and old[0] != job_id:
                self.job_tasks[old[0]].discard(task_id)
            self.tasks[task_id] = (job_id, doc)
            self.job_tasks.setdefault(job_id, set()).add(task_id)
        for name, doc in entry.get("nodes", ()):
            _upsert(self.nodes, name, doc)
        for framework_id, doc in entry.get("frameworks", ()):
            _upsert(self.frameworks, framework_id, doc)
        for uuid, framework, doc in entry.get("updates", ()):
            _upsert(self.updates, uuid, (framework, doc))
        for uuid in entry.get("acked", ()):
            self.updates.pop(uuid, None)
        for migration_id, doc in entry.get("migrations", ()):
            _upsert(self.migrations, migration_id, doc)
        for name, value in entry.get("counters", ()):
            _upsert(self.counters, name, value)
        for job_id in entry.get("forgotten_jobs", ()):
            for task_id in self.job_tasks.pop(job_id, ()):
                del self.tasks[task_id]
            self.jobs.pop(job_id, None)
        for migration_id in entry.get("forgotten_migrations", ()):
            self.migrations.pop(migration_id, None)
        for registration_id, doc in entry.get("registrations", ()):
            _upsert(self.registrations, registration_id, doc)
        for registration_id in entry.get("forgotten_registrations", ()):
            self.registrations.pop(registration_id, None)

    def entry(self) -> dict[str, list[Any]]:
        """Every record, as the entry that rebuilds this mirror from nothing."""
        return {
            "jobs": [[k, d] for k, d in self.jobs.items()],
            "tasks": [[k, job, d] for k, (job, d) in self.tasks.items()],
            "nodes": [[k, d] for k, d in self.nodes.items()],
            "frameworks": [[k, d] for k, d in self.frameworks.items()],
            "updates": [[k, framework, d] for k, (framework, d) in self.updates.items()],
            "migrations": [[k, d] for k, d in self.migrations.items()],
            "counters": [[k, n] for k, n in self.counters.items()],
            "registrations": [[k, d] for k, d in self.registrations.items()],
        }

    def records(self) -> Snapshot:
        """The records, validated, in SqliteStore's order: jobs and migrations by id (their
        tables' keys), the rest by when each was last written."""
        return Snapshot(
            jobs=[JobRecord.model_validate_json(d) for _, d in sorted(self.jobs.items())],
            tasks=[TASK_RECORD.validate_json(d) for _, d in self.tasks.values()],
            nodes=[NodeRecord.model_validate_json(d) for d in self.nodes.values()],
            frameworks=[FrameworkRecord.model_validate_json(d) for d in self.frameworks.values()],
            updates=[(f, TaskStatus.model_validate_json(d)) for f, d in self.updates.values()],
            migrations=[Migration.model_validate_json(d) for _, d in sorted(self.migrations.items())],
            counters=dict(self.counters),
            registrations=[RegistrationRecord.model_validate_json(d) for d in self.registrations.values()],
        )


def _upsert(table: dict[Any, Any], key: Any, value: Any) -> None:
    """INSERT OR REPLACE: a replaced row gets a new rowid in SQLite, so it moves to the end."""
    table.pop(key, None)
    table[key] = value


def _entry(changes: Persist) -> dict[str, list[Any]]:
    """A Persist as a log entry: its tables, empty ones left out."""
    tables = {
        "jobs": [[j.id, doc] for j, doc in zip(changes.jobs, changes.job_docs, strict=True)],
        "tasks": [[t.id, t.job_id, doc] for t, doc in zip(changes.tasks, changes.task_docs, strict=True)],
        "nodes": [[n.name, n.model_dump_json()] for n in changes.nodes],
        "frameworks": [[f.id, f.model_dump_json()] for f in changes.frameworks],
        "updates": [[s.uuid, framework, s.model_dump_json()] for framework, s in changes.updates],
        "acked": list(changes.acked),
        "migrations": [[m.id, m.model_dump_json()] for m in changes.migrations],
        "counters": [[name, value] for name, value in changes.counters],
        "forgotten_jobs": list(changes.forgotten_jobs),
        "forgotten_migrations": list(changes.forgotten_migrations),
        "registrations": [[r.spec.id, r.model_dump_json()] for r in changes.registrations],
        "forgotten_registrations": list(changes.forgotten_registrations),
    }
    return {name: rows for name, rows in tables.items() if rows}


def _pack(entry: dict[str, list[Any]]) -> bytes:
    return zlib.compress(msgpack.packb(entry), 1)


def _unpack(blob: bytes) -> dict[str, list[Any]]:
    return msgpack.unpackb(zlib.decompress(blob))


def _split(blob: bytes, size: int) -> list[bytes]:
    return [blob[i : i + size] for i in range(0, len(blob), size)]


class EtcdStore:
    """The `Store` on etcd for the leader fenced by `leader_key` created at `fence` (0: read
    only). `chunk_bytes` is the size of a part of a large entry or of a snapshot;
    `audit_page`, of a read of audit records when searching them.

    The caller owns `gateway` (the leadership and several stores share it): `close()` only
    marks this store closed, and it writes nothing after."""

    def __init__(
        self,
        gateway: Gateway,
        prefix: str = "/shoal/",
        *,
        fence: int,
        leader_key: Key,
        audit_limit: int = 100_000,
        audit_page: int = 512,
        refusal_limit: int = 10_000,
        chunk_bytes: int = CHUNK_BYTES,
        snapshot_every: int = 1_000,
        snapshot_bytes: int = 64 << 20,
        time_left: Callable[[], float] | None = None,
    ) -> None:
        # Seconds this master may still act as leader: a write waits no longer than that
        # (it would be refused after it anyway), so a leader cut off from etcd stops at its
        # deadline rather than at the gateway's timeout. None: the gateway's timeout.
        self._time_left_of = time_left
        self._gateway = gateway
        self._prefix = prefix.encode()
        self._fence = fence
        self._leader_key = leader_key.encode() if isinstance(leader_key, str) else leader_key
        self._audit_limit = audit_limit  # audit records kept, the newest
        self._audit_page = audit_page  # records a read when searching them
        self._refusal_limit = refusal_limit  # refusals kept (each of a minute), the newest
        self._chunk = chunk_bytes
        self._snapshot_every = snapshot_every
        self._snapshot_bytes = snapshot_bytes
        self._lock = threading.Lock()  # one write at a time: entries take their seq in turn
        self._mirror: _Mirror | None = None  # None until loaded
        self._seq = 0  # the last entry written (head)
        self._since_snapshot = 0  # entries of the log after the snapshot
        self._log_bytes = 0  # and their size
        self._snapshot_size = 0  # the snapshot's, compressed
        self._newest_audit: int | None = None  # None until read
        self._unknown: str | None = None  # why the outcome of a write is unknown
        self._closed = False

    # --- keys -----------------------------------------------------------------------------

    def _key(self, name: str) -> bytes:
        return self._prefix + name.encode()

    def _log(self, seq: int) -> bytes:
        return self._key(f"log/{seq:016d}")

    def _parts_of(self, seq: int) -> bytes:
        return self._key(f"part/{seq:016d}/")

    def _snap_of(self, seq: int) -> bytes:
        return self._key(f"snap/{seq:016d}/")

    def _audit(self, record_id: int) -> bytes:
        return self._key(f"audit/{record_id:016d}")

    # --- loading --------------------------------------------------------------------------

    def load(self) -> Snapshot:
        with self._lock:
            return self._recover().records()

    def _recover(self) -> _Mirror:
        """Rebuild the mirror from etcd: the snapshot, then every entry after it up to head,
        all read at one revision. Also where the next entry and audit record go."""
        head = self._gateway.range(self._key("head"))
        revision = head.revision
        last = int(head.kvs[0].value) if head.kvs else 0
        mirror = _Mirror()
        seq, snapshot = 0, b""
        if found := self._gateway.range(self._key("snapshot"), revision=revision).kvs:
            manifest = json.loads(found[0].value)
            seq = manifest["seq"]
            snapshot = self._read_parts(self._snap_of(seq), manifest["parts"], revision)
            mirror.replay(_unpack(snapshot))
        log_bytes, since = 0, seq
        entries = self._gateway.scan(
            self._log(seq + 1), self._log(last + 1), page=_LOG_PAGE, revision=revision
        )
        for kv in entries:
            since += 1
            if kv.key != self._log(since):
                raise Damaged(f"log entry {since} is missing from {self._prefix!r} (head says {last})")
            blob = self._entry_blob(since, kv.value, revision)
            mirror.replay(_unpack(blob))
            log_bytes += len(blob)
        if since != last:
            raise Damaged(f"the log of {self._prefix!r} ends at {since}, but head says {last}")
        self._mirror, self._seq = mirror, last
        self._since_snapshot, self._log_bytes, self._snapshot_size = last - seq, log_bytes, len(snapshot)
        self._unknown = None
        self._newest_audit = self._read_newest_audit()
        return mirror

    def _entry_blob(self, seq: int, value: bytes, revision: int) -> bytes:
        kind, rest = value[:1], value[1:]
        if kind == _INLINE:
            return rest
        if kind == _PARTS:
            return self._read_parts(self._parts_of(seq), int(rest), revision)
        raise Damaged(f"log entry {seq} of {self._prefix!r} is neither an entry nor a list of parts")

    def _read_parts(self, prefix: bytes, count: int, revision: int) -> bytes:
        end = prefix + b"%06d" % count
        parts = [kv.value for kv in self._gateway.scan(prefix, end, page=_PART_PAGE, revision=revision)]
        if len(parts) != count:
            raise Damaged(f"{prefix!r} holds {len(parts)} parts, not the {count} named")
        return b"".join(parts)

    # --- the log --------------------------------------------------------------------------

    def apply(self, changes: Persist) -> None:
        """Persist `changes` atomically. `Deposed` when this master no longer leads (nothing
        written); `OutcomeUnknown` when etcd did not answer (written or not: step down)."""
        with self._lock:
            mirror = self._mirror if self._mirror is not None else self._recover()
            entry = _entry(changes)
            blob = _pack(entry)
            seq = self._seq + 1
            self._write_entry(seq, blob)
            self._seq = seq
            mirror.replay(entry)
            self._since_snapshot += 1
            self._log_bytes += len(blob)
            if self._snapshot_due():
                try:
                    self._snapshot(mirror)
                except EtcdUnavailable as e:
                    # The entry is in: this call succeeded. The snapshot is tried again
                    # after the next entry; should etcd stay away, that entry's write fails.
                    log.warning("a snapshot of the store failed (%s); it is tried again later", e)

    def _snapshot_due(self) -> bool:
        if self._log_bytes >= self._snapshot_bytes:
            return True
        return self._since_snapshot >= self._snapshot_every and self._log_bytes >= self._snapshot_size

    def _write_entry(self, seq: int, blob: bytes) -> None:
        parts = [] if len(blob) <= min(self._chunk, _INLINE_MAX) else _split(blob, self._chunk)
        for n, part in enumerate(parts):
            self._write([put_op(self._parts_of(seq) + b"%06d" % n, part)])
        below = self._parts_of(seq)
        self._write(
            [
                put_op(self._log(seq), _PARTS + b"%d" % len(parts) if parts else _INLINE + blob),
                put_op(self._key("head"), b"%d" % seq),
                # Parts of this seq beyond ours: a leader died writing a larger entry here.
                delete_op(below + b"%06d" % len(parts), prefix_end(below)),
            ]
        )

    def _snapshot(self, mirror: _Mirror) -> None:
        """Write every record as of entry `self._seq`, drop the log and snapshot it replaces,
        and let etcd compact its history."""
        seq = self._seq
        blob = _pack(mirror.entry())
        parts = _split(blob, self._chunk)
        mine = self._snap_of(seq)
        for n, part in enumerate(parts):
            self._write([put_op(mine + b"%06d" % n, part)])
        snaps = self._key("snap/")
        done = self._write(
            [
                put_op(self._key("snapshot"), json.dumps({"seq": seq, "parts": len(parts)})),
                delete_op(self._key("log/"), self._log(seq + 1)),
                delete_op(self._key("part/"), self._key(f"part/{seq + 1:016d}")),
                delete_op(snaps, self._key(f"snap/{seq:016d}")),  # older snapshots
                delete_op(mine + b"%06d" % len(parts), prefix_end(snaps)),  # torn ones at or above
            ]
        )
        self._since_snapshot, self._log_bytes, self._snapshot_size = 0, 0, len(blob)
        try:
            self._gateway.compact(done)
        except EtcdError as e:  # history kept longer costs space, not correctness
            log.warning("etcd did not compact its history at revision %d: %s", done, e)

    # --- writes ---------------------------------------------------------------------------

    def _time_left(self) -> float | None:
        return None if self._time_left_of is None else max(_SHORTEST_WRITE, self._time_left_of())

    def _write(self, ops: list[Op], unless_missing: bytes | None = None) -> int:
        """Run `ops` in one transaction fenced by the leadership; the revision it made, or 0
        when `unless_missing` names a key that is not there (then nothing is written)."""
        if self._closed or self._fence <= 0:
            raise Deposed("this store is closed or was opened only to read: it writes nothing")
        if self._unknown is not None:
            raise OutcomeUnknown(f"an earlier write's outcome is unknown ({self._unknown}); load again")
        compares = [created_at(self._leader_key, self._fence)]
        failure = []
        if unless_missing is not None:
            compares.append(present(unless_missing))
            failure = [range_op(self._leader_key, keys_only=True)]  # which comparison failed
        try:
            result = self._gateway.txn(compares, ops, failure, timeout=self._time_left())
        except EtcdUnavailable as e:
            self._unknown = str(e)
            raise OutcomeUnknown(
                f"etcd did not answer a write of this master ({e}): whether it took it is unknown,"
                " so this master must step down; the next leader loads the store afresh"
            ) from e
        if result.succeeded:
            return result.revision
        if failure and (held := result.responses[0].kvs) and held[0].create_revision == self._fence:
            return 0
        raise Deposed(
            f"this master is no longer the leader: {self._leader_key.decode(errors='replace')} is not"
            f" the key created at revision {self._fence} any more; it must stop writing and step down"
        )

    # --- tokens ---------------------------------------------------------------------------

    def token(self, digest: str) -> TokenEntry | None:
        found = self._gateway.range(self._key(f"tokens/{digest}")).kvs
        return _token_entry(found[0].value) if found else None

    def tokens(self) -> list[tuple[str, TokenEntry]]:
        prefix = self._key("tokens/")
        found = self._gateway.range(prefix, prefix_end(prefix)).kvs
        return [(kv.key[len(prefix) :].decode(), _token_entry(kv.value)) for kv in found]

    def put_tokens(self, entries: Mapping[str, TokenEntry]) -> None:
        """One transaction for up to `_TXN_OPS` tokens; more take several."""
        ops = [put_op(self._key(f"tokens/{d}"), _token_doc(e)) for d, e in entries.items()]
        with self._lock:
            for first in range(0, len(ops), _TXN_OPS):
                self._write(ops[first : first + _TXN_OPS])

    put_uses = put_tokens  # a token's document is written whole

    # --- audit ----------------------------------------------------------------------------
    # Ids are dense: one writer at a time, each id taken once, only the oldest deleted. So
    # the newest is the oldest plus the count less one, and a page is a window of ids.

    def _read_newest_audit(self) -> int:
        """The newest audit id in etcd (0: none), in two reads that do not scan the records."""
        prefix = self._key("audit/")
        first = self._gateway.range(prefix, prefix_end(prefix), limit=1, keys_only=True)
        if not first.kvs:
            return 0
        guess = int(first.kvs[0].key[len(prefix) :]) + first.count - 1
        # The newest is at the guess, or above it if ids were ever skipped: a narrow range.
        last = self._gateway.range(
            self._audit(guess), prefix_end(prefix), limit=1, sort_descend=True, keys_only=True
        )
        return int(last.kvs[0].key[len(prefix) :]) if last.kvs else guess

    def _newest(self) -> int:
        if self._newest_audit is None:
            self._newest_audit = self._read_newest_audit()
        return self._newest_audit

    def add_audit(self, *records: AuditRecord) -> int:
        with self._lock:
            first = self._newest() + 1
            ops = [put_op(self._audit(first + i), r.model_dump_json()) for i, r in enumerate(records)]
            newest = first + len(records) - 1
            if (line := newest - self._audit_limit) >= 1:  # the oldest beyond the limit
                ops.append(delete_op(self._key("audit/"), self._audit(line + 1)))
            self._write(ops)
            self._newest_audit = newest
            return first

    def end_audit(self, record: AuditRecord) -> None:
        """Update a record still kept (one pruned meanwhile stays gone, as in SQLite)."""
        key = self._audit(record.id)
        with self._lock:
            self._write([put_op(key, record.model_dump_json())], unless_missing=key)

    def audit_record(self, record_id: int) -> AuditRecord | None:
        found = self._gateway.range(self._audit(record_id)).kvs
        return _audit_record(record_id, found[0].value) if found else None

    def audit(self, offset: int, limit: int, query: AuditQuery | None = None) -> list[AuditRecord]:
        """The records `query` matches (None: all), newest first."""
        if query is not None and query != AuditQuery():
            return self._search_audit(offset, limit, query)
        newest = self._newest() - offset
        if limit <= 0 or newest < 1:
            return []
        return self._audit_range(max(1, newest - limit + 1), newest)

    def _search_audit(self, offset: int, limit: int, query: AuditQuery) -> list[AuditRecord]:
        """Pages of records, newest first, until `limit` match past the first `offset` that
        do: at most every record kept. Ids follow time, so the first record older than
        `query.since` ends the search."""
        found: list[AuditRecord] = []
        newest = self._newest()
        oldest = max(1, newest - self._audit_limit + 1)
        while newest >= oldest and len(found) < offset + limit:
            page = self._audit_range(max(oldest, newest - self._audit_page + 1), newest)
            for record in page:
                if query.since is not None and record.at < query.since:
                    return found[offset : offset + limit]
                if query.matches(record):
                    found.append(record)
            newest -= self._audit_page
        return found[offset : offset + limit]

    def _audit_range(self, oldest: int, newest: int) -> list[AuditRecord]:
        """The records of ids `oldest` to `newest` still kept, newest first."""
        prefix = self._key("audit/")
        page = self._gateway.range(self._audit(oldest), self._audit(newest + 1), sort_descend=True)
        return [_audit_record(int(kv.key[len(prefix) :]), kv.value) for kv in page.kvs]

    # --- refusals: the keys sort by minute, so the oldest go first and a listing reads back

    def _refused(self, r: AuditRecord) -> bytes:
        return self._key(f"refused/{int(r.at):012d}/{r.status:03d}/{r.source}/{r.kind}")

    def add_refusals(self, records: Sequence[AuditRecord]) -> None:
        prefix = self._key("refused/")
        with self._lock:
            kept: dict[bytes, AuditRecord] = {}
            for minute in {int(r.at) for r in records}:
                start = self._key(f"refused/{minute:012d}/")
                kept |= {
                    kv.key: _audit_record(0, kv.value)
                    for kv in self._gateway.range(start, prefix_end(start)).kvs
                }
            merged: dict[bytes, AuditRecord] = {}
            for r in records:
                old = merged.get(key := self._refused(r)) or kept.get(key)
                merged[key] = r if old is None else r.model_copy(update={"count": old.count + r.count})
            ops = [put_op(key, r.model_dump_json()) for key, r in merged.items()]
            for first in range(0, len(ops), _TXN_OPS):
                self._write(ops[first : first + _TXN_OPS])
            whole = self._gateway.range(prefix, prefix_end(prefix), limit=1, keys_only=True)
            if (over := whole.count - self._refusal_limit) > 0:
                oldest = self._gateway.range(prefix, prefix_end(prefix), limit=over, keys_only=True).kvs
                self._write([delete_op(prefix, oldest[-1].key + b"\0")])

    def refusals(self, offset: int, limit: int, since: float | None = None) -> list[AuditRecord]:
        start = self._key(f"refused/{max(0, math.floor(since or 0) - 59):012d}")
        end = prefix_end(self._key("refused/"))
        page = self._gateway.range(start, end, limit=offset + limit, sort_descend=True)
        return [_audit_record(0, kv.value) for kv in page.kvs[offset:]]

    # --- nodes' identities ---------------------------------------------------------------

    def identity(self, name: str) -> NodeIdentity | None:
        found = self._gateway.range(self._key(f"identities/{name}")).kvs
        return NodeIdentity.of(json.loads(found[0].value)) if found else None

    def put_identity(self, identity: NodeIdentity) -> None:
        with self._lock:
            self._write([put_op(self._key(f"identities/{identity.name}"), json.dumps(asdict(identity)))])

    def delete_identity(self, name: str) -> bool:
        had = self.identity(name) is not None  # only the leader writes: nothing comes between
        with self._lock:
            self._write([delete_op(self._key(f"identities/{name}"))])
        return had

    def close(self) -> None:
        self._closed = True


def _audit_record(record_id: int, doc: bytes) -> AuditRecord:
    return AuditRecord.model_validate_json(doc).model_copy(update={"id": record_id})


def _token_doc(entry: TokenEntry) -> str:
    return json.dumps({**asdict(entry), "role": entry.role.value, "roles": list(entry.roles)})


def _token_entry(doc: bytes) -> TokenEntry:
    """An entry from its JSON; fields a token was stored without take their defaults."""
    fields = json.loads(doc)
    return TokenEntry(**{**fields, "role": Role(fields["role"]), "roles": tuple(fields["roles"])})
