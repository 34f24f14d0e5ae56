"""Nodes' identities: the certificate each node holds, signed by the cluster CA for its name.

A node joins once, with a bootstrap token and a certificate signing request; the master
signs it for the name asked, unless that name already has an identity (a bootstrap token
never takes over a node: `shoal node remove` frees the name first). From then on the node
presents that certificate on every connection, and the master holds it to the name in it.
A certificate is good while its serial is one the store holds for its name and it has not
expired; removing the node forgets every serial at once. A renewal adds a serial and
keeps the older ones until they expire, so connections opened with them go on: the
`SERIALS_KEPT` newest at most, so a node renewing in a loop cannot grow its record (read
at each of its calls) without bound. An agent renews two thirds of the way through a
certificate's life, so it holds two good ones at a time, a few more if answers were lost.

A join is answered once, but may be asked for again: when its answer is lost, the agent
asks again with the same key. The certificate a node joined with is kept for that: a join
for a name that has an identity, with the key that identity joined with, gets the same
certificate again while it is still good (`joined_before`), and signs nothing. Any other
key for that name is refused: it is not the node that joined.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

from shoal.errors import NotFound, SpecError
from shoal.master.store import NodeIdentity, Store
from shoal.tls import (
    NODE_UNIT,
    Authority,
    BadRequestForCertificate,
    NodeCertificate,
    Peer,
    TlsFiles,
    read_request,
    request_key,
    sign_node,
)

SERIALS_KEPT = 8  # a node's good certificates kept at most: the newest


class Joined(NamedTuple):
    """What a node joined with: its first certificate, and the bootstrap token (public id)
    that paid for it (None: joined before that was kept)."""

    certificate: NodeCertificate
    token: str | None


class Identities:
    def __init__(self, store: Store, files: TlsFiles, days: float) -> None:
        self._store = store
        self._files = files
        self._days = days
        self._authority: Authority | None = None

    def _ca(self) -> Authority:
        if self._authority is None:  # read when first needed: most starts sign nothing
            self._authority = Authority.load(self._files)
        return self._authority

    def ca_pem(self) -> str:
        return self._ca().pem().decode()

    def check_request(self, name: str, request: bytes) -> None:
        """SpecError (csr) if node `name`'s request could not be signed; nothing is signed."""
        try:
            read_request(request)
        except BadRequestForCertificate as e:
            raise SpecError("csr", f"{e}; make it with the node's key for CN={name}") from None

    def sign(self, name: str, request: bytes) -> NodeCertificate:
        """A certificate for node `name` from its request; SpecError (csr) if it cannot be."""
        try:
            return sign_node(self._ca(), request, name, self._days)
        except BadRequestForCertificate as e:
            raise SpecError("csr", f"{e}; make it with the node's key for CN={name}") from None

    def check_free(self, name: str) -> None:
        """SpecError (409) if `name` has an identity already."""
        if self._store.identity(name) is not None:
            raise SpecError(
                "name",
                f"{name} already has an identity; `shoal node remove {name}` first, then join again",
                status=409,
            )

    def joined_before(self, name: str, request: bytes, now: float) -> Joined | None:
        """What `name` joined with, if `request` is made with the key it joined with and that
        certificate is still good (not expired, the node not removed): a join asked again,
        its answer lost. None otherwise (no identity, another key, a request that is none)."""
        identity = self._store.identity(name)
        if identity is None or identity.key is None or identity.certificate is None:
            return None
        try:
            if request_key(request) != identity.key:
                return None
        except BadRequestForCertificate:
            return None
        cert = NodeCertificate.of(identity.certificate.encode())
        return Joined(cert, identity.token) if identity.admits(cert.serial, now) else None

    def record_join(self, name: str, cert: NodeCertificate, now: float, token: str | None = None) -> None:
        """Give `name` its first certificate (`check_free` said it has none), paid for by the
        bootstrap token of public id `token`."""
        identity = NodeIdentity(
            name,
            {cert.serial: cert.not_after},
            issued=now,
            key=cert.key,
            certificate=cert.pem.decode(),
            token=token,
        )
        self._store.put_identity(identity)

    def record_renewal(self, name: str, cert: NodeCertificate, now: float) -> None:
        """Add `cert` to the node's serials, forgetting those expired, and the oldest past
        `SERIALS_KEPT`."""
        current = self._store.identity(name)
        if current is None:
            raise NotFound(f"{name} has no identity (it was removed); join again with a bootstrap token")
        good = [(s, until) for s, until in current.serials.items() if until > now]  # oldest first
        serials = dict(good[-(SERIALS_KEPT - 1) :])
        serials[cert.serial] = cert.not_after
        self._store.put_identity(dataclasses.replace(current, serials=serials, renewed=now))

    def remove(self, name: str) -> bool:
        """Forget the node's certificates, all at once; whether it had any."""
        return self._store.delete_identity(name)

    def admits(self, peer: Peer | None, now: float) -> bool:
        """Whether `peer` is a node presenting a certificate of its own that is still good."""
        if peer is None or peer.unit != NODE_UNIT:
            return False
        identity = self._store.identity(peer.name)
        return identity is not None and identity.admits(peer.serial, now)
