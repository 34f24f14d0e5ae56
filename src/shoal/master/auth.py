"""API and cluster tokens: made here, stored only as SHA-256 digests.

People and programs present an API token bound to a name and a role; agents present the
cluster token. A token is shown once, when it is made, and never logged.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

from shoal.master.store import Store, TokenEntry
from shoal.model import Caller, Role


def new_token() -> str:
    return "shoal_" + secrets.token_urlsafe(32)


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


_KNOWN = 10_000  # tokens remembered after a lookup, at most


class Tokens:
    def __init__(self, store: Store, cluster_token: str) -> None:
        self._store = store
        self._cluster = _digest(cluster_token)
        # Tokens are never revoked, so a token once found stays good: remembering it spares
        # every call a read of the store (a round trip when the store is etcd).
        self._known: dict[str, Caller] = {}

    def add(self, name: str, role: Role, token: str | None = None, roles: tuple[str, ...] = ()) -> str:
        """Bind `token` (or a new one) to `name`, `role` and framework `roles`; returns the token."""
        token = token or new_token()
        digest = _digest(token)
        self._store.put_token(digest, TokenEntry(name, role, roles))
        self._known.pop(digest, None)
        return token

    def caller(self, token: str) -> Caller | None:
        digest = _digest(token)
        if (known := self._known.get(digest)) is not None:
            return known
        entry = self._store.token(digest)
        if entry is None:
            return None
        if len(self._known) >= _KNOWN:
            self._known.clear()
        caller = self._known[digest] = Caller(name=entry.name, role=entry.role, roles=entry.roles)
        return caller

    def is_cluster(self, token: str) -> bool:
        return hmac.compare_digest(_digest(token), self._cluster)
