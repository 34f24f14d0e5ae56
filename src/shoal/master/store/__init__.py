"""Where the master keeps what it has acknowledged: one small interface, several backends.

SQLite (`SqliteStore`) is the embedded default. Every backend persists a whole `Persist`
command atomically, so a batch of changes is either all there after a crash or not at all.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from shoal.errors import ShoalError
from shoal.framework.protocol import FrameworkRecord, TaskStatus
from shoal.master.events import Persist
from shoal.model import JobRecord, Migration, NodeRecord, Role, TaskRecord
from shoal.services import RegistrationRecord
from shoal.shell.protocol import AuditRecord


class Deposed(ShoalError):
    """The store refused a write of this master, or cannot say whether it took it: another
    master leads now, or this one lost the store. Nothing more may be done as leader."""


@dataclass(frozen=True, slots=True)
class Snapshot:
    jobs: list[JobRecord]
    tasks: list[TaskRecord]
    nodes: list[NodeRecord]
    frameworks: list[FrameworkRecord]
    updates: list[tuple[str, TaskStatus]]  # (framework, status) not yet acknowledged, in order
    migrations: list[Migration]
    counters: dict[str, int] = field(default_factory=dict)  # the next id of each kind ("job", ...)
    registrations: list[RegistrationRecord] = field(default_factory=list)  # services from outside


@dataclass(frozen=True, slots=True)
class TokenEntry:
    name: str
    role: Role
    roles: tuple[str, ...] = ()  # the roles (queues) its frameworks may subscribe in


class Store(Protocol):
    def load(self) -> Snapshot: ...

    def apply(self, changes: Persist) -> None: ...

    def token(self, digest: str) -> TokenEntry | None: ...

    def put_token(self, digest: str, entry: TokenEntry) -> None: ...

    def add_audit(self, record: AuditRecord) -> int:
        """Keep `record`; returns its id."""
        ...

    def end_audit(self, record: AuditRecord) -> None: ...

    def audit_record(self, record_id: int) -> AuditRecord | None: ...

    def audit(self, offset: int, limit: int) -> list[AuditRecord]:
        """Records newest first."""
        ...

    def close(self) -> None: ...
