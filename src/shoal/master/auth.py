"""API, bootstrap and cluster tokens: made here, stored only as SHA-256 digests.

People and programs present an API token bound to a name and a role; agents of a master on
plain HTTP present the cluster token (a master serving TLS has none: nodes present their
certificates); a node joining the cluster presents a bootstrap token, which opens nothing
else, and Prometheus a metrics token, which opens GET /metrics alone. A token is shown
once, when it is made, and never logged: its public id (the first 16 hex digits of its
digest) names it in listings and revocations.

A token may expire and may be revoked. A token once found is remembered, so a call costs no
read of the store (a round trip on etcd), but its expiry is checked at every lookup and its
revocation forgets it at once. Only the master that writes (the leader, or the only one)
can keep that promise: a follower's tokens only read, and forget what they found after a
few seconds. When a token was last used is kept in memory and written now and then, not on
every call.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from shoal.errors import ShoalError
from shoal.master.store import Store, TokenEntry
from shoal.model import Caller, Role
from shoal.views import TokenKind

log = logging.getLogger("shoal.master")

ID_LENGTH = 16  # hex digits of the digest that make a token's public id
USES_WRITTEN_EVERY = 30.0  # seconds between writes of when tokens were last used
_KNOWN = 10_000  # tokens remembered after a lookup, at most
_FOLLOWER_MEMORY = 5.0  # seconds a follower trusts a token it found: it hears of no revocation


def new_token() -> str:
    return "shoal_" + secrets.token_urlsafe(32)


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def token_id(digest: str) -> str:
    return digest[:ID_LENGTH]


def public_id(token: str) -> str:
    """The id that names `token` in listings, revocations and records."""
    return token_id(_digest(token))


@dataclass(frozen=True, slots=True)
class Issued:
    token: str  # the secret, shown this once
    id: str
    entry: TokenEntry


@dataclass(frozen=True, slots=True)
class _Known:
    entry: TokenEntry
    caller: Caller
    found: float


class Tokens:
    def __init__(
        self,
        store: Store,
        cluster_token: str | None,
        *,
        read_only: bool = False,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._cluster = None if cluster_token is None else _digest(cluster_token)
        self._read_only = read_only
        self._clock = clock
        self._known: dict[str, _Known] = {}
        self._used: dict[str, float] = {}  # digest -> when last used, not written yet
        self._written = clock()  # when last uses were last written

    def add(
        self,
        name: str,
        role: Role,
        roles: tuple[str, ...] = (),
        *,
        kind: TokenKind = "api",
        ttl: float | None = None,
        uses: int | None = None,
    ) -> Issued:
        """A new token for `name`: an API token with `role` and framework `roles`, or a
        bootstrap token good for `uses` joins; it expires `ttl` seconds from now (None: never)."""
        token, now = new_token(), self._clock()
        expires = None if ttl is None else now + ttl
        entry = TokenEntry(name, role, roles, kind=kind, created=now, expires=expires, uses=uses)
        digest = _digest(token)
        self._store.put_tokens({digest: entry})
        return Issued(token, token_id(digest), entry)

    def seed(self, name: str, role: Role, token: str) -> None:
        """Bind `token` to `name` and `role` unless it is already (the admin token, at every
        start): a token kept as it is keeps when it was made and used, and a revocation."""
        digest = _digest(token)
        entry = self._store.token(digest)
        if entry is None or (entry.name, entry.role, entry.kind) != (name, role, "api"):
            self._store.put_tokens({digest: TokenEntry(name, role, created=self._clock())})
            self._known.pop(digest, None)
        elif entry.revoked is not None:
            log.warning(
                "the %s token given to this master is revoked; remove its file (and SHOAL_ADMIN_TOKEN)"
                " to have a new one made at the next start",
                name,
            )

    def caller(self, token: str) -> Caller | None:
        """Who an API token speaks for; None for an unknown, expired or revoked token, and
        for a bootstrap token."""
        digest, now = _digest(token), self._clock()
        known = self._known.get(digest)
        if known is None or (self._read_only and now - known.found > _FOLLOWER_MEMORY):
            known = self._look_up(digest, now)
            if known is None:
                return None
        if not known.entry.valid(now):
            return None
        if not self._read_only:
            self._used[digest] = now
            if now - self._written >= USES_WRITTEN_EVERY:
                self._write_uses_now_and_then()
        return known.caller

    def _look_up(self, digest: str, now: float) -> _Known | None:
        entry = self._store.token(digest)
        if entry is None or entry.kind != "api":
            self._known.pop(digest, None)
            return None
        if len(self._known) >= _KNOWN:
            self._known.clear()
        caller = Caller(name=entry.name, role=entry.role, roles=entry.roles)
        known = self._known[digest] = _Known(entry, caller, now)
        return known

    def scraper(self, token: str) -> str | None:
        """The name of a metrics token, unexpired and unrevoked, which opens GET /metrics and
        nothing else; None for any other. Read from the store each time: a scrape comes every
        few seconds at most, and a revocation holds at once, on a follower too."""
        digest, now = _digest(token), self._clock()
        entry = self._store.token(digest)
        if entry is None or entry.kind != "metrics" or not entry.valid(now):
            return None
        if not self._read_only:
            self._used[digest] = now
        return entry.name

    def bootstrap(self, token: str, *, used_up: bool = False) -> TokenEntry | None:
        """The entry of a bootstrap token that is unexpired, unrevoked and has uses left (or,
        with `used_up`, none left: it may still ask again for a join it made); None
        otherwise. Nothing is counted: a join checks the token before all else, and spends a
        use (`redeem_bootstrap`) only once nothing else refuses it."""
        return self._usable(_digest(token), self._clock(), used_up)

    def _usable(self, digest: str, now: float, used_up: bool = False) -> TokenEntry | None:
        entry = self._store.token(digest)
        if entry is None or entry.kind != "bootstrap" or not entry.valid(now):
            return None
        if not used_up and (left := entry.uses_left()) is not None and left <= 0:
            return None
        return entry

    def redeem_bootstrap(self, token: str) -> TokenEntry | None:
        """Count one use of a bootstrap token that is unexpired, unrevoked and has uses
        left, written before this returns; its entry as counted, or None (nothing counted).
        A token's last use goes to one caller only: joins run on the master's event loop,
        and this does not give it up between its read and its write."""
        digest, now = _digest(token), self._clock()
        entry = self._usable(digest, now)
        if entry is None:
            return None
        redeemed = replace(entry, used=entry.used + 1, last_used=now)
        self._store.put_tokens({digest: redeemed})
        return redeemed

    def listing(self) -> list[tuple[str, TokenEntry]]:
        """Every token as (id, entry), oldest first, with when each was last used."""
        self.write_uses()
        every = sorted(self._store.tokens(), key=lambda item: (item[1].created or 0.0, item[0]))
        return [(token_id(digest), entry) for digest, entry in every]

    def revoke(self, public_id: str) -> TokenEntry | None:
        """Revoke the token of id `public_id` from now on; its entry, or None if there is none."""
        self.write_uses()
        for digest, entry in self._store.tokens():
            if token_id(digest) == public_id:
                if entry.revoked is None:
                    entry = replace(entry, revoked=self._clock())
                    self._store.put_tokens({digest: entry})
                self._known.pop(digest, None)
                return entry
        return None

    def write_uses(self) -> None:
        """Write when tokens were last used, as far as this master has seen since it last did."""
        used, self._used = self._used, {}
        self._written = self._clock()
        if not used:
            return
        entries = {}
        for digest, at in used.items():
            known = self._known.get(digest)
            entry = known.entry if known is not None else self._store.token(digest)
            if entry is not None:
                entries[digest] = replace(entry, last_used=max(at, entry.last_used or 0.0))
        try:
            self._store.put_uses(entries)
        except BaseException:
            self._used = used  # tried again next time
            raise
        for digest, entry in entries.items():
            if (known := self._known.get(digest)) is not None:
                self._known[digest] = replace(known, entry=entry)

    def _write_uses_now_and_then(self) -> None:
        try:
            self.write_uses()
        except ShoalError as e:  # the call at hand goes on; the uses are written later
            log.warning("when tokens were last used could not be written: %s", e)

    def is_cluster(self, token: str) -> bool:
        """Whether `token` is the cluster token; never on a master serving TLS, which has none."""
        return self._cluster is not None and hmac.compare_digest(_digest(token), self._cluster)
