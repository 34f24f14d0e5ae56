"""This node's credentials toward the master, and how the agent gets and keeps them.

A master on https knows each node by a certificate of its own (see master/identities.py).
An agent without one joins: it makes a key and a signing request for its name and sends
them with a bootstrap token (`POST /v1/nodes/join`), over TLS that trusts the cluster CA
alone; the key and the certificate it gets are kept in `<state_dir>/identity` (node.key
0600, node.pem), and every connection after, to the agents' WebSocket and for blobs,
presents that certificate and nothing else. The token is never needed again: a restarted
agent finds its identity on disk. The key is made once and kept (joining.key) until the
certificate is in place, so a join whose answer was lost, asked again (by this agent or
the next started), is made with the same key, and the master answers it with the same
certificate.

Two thirds of the way through its certificate's life the agent renews it over the
certificate itself (`POST /v1/nodes/NAME/renew`, with a new key), and the one TLS context
every connection is made with loads the new pair: connections open go on with the old,
which stays good until it expires, so running tasks never notice. A new pair is written
beside the old (`.new`) and renamed into place, key first: an agent stopped in between
finishes the swap when it starts.

A master on plain http (`--insecure`) gets the cluster token instead, as before.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import ssl
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shoal.config import AgentSettings
from shoal.errors import ShoalError, SpecError
from shoal.files import write_secret
from shoal.masters import FAILOVER, Masters, Unreachable
from shoal.node_identity import MAX_CERTIFIED_NAME
from shoal.trust import UntrustedMaster

if TYPE_CHECKING:  # httpx and cryptography are loaded when used: a plain-http agent needs neither
    import httpx
    from cryptography.hazmat.primitives.asymmetric import ec

    from shoal.calls import AsyncCalls
    from shoal.tls import IdentityFiles

log = logging.getLogger("shoal.agent")
RENEW_AT = 2 / 3  # of a certificate's life: when the agent renews it
_TIMEOUT = 30.0  # seconds a join or renewal call may take
_RETRY_CAP = 30.0  # seconds between tries of a join or renewal the master did not answer, at most


class NotAMember(ShoalError):
    """This node was removed from the cluster (the master closed its connection with
    REMOVED_CLOSE): its tasks are lost to the master, so the agent stops its runs."""


class NotAdmitted(ShoalError):
    """The agent cannot take part as it is set up: no bootstrap token, a certificate of
    another node's or expired, a join or a connection the master refuses. The message says
    what to do; the agent exits and leaves its runs as they are, for the next agent (set up
    right) to take over."""


class Credentials:
    """What the agent presents to the masters at `masters`, as node `name`."""

    def __init__(self, settings: AgentSettings, masters: Masters, name: str) -> None:
        self.name = name
        self._masters = masters
        self.tls = _uses_tls(masters.urls)
        self._ca = settings.ca
        self._bootstrap = settings.bootstrap_token
        self._dir = settings.state_dir / "identity"
        self._context: ssl.SSLContext | None = None
        self._not_after = float("inf")  # when the certificate held expires
        self._cluster_token = settings.cluster_token.get_secret_value() if settings.cluster_token else None
        if self.tls and self._ca is None:
            raise SpecError(
                "ca", "the master is on https: give the cluster CA's certificate (ca.pem) with --ca"
            )
        if self.tls and len(name) > MAX_CERTIFIED_NAME:
            raise SpecError(
                "name",
                f"a node's certificate holds a name of {MAX_CERTIFIED_NAME} characters at most, and "
                f"{name!r} has {len(name)}: give a shorter one with --name",
            )
        if not self.tls and self._cluster_token is None:
            raise SpecError(
                "cluster_token",
                "the master is on plain http (--insecure): give its cluster token with --token "
                "(SHOAL_CLUSTER_TOKEN), or use its https URL",
            )

    @functools.cached_property
    def _files(self) -> IdentityFiles:
        from shoal.tls import IdentityFiles

        return IdentityFiles(self._dir)

    @property
    def headers(self) -> dict[str, str]:
        """What the agents' WebSocket is opened with: the cluster token on plain http."""
        return {} if self.tls else {"Authorization": f"Bearer {self._cluster_token}"}

    @property
    def context(self) -> ssl.SSLContext | None:
        """The TLS context every connection to the master is made with (None: plain http)."""
        return self._context

    def calls(self, token: str | None = None) -> AsyncCalls:
        """HTTP calls to the masters as this node: over TLS with its certificate alone (or
        `token`, to join); on plain http with the cluster token."""
        from shoal.calls import AsyncCalls

        bearer = token if self.tls else self._cluster_token
        return AsyncCalls(self._masters, bearer, _TIMEOUT, FAILOVER, ca=self._context or self._ca)

    # --- getting an identity ---------------------------------------------------------------

    async def ready(self) -> None:
        """Have a good certificate (joining if there is none) and the context presenting it."""
        if not self.tls:
            return
        _settle(self._files)
        pause = 1.0
        while not self._files.exists():
            try:
                await self._join()
            except UntrustedMaster:
                raise  # a setting to fix: trying again changes nothing
            except Unreachable as e:
                log.warning("could not join the cluster yet (%s); trying again in %.0fs", e, pause)
                await asyncio.sleep(pause)
                pause = min(pause * 2, _RETRY_CAP)
        self._joining.unlink(missing_ok=True)
        self._check_held()
        from shoal.tls import client_context

        assert self._ca is not None
        self._context = client_context(self._ca, self._files)

    async def _join(self) -> None:
        if self._bootstrap is None:
            raise NotAdmitted(
                f"this node has no certificate yet ({self._files.root} is empty): join once with a "
                "bootstrap token, --bootstrap-token (SHOAL_BOOTSTRAP_TOKEN; an admin makes one with "
                "`shoal token create NAME --bootstrap`)"
            )
        from shoal.tls import key_pem, node_request

        key = self._joining_key()
        body = {"name": self.name, "csr": node_request(self.name, key).decode()}
        answer = await self._call(self._bootstrap.get_secret_value(), "/v1/nodes/join", body, "join")
        _install(self._files, key_pem(key).decode(), answer["certificate"])
        log.info(
            "joined the cluster as %s: certificate %s kept in %s",
            self.name,
            answer["serial"],
            self._files.root,
        )

    @property
    def _joining(self) -> Path:
        return self._files.root / "joining.key"

    def _joining_key(self) -> ec.EllipticCurvePrivateKey:
        """The key this node joins with: made at the first try and kept until the certificate
        is in place, so every try asks for the certificate of one key."""
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.hazmat.primitives.serialization import load_pem_private_key

        from shoal.tls import key_pem, new_key

        if self._joining.exists():
            kept = load_pem_private_key(self._joining.read_bytes(), password=None)
            assert isinstance(kept, ec.EllipticCurvePrivateKey)  # written below
            return kept
        key = new_key()
        self._files.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        write_secret(self._joining, key_pem(key).decode())
        return key

    def _check_held(self) -> None:
        """The certificate on disk is this node's and still good: else say what to do."""
        from cryptography import x509
        from cryptography.x509.oid import NameOID

        cert = x509.load_pem_x509_certificate(self._files.cert.read_bytes())
        held = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
        if held != self.name:
            raise NotAdmitted(
                f"the certificate in {self._files.root} is {held!r}'s, and this node is named "
                f"{self.name!r}: run it as {held} (--name), or {self._again()}"
            )
        self._not_after = cert.not_valid_after_utc.timestamp()
        self.check_unexpired()

    def check_unexpired(self) -> None:
        """NotAdmitted once the certificate has expired (not renewed in time: no master
        answered for the last third of its life): no master would let it in."""
        if self._not_after <= time.time():
            raise NotAdmitted(
                f"this node's certificate expired at {time.ctime(self._not_after)}: "
                f"`shoal node remove {self.name}` on the master, then {self._again()}"
            )

    def refused(self, url: str) -> str:
        """What to do when the master at `url` refuses this agent's connection outright."""
        if self.tls:
            return (
                f"the master at {url} refused this node's certificate (was {self.name} removed?): "
                f"{self._again()}, after `shoal node remove {self.name}` if the master still knows it"
            )
        return (
            f"the master at {url} refused the cluster token; pass the one in its cluster.token "
            "with --token or SHOAL_CLUSTER_TOKEN"
        )

    def _again(self) -> str:
        return f"remove {self._files.root} and join again with a new bootstrap token"

    # --- keeping it -------------------------------------------------------------------------

    async def keep_renewed(self) -> None:
        """Renew the certificate two thirds of the way through its life, for ever."""
        if not self.tls:
            return
        pause = 1.0
        while True:
            await asyncio.sleep(max(0.0, self._renew_at() - time.time()))
            try:
                await self._renew()
            except (Unreachable, NotAdmitted, OSError) as e:
                log.warning("could not renew this node's certificate (%s); trying again in %.0fs", e, pause)
                await asyncio.sleep(pause)
                pause = min(pause * 2, _RETRY_CAP)
            else:
                pause = 1.0

    def _renew_at(self) -> float:
        from shoal.tls import certificate_times

        issued = self._files.cert.stat().st_mtime  # when it was written here: the master's clock may differ
        _, not_after = certificate_times(self._files.cert.read_bytes())
        return issued + RENEW_AT * (not_after - issued)

    async def _renew(self) -> None:
        from shoal.tls import key_pem, new_key, node_request

        key = new_key()
        body = {"csr": node_request(self.name, key).decode()}
        answer = await self._call(None, f"/v1/nodes/{self.name}/renew", body, "renewal")
        _install(self._files, key_pem(key).decode(), answer["certificate"])
        assert self._context is not None
        self._context.load_cert_chain(self._files.cert, self._files.key)  # for connections from now on
        self._not_after = float(answer["not_after"])
        log.info(
            "renewed this node's certificate: %s, good until %s",
            answer["serial"],
            time.ctime(answer["not_after"]),
        )

    async def _call(self, token: str | None, path: str, body: dict[str, str], what: str) -> dict[str, Any]:
        """POST `body` to `path`; the answer, or NotAdmitted when the master refuses it."""
        calls = self.calls(token)
        try:
            response = await calls.send("POST", path, json=body)
        finally:
            await calls.aclose()
        if response.status_code >= 500 or response.status_code == 429:
            raise Unreachable(
                f"the master answered the {what} with {response.status_code}: {_said(response)}"
            )
        if response.status_code == 409:
            # Most likely a join of this node's whose answer was lost: the master holds an
            # identity for the name whose key this agent never got.
            raise NotAdmitted(
                f"the master refused this node's {what}: {_said(response)}. If this node joined "
                f"before and its certificate was lost, run `shoal node remove {self.name}` on the "
                "master, then start this agent again with a new bootstrap token"
            )
        if response.status_code >= 400:
            raise NotAdmitted(f"the master refused this node's {what}: {_said(response)}")
        return response.json()  # type: ignore[no-any-return]


def _uses_tls(urls: list[str]) -> bool:
    schemes = {url.split("://", 1)[0] for url in urls}
    if len(schemes) > 1:
        raise SpecError(
            "master", f"the URLs mix http and https ({', '.join(urls)}): a cluster's masters use one"
        )
    return schemes == {"https"}


def _said(response: httpx.Response) -> str:
    try:
        return str(response.json().get("error", response.text))
    except ValueError:
        return response.text[:200]


def _pending(path: Path) -> Path:
    return path.with_name(path.name + ".new")


def _install(files: IdentityFiles, key: str, cert: str) -> None:
    """Put a new pair in place: both written beside the old, then renamed, key first."""
    files.root.mkdir(mode=0o700, parents=True, exist_ok=True)
    write_secret(_pending(files.key), key)
    write_secret(_pending(files.cert), cert)
    _settle(files)


def _settle(files: IdentityFiles) -> None:
    """Finish a swap of the pair cut short, or drop a pair never completed."""
    key, cert = _pending(files.key), _pending(files.cert)
    if cert.exists():  # both were written: rename what is left to rename
        if key.exists():
            os.replace(key, files.key)
        os.replace(cert, files.cert)
    key.unlink(missing_ok=True)
