"""Where the master keeps what it has acknowledged: one small interface, several backends.

SQLite (`SqliteStore`) is the embedded default. Every backend persists a whole `Persist`
command atomically, so a batch of changes is either all there after a crash or not at all.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Protocol

from shoal.errors import ShoalError
from shoal.framework.protocol import FrameworkRecord, TaskStatus
from shoal.master.events import Persist
from shoal.model import JobRecord, Migration, NodeRecord, Role, TaskRecord
from shoal.services import RegistrationRecord
from shoal.shell.protocol import AuditRecord
from shoal.views import TokenKind


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
    kind: TokenKind = "api"
    created: float | None = None  # None: made before tokens kept the time
    expires: float | None = None  # None: never
    last_used: float | None = None
    uses: int | None = None  # a bootstrap token's redemptions allowed; None: any number
    used: int = 0  # its redemptions so far
    revoked: float | None = None  # when it was revoked

    def expired(self, now: float) -> bool:
        return self.expires is not None and now >= self.expires

    def valid(self, now: float) -> bool:
        return self.revoked is None and not self.expired(now)

    def uses_left(self) -> int | None:
        return None if self.uses is None else max(0, self.uses - self.used)


@dataclass(frozen=True, slots=True)
class AuditQuery:
    """Which audit records to list: all when nothing is set."""

    who: str | None = None
    kind: str | None = None
    since: float | None = None  # records at or after this time

    def matches(self, record: AuditRecord) -> bool:
        return (
            (self.who is None or record.who == self.who)
            and (self.kind is None or record.kind == self.kind)
            and (self.since is None or record.at >= self.since)
        )


@dataclass(frozen=True, slots=True)
class NodeIdentity:
    """The certificates the master gave a node: each serial (hex) with its end of validity.
    A renewal adds one and the old lasts until it expires, so open connections go on.
    The certificate the node joined with is kept whole, with its key's digest and the
    bootstrap token that paid for it, so that a join asked again with the same key (its
    answer lost) is answered with it again. Identities kept before they were have None."""

    name: str
    serials: dict[str, float]  # serial -> not after, seconds since the epoch
    issued: float  # when the node joined
    renewed: float | None = None
    key: str | None = None  # the digest of the key it joined with (tls.key_digest)
    certificate: str | None = None  # the certificate it joined with, PEM
    token: str | None = None  # the public id of the bootstrap token its join spent

    @classmethod
    def of(cls, doc: Mapping[str, Any]) -> NodeIdentity:
        """An identity as stored (JSON): fields it lacks take their defaults, and fields this
        release does not know (a later one's) are left out."""
        return cls(**{f.name: doc[f.name] for f in fields(cls) if f.name in doc})

    def admits(self, serial: str, now: float) -> bool:
        return self.serials.get(serial, 0.0) > now


class Store(Protocol):
    def load(self) -> Snapshot: ...

    def apply(self, changes: Persist) -> None: ...

    def token(self, digest: str) -> TokenEntry | None: ...

    def tokens(self) -> list[tuple[str, TokenEntry]]:
        """Every token, as (digest, entry), in no particular order."""
        ...

    def put_tokens(self, entries: Mapping[str, TokenEntry]) -> None:
        """Write several tokens at once (digest -> entry), in one transaction."""
        ...

    def put_uses(self, entries: Mapping[str, TokenEntry]) -> None:
        """Write when tokens were last used: each entry's `last_used`, in one transaction.
        The entries are the tokens as stored (a store may write them whole, as etcd's does:
        the leader, the one writer, passes what it last read or wrote)."""
        ...

    def add_audit(self, *records: AuditRecord) -> int:
        """Keep `records` in one transaction; returns the first one's id (the others' follow)."""
        ...

    def end_audit(self, record: AuditRecord) -> None: ...

    def audit_record(self, record_id: int) -> AuditRecord | None: ...

    def audit(self, offset: int, limit: int, query: AuditQuery | None = None) -> list[AuditRecord]:
        """The records `query` matches (None: all), newest first."""
        ...

    def add_refusals(self, records: Sequence[AuditRecord]) -> None:
        """Add each record's count to the kept one of its minute, source, kind and status (or
        keep it), apart from the audit records: refusals never push those out."""
        ...

    def refusals(self, offset: int, limit: int, since: float | None = None) -> list[AuditRecord]:
        """Refusals kept (of minutes ending after `since`), newest first."""
        ...

    def identity(self, name: str) -> NodeIdentity | None: ...

    def put_identity(self, identity: NodeIdentity) -> None: ...

    def delete_identity(self, name: str) -> bool:
        """Forget a node's identity; whether it had one."""
        ...

    def close(self) -> None: ...
