"""The embedded store: one SQLite file in write-ahead-log mode.

Records are kept as JSON documents keyed by id: the ledger, not SQL, owns the schema, and
a record's shape can grow without migrations. Each `apply` is one transaction.

With `fsync` on (the default) every commit is synced to disk before it returns
(synchronous=FULL), so what the master acknowledges survives a power loss too. Off,
synchronous=NORMAL: WAL mode still survives any crash of the process (SIGKILL included),
but a power loss can take the last transactions.
"""

from __future__ import annotations

import dataclasses
import json
import sqlite3
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from shoal.files import sync_directory
from shoal.framework.protocol import FrameworkRecord, TaskStatus
from shoal.master.events import Persist
from shoal.master.store import AuditQuery, NodeIdentity, Snapshot, TokenEntry
from shoal.model import TASK_RECORD, JobRecord, Migration, NodeRecord, Role
from shoal.services import RegistrationRecord
from shoal.shell.protocol import AuditRecord

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (id INTEGER PRIMARY KEY, doc TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS tasks (id TEXT PRIMARY KEY, job_id INTEGER NOT NULL, doc TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS tasks_by_job ON tasks (job_id);
CREATE TABLE IF NOT EXISTS nodes (name TEXT PRIMARY KEY, doc TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS tokens (digest TEXT PRIMARY KEY, name TEXT NOT NULL, role TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS audit (id INTEGER PRIMARY KEY AUTOINCREMENT, doc TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS frameworks (id TEXT PRIMARY KEY, doc TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS updates (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    uuid TEXT UNIQUE NOT NULL,
    framework TEXT NOT NULL,
    doc TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS token_roles (digest TEXT PRIMARY KEY, roles TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS migrations (id INTEGER PRIMARY KEY, doc TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, next INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS registrations (id TEXT PRIMARY KEY, doc TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS identities (name TEXT PRIMARY KEY, doc TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS refusals (
    minute REAL NOT NULL,
    status INTEGER NOT NULL,
    source TEXT NOT NULL,
    kind TEXT NOT NULL,
    count INTEGER NOT NULL,
    PRIMARY KEY (minute, status, source, kind)
);
"""

# Columns added since the tables were first made: a database made before them gains them
# when opened, its rows taking the defaults (tokens: API tokens that never expire).
_ADDED = {
    "tokens": {
        "kind": "TEXT NOT NULL DEFAULT 'api'",
        "created": "REAL",
        "expires": "REAL",
        "last_used": "REAL",
        "uses": "INTEGER",
        "used": "INTEGER NOT NULL DEFAULT 0",
        "revoked": "REAL",
    },
    # Copies of fields of the record, indexed, for listing by who, kind and time.
    "audit": {"who": "TEXT", "kind": "TEXT", "at": "REAL"},
}
_AUDIT_INDEXES = (
    "CREATE INDEX IF NOT EXISTS audit_by_who ON audit (who, id)",
    "CREATE INDEX IF NOT EXISTS audit_by_kind ON audit (kind, id)",
    "CREATE INDEX IF NOT EXISTS audit_by_time ON audit (at)",
)
# Newest first, in the order of the table's key (the order of the etcd store's keys too).
_REFUSALS_ORDER = "ORDER BY minute DESC, status DESC, source DESC, kind DESC"
_TOKEN_FIELDS = "name, role, roles, kind, created, expires, last_used, uses, used, revoked"


class SqliteStore:
    def __init__(
        self, path: Path | str, fsync: bool = True, audit_limit: int = 100_000, refusal_limit: int = 10_000
    ) -> None:
        self._audit_limit = audit_limit  # audit records kept, the newest
        self._refusal_limit = refusal_limit  # refusals kept (each of a minute), the newest
        self._db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode syncs only at checkpoints; FULL syncs the log on every commit.
        self._db.execute(f"PRAGMA synchronous={'FULL' if fsync else 'NORMAL'}")
        self._db.executescript(_SCHEMA)
        self._add_columns()
        if fsync and str(path) != ":memory:":
            # SQLite syncs the directory when it creates its log, not its database file.
            sync_directory(Path(path).parent)

    def _add_columns(self) -> None:
        db = self._db
        db.execute("BEGIN")
        for table, columns in _ADDED.items():
            present = {row[1] for row in db.execute(f"PRAGMA table_info({table})")}
            for name, definition in columns.items():
                if name not in present:
                    db.execute(f"ALTER TABLE {table} ADD COLUMN {name} {definition}")
        # Records kept before the columns were: parallel commands, all of them.
        db.execute(
            "UPDATE audit SET who = json_extract(doc, '$.who'), at = json_extract(doc, '$.at'),"
            " kind = coalesce(json_extract(doc, '$.kind'), 'exec') WHERE kind IS NULL"
        )
        for index in _AUDIT_INDEXES:
            db.execute(index)
        db.execute("COMMIT")

    def load(self) -> Snapshot:
        return Snapshot(
            jobs=[JobRecord.model_validate_json(d) for (d,) in self._db.execute("SELECT doc FROM jobs")],
            tasks=[TASK_RECORD.validate_json(d) for (d,) in self._db.execute("SELECT doc FROM tasks")],
            nodes=[NodeRecord.model_validate_json(d) for (d,) in self._db.execute("SELECT doc FROM nodes")],
            frameworks=[
                FrameworkRecord.model_validate_json(d)
                for (d,) in self._db.execute("SELECT doc FROM frameworks")
            ],
            updates=[
                (framework, TaskStatus.model_validate_json(d))
                for framework, d in self._db.execute("SELECT framework, doc FROM updates ORDER BY seq")
            ],
            migrations=[
                Migration.model_validate_json(d) for (d,) in self._db.execute("SELECT doc FROM migrations")
            ],
            counters=dict(self._db.execute("SELECT name, next FROM counters")),
            registrations=[
                RegistrationRecord.model_validate_json(d)
                for (d,) in self._db.execute("SELECT doc FROM registrations")
            ],
        )

    def apply(self, changes: Persist) -> None:
        db = self._db
        db.execute("BEGIN")
        try:
            db.executemany(
                "INSERT OR REPLACE INTO jobs VALUES (?, ?)",
                zip((j.id for j in changes.jobs), changes.job_docs, strict=True),
            )
            db.executemany(
                "INSERT OR REPLACE INTO tasks VALUES (?, ?, ?)",
                [(t.id, t.job_id, doc) for t, doc in zip(changes.tasks, changes.task_docs, strict=True)],
            )
            db.executemany(
                "INSERT OR REPLACE INTO nodes VALUES (?, ?)",
                [(n.name, n.model_dump_json()) for n in changes.nodes],
            )
            db.executemany(
                "INSERT OR REPLACE INTO frameworks VALUES (?, ?)",
                [(f.id, f.model_dump_json()) for f in changes.frameworks],
            )
            db.executemany(
                "INSERT OR REPLACE INTO updates (uuid, framework, doc) VALUES (?, ?, ?)",
                [(s.uuid, framework, s.model_dump_json()) for framework, s in changes.updates],
            )
            db.executemany("DELETE FROM updates WHERE uuid = ?", [(uuid,) for uuid in changes.acked])
            db.executemany(
                "INSERT OR REPLACE INTO migrations VALUES (?, ?)",
                [(m.id, m.model_dump_json()) for m in changes.migrations],
            )
            db.executemany("INSERT OR REPLACE INTO counters VALUES (?, ?)", changes.counters)
            gone = [(job_id,) for job_id in changes.forgotten_jobs]
            db.executemany("DELETE FROM tasks WHERE job_id = ?", gone)
            db.executemany("DELETE FROM jobs WHERE id = ?", gone)
            db.executemany(
                "DELETE FROM migrations WHERE id = ?", [(m,) for m in changes.forgotten_migrations]
            )
            db.executemany(
                "INSERT OR REPLACE INTO registrations VALUES (?, ?)",
                [(r.spec.id, r.model_dump_json()) for r in changes.registrations],
            )
            db.executemany(
                "DELETE FROM registrations WHERE id = ?", [(r,) for r in changes.forgotten_registrations]
            )
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def token(self, digest: str) -> TokenEntry | None:
        row = self._db.execute(
            f"SELECT {_TOKEN_FIELDS} FROM tokens LEFT JOIN token_roles USING (digest) WHERE digest = ?",
            (digest,),
        ).fetchone()
        return _token_entry(row) if row else None

    def tokens(self) -> list[tuple[str, TokenEntry]]:
        rows = self._db.execute(
            f"SELECT digest, {_TOKEN_FIELDS} FROM tokens LEFT JOIN token_roles USING (digest)"
        )
        return [(row[0], _token_entry(row[1:])) for row in rows]

    def put_tokens(self, entries: Mapping[str, TokenEntry]) -> None:
        db = self._db
        db.execute("BEGIN")
        try:
            db.executemany(
                "INSERT OR REPLACE INTO tokens (digest, name, role, kind, created, expires, last_used,"
                " uses, used, revoked) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [_token_row(d, e) for d, e in entries.items()],
            )
            db.executemany(
                "INSERT OR REPLACE INTO token_roles VALUES (?, ?)",
                [(d, json.dumps(list(e.roles))) for d, e in entries.items()],
            )
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def put_uses(self, entries: Mapping[str, TokenEntry]) -> None:
        # One column, not the whole row: a thousand tokens cost 3 ms rather than 20.
        db = self._db
        db.execute("BEGIN")
        try:
            db.executemany(
                "UPDATE tokens SET last_used = ? WHERE digest = ?",
                [(e.last_used, d) for d, e in entries.items()],
            )
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def add_audit(self, *records: AuditRecord) -> int:
        db = self._db
        db.execute("BEGIN")  # one commit, so one sync, for the records and the pruning
        try:
            ids = [
                db.execute(
                    "INSERT INTO audit (doc, who, kind, at) VALUES (?, ?, ?, ?)",
                    (record.model_dump_json(), record.who, record.kind, record.at),
                ).lastrowid
                for record in records
            ]
            assert ids and ids[0] is not None and ids[-1] is not None
            # Ids only grow: the oldest records beyond the limit are those below this line.
            db.execute("DELETE FROM audit WHERE id <= ?", (ids[-1] - self._audit_limit,))
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
        return ids[0]

    def end_audit(self, record: AuditRecord) -> None:
        self._db.execute("UPDATE audit SET doc = ? WHERE id = ?", (record.model_dump_json(), record.id))

    def audit_record(self, record_id: int) -> AuditRecord | None:
        row = self._db.execute("SELECT doc FROM audit WHERE id = ?", (record_id,)).fetchone()
        return AuditRecord.model_validate_json(row[0]).model_copy(update={"id": record_id}) if row else None

    def audit(self, offset: int, limit: int, query: AuditQuery | None = None) -> list[AuditRecord]:
        query = query or AuditQuery()
        terms = [
            (term, value)
            for term, value in (("who = ?", query.who), ("kind = ?", query.kind), ("at >= ?", query.since))
            if value is not None
        ]
        where = f"WHERE {' AND '.join(term for term, _ in terms)}" if terms else ""
        rows = self._db.execute(
            f"SELECT id, doc FROM audit {where} ORDER BY id DESC LIMIT ? OFFSET ?",
            (*(value for _, value in terms), limit, offset),
        )
        return [AuditRecord.model_validate_json(doc).model_copy(update={"id": id_}) for id_, doc in rows]

    def add_refusals(self, records: Sequence[AuditRecord]) -> None:
        db = self._db
        db.execute("BEGIN")
        try:
            db.executemany(
                "INSERT INTO refusals VALUES (?, ?, ?, ?, ?) ON CONFLICT DO UPDATE"
                " SET count = count + excluded.count",
                [(r.at, r.status, r.source, r.kind, r.count) for r in records],
            )
            db.execute(
                f"DELETE FROM refusals WHERE rowid IN (SELECT rowid FROM refusals {_REFUSALS_ORDER}"
                " LIMIT -1 OFFSET ?)",
                (self._refusal_limit,),
            )
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def refusals(self, offset: int, limit: int, since: float | None = None) -> list[AuditRecord]:
        rows = self._db.execute(
            "SELECT minute, source, kind, status, count FROM refusals WHERE minute + 60 > ?"
            f" {_REFUSALS_ORDER} LIMIT ? OFFSET ?",
            (since or 0.0, limit, offset),
        )
        return [
            AuditRecord(at=at, who="anonymous", kind=kind, source=source, status=status, count=count)
            for at, source, kind, status, count in rows
        ]

    def identity(self, name: str) -> NodeIdentity | None:
        row = self._db.execute("SELECT doc FROM identities WHERE name = ?", (name,)).fetchone()
        return NodeIdentity.of(json.loads(row[0])) if row else None

    def put_identity(self, identity: NodeIdentity) -> None:
        doc = json.dumps(dataclasses.asdict(identity))
        self._db.execute("INSERT OR REPLACE INTO identities VALUES (?, ?)", (identity.name, doc))

    def delete_identity(self, name: str) -> bool:
        return self._db.execute("DELETE FROM identities WHERE name = ?", (name,)).rowcount > 0

    def close(self) -> None:
        self._db.close()


def _token_row(digest: str, e: TokenEntry) -> tuple[Any, ...]:
    return (
        digest,
        e.name,
        e.role.value,
        e.kind,
        e.created,
        e.expires,
        e.last_used,
        e.uses,
        e.used,
        e.revoked,
    )


def _token_entry(row: tuple[Any, ...]) -> TokenEntry:
    name, role, roles, kind, created, expires, last_used, uses, used, revoked = row
    return TokenEntry(
        name,
        Role(role),
        tuple(json.loads(roles)) if roles else (),
        kind=kind,
        created=created,
        expires=expires,
        last_used=last_used,
        uses=uses,
        used=used,
        revoked=revoked,
    )
