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


class Tokens:
    def __init__(self, store: Store, cluster_token: str) -> None:
        self._store = store
        self._cluster = _digest(cluster_token)

    def add(self, name: str, role: Role, token: str | None = None, roles: tuple[str, ...] = ()) -> str:
        """Bind `token` (or a new one) to `name`, `role` and framework `roles`; returns the token."""
        token = token or new_token()
        self._store.put_token(_digest(token), TokenEntry(name, role, roles))
        return token

    def caller(self, token: str) -> Caller | None:
        entry = self._store.token(_digest(token))
        return None if entry is None else Caller(name=entry.name, role=entry.role, roles=entry.roles)

    def is_cluster(self, token: str) -> bool:
        return hmac.compare_digest(_digest(token), self._cluster)
