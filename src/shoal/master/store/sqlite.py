"""The embedded store: one SQLite file in write-ahead-log mode.

Records are kept as JSON documents keyed by id: the ledger, not SQL, owns the schema, and
a record's shape can grow without migrations. Each `apply` is one transaction.

With `fsync` on (the default) every commit is synced to disk before it returns
(synchronous=FULL), so what the master acknowledges survives a power loss too. Off,
synchronous=NORMAL: WAL mode still survives any crash of the process (SIGKILL included),
but a power loss can take the last transactions.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

from shoal.files import sync_directory
from shoal.framework.protocol import FrameworkRecord, TaskStatus
from shoal.master.events import Persist
from shoal.master.store import Snapshot, TokenEntry
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
"""


class SqliteStore:
    def __init__(self, path: Path | str, fsync: bool = True, audit_limit: int = 100_000) -> None:
        self._audit_limit = audit_limit  # audit records kept, the newest
        self._db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode syncs only at checkpoints; FULL syncs the log on every commit.
        self._db.execute(f"PRAGMA synchronous={'FULL' if fsync else 'NORMAL'}")
        self._db.executescript(_SCHEMA)
        if fsync and str(path) != ":memory:":
            # SQLite syncs the directory when it creates its log, not its database file.
            sync_directory(Path(path).parent)

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
                [(j.id, j.model_dump_json()) for j in changes.jobs],
            )
            db.executemany(
                "INSERT OR REPLACE INTO tasks VALUES (?, ?, ?)",
                [(t.id, t.job_id, TASK_RECORD.dump_json(t)) for t in changes.tasks],
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
            "SELECT name, role, roles FROM tokens LEFT JOIN token_roles USING (digest) WHERE digest = ?",
            (digest,),
        ).fetchone()
        if not row:
            return None
        return TokenEntry(row[0], Role(row[1]), tuple(json.loads(row[2])) if row[2] else ())

    def put_token(self, digest: str, entry: TokenEntry) -> None:
        self._db.execute("BEGIN")
        self._db.execute(
            "INSERT OR REPLACE INTO tokens VALUES (?, ?, ?)", (digest, entry.name, entry.role.value)
        )
        self._db.execute(
            "INSERT OR REPLACE INTO token_roles VALUES (?, ?)", (digest, json.dumps(list(entry.roles)))
        )
        self._db.execute("COMMIT")

    def add_audit(self, record: AuditRecord) -> int:
        cursor = self._db.execute("INSERT INTO audit (doc) VALUES (?)", (record.model_dump_json(),))
        assert cursor.lastrowid is not None
        # Ids only grow: the oldest records beyond the limit are those below this line.
        self._db.execute("DELETE FROM audit WHERE id <= ?", (cursor.lastrowid - self._audit_limit,))
        return cursor.lastrowid

    def end_audit(self, record: AuditRecord) -> None:
        self._db.execute("UPDATE audit SET doc = ? WHERE id = ?", (record.model_dump_json(), record.id))

    def audit_record(self, record_id: int) -> AuditRecord | None:
        row = self._db.execute("SELECT doc FROM audit WHERE id = ?", (record_id,)).fetchone()
        return AuditRecord.model_validate_json(row[0]).model_copy(update={"id": record_id}) if row else None

    def audit(self, offset: int, limit: int) -> list[AuditRecord]:
        rows = self._db.execute(
            "SELECT id, doc FROM audit ORDER BY id DESC LIMIT ? OFFSET ?", (limit, offset)
        )
        return [AuditRecord.model_validate_json(doc).model_copy(update={"id": id_}) for id_, doc in rows]

    def close(self) -> None:
        self._db.close()
