"""Nodes' identities: the certificate each node holds, signed by the cluster CA for its name.

A node joins once, with a bootstrap token and a certificate signing request; the master
signs it for the name asked, unless that name already has an identity (a bootstrap token
never takes over a node: `shoal node remove` frees the name first). From then on the node
presents that certificate on every connection, and the master holds it to the name in it.
A certificate is good while its serial is one the store holds for its name and it has not
expired; removing the node forgets every serial at once. A renewal adds a serial and
keeps the older ones until they expire, so connections opened with them go on.
"""

from __future__ import annotations

import dataclasses

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
    sign_node,
)


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

    def record_join(self, name: str, cert: NodeCertificate, now: float) -> None:
        """Give `name` its first certificate (`check_free` said it has none)."""
        self._store.put_identity(NodeIdentity(name, {cert.serial: cert.not_after}, issued=now))

    def record_renewal(self, name: str, cert: NodeCertificate, now: float) -> None:
        """Add `cert` to the node's serials, forgetting those expired."""
        current = self._store.identity(name)
        if current is None:
            raise NotFound(f"{name} has no identity (it was removed); join again with a bootstrap token")
        serials = {s: until for s, until in current.serials.items() if until > now}
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
