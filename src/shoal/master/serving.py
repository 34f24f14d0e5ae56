"""How the master's app is served: uvicorn, over TLS unless the master is `insecure`.

The master builds its own `ssl.SSLContext` (the cluster CA verifies the certificates nodes
present) and keeps it for the life of the process: when `shoal tls cert` writes a new
certificate in place, the same context loads it, so new connections get the new one and
those open keep theirs, without a restart.

uvicorn puts no client certificate in the ASGI scope, so the protocols it runs are
subclassed to note each connection's verified peer, keyed by the address uvicorn gives
the app as `scope["client"]`: `peer_of_scope` reads it back in a route or a WebSocket.
`scope["client"]` is the socket's own peer, never a header (`proxy_headers` off).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import uvicorn
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

from shoal import tls
from shoal.config import MasterSettings
from shoal.errors import ShoalError
from shoal.master.limits import GuardedHttpTools, server_options

log = logging.getLogger("shoal.master.serving")

RELOAD_EVERY = 1.0  # seconds between looks at the certificate's files

Address = tuple[str, int]
_peers: dict[Address, tls.Peer] = {}  # the verified peer of each open TLS connection


class NoCertificate(ShoalError):
    """The master is to serve TLS and its certificate or the cluster CA is missing."""


def peer_of_scope(scope: Mapping[str, Any]) -> tls.Peer | None:
    """Who is at the other end of the request's or WebSocket's connection, by the
    certificate it presented and the cluster CA verified; None without one (people and
    programs bring tokens, not certificates) or on plain HTTP."""
    client = scope.get("client")
    return _peers.get((client[0], client[1])) if client else None


def _note_peer(address: Address | None, transport: asyncio.BaseTransport) -> None:
    """Note the connection's peer, or that it has none: an entry left at its address (of a
    connection whose end went unnoticed) must never speak for this one."""
    if address is None:
        return
    ssl_object = transport.get_extra_info("ssl_object")
    peer = None if ssl_object is None else tls.peer_of(ssl_object.getpeercert())
    if peer is None:
        _peers.pop(address, None)
    else:
        _peers[address] = peer


class _NotesPeer:
    """Keeps `_peers` for the connection of a uvicorn protocol (its `client` address)."""

    client: Address | None

    def connection_made(self, transport: asyncio.Transport) -> None:
        super().connection_made(transport)  # type: ignore[misc]
        _note_peer(self.client, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.client is not None:
            _peers.pop(self.client, None)
        super().connection_lost(exc)  # type: ignore[misc]


class PeerNotingHttp(_NotesPeer, GuardedHttpTools):
    """A connection upgraded to a WebSocket is handed to the WebSocket protocol, which
    notes the same peer again; this one's connection_lost is then never called."""


class PeerNotingWebSockets(_NotesPeer, WebSocketsSansIOProtocol):
    pass


def server_context(settings: MasterSettings) -> ssl.SSLContext:
    """The master's TLS context, from its TLS directory; NoCertificate, saying what to do,
    when a file is missing."""
    files = settings.tls_files()
    if not files.complete():
        raise NoCertificate(
            f"no cluster CA and master certificate in {files.root}: make them with "
            f"`shoal tls init --dir {files.root}` (once per cluster; `shoal tls cert` for another "
            "master), or pass --insecure to serve plain HTTP for a throwaway cluster"
        )
    return tls.server_context(files)


class CertificateReloader:
    """Loads the master's certificate and key into the live context again once their
    files have changed and then stayed as they are for one look (a pair is written one
    file after the other). A new pair that does not load, or that the cluster CA did not
    issue, is logged, and the context keeps the pair it had."""

    def __init__(self, context: ssl.SSLContext, files: tls.TlsFiles) -> None:
        self._context = context
        self._files = files
        self._loaded = self._stamp()
        self._last = self._loaded

    def _stamp(self) -> tuple[int, int] | None:
        try:
            return self._files.cert.stat().st_mtime_ns, self._files.key.stat().st_mtime_ns
        except FileNotFoundError:
            return None

    def check(self) -> None:
        stamp = self._stamp()
        settled, self._last = stamp == self._last, stamp
        if stamp is None or stamp == self._loaded or not settled:
            return
        self._loaded = stamp  # tried once, whatever comes of it: a bad pair is logged once
        try:
            serial = self._load()
        except (OSError, ValueError) as e:  # ssl.SSLError is an OSError
            log.error(
                "kept the master's certificate it had: the new one in %s does not load (%s); "
                "reissue it with `shoal tls cert`",
                self._files.root,
                e,
            )
        else:
            log.info("serving the new master certificate from %s (serial %s)", self._files.root, serial)

    def _load(self) -> str:
        cert, key = self._files.cert.read_bytes(), self._files.key.read_bytes()
        serial = _issued_by_the_authority(cert, self._files.ca_cert.read_bytes())
        # Both files are loaded from one private copy, first into a context of no use, so
        # that a pair that does not match never reaches the live one, half loaded.
        with tempfile.TemporaryDirectory(prefix="shoal-tls-") as scratch:
            cert_path, key_path = Path(scratch, "master.pem"), Path(scratch, "master.key")
            cert_path.write_bytes(cert)
            key_path.write_bytes(key)  # in a directory only this user may enter
            ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert_path, key_path)
            self._context.load_cert_chain(cert_path, key_path)
        return serial

    async def watch(self) -> None:
        while True:
            await asyncio.sleep(RELOAD_EVERY)
            self.check()


def _issued_by_the_authority(cert_pem: bytes, ca_pem: bytes) -> str:
    """The certificate's serial (hex); ValueError unless the cluster CA signed it."""
    from cryptography import x509
    from cryptography.exceptions import InvalidSignature

    cert = x509.load_pem_x509_certificate(cert_pem)
    try:
        cert.verify_directly_issued_by(x509.load_pem_x509_certificate(ca_pem))
    except (InvalidSignature, TypeError):
        raise ValueError("the cluster CA did not issue it") from None
    return tls.serial_hex(cert.serial_number)


class MasterServer:
    """uvicorn serving `app` as `settings` say: over TLS with the master's own context and
    its certificate reloaded in place, or plain HTTP when the master is `insecure`.
    NoCertificate, before anything is served, when TLS has no files."""

    def __init__(self, app: Any, settings: MasterSettings) -> None:
        context = None if settings.insecure else server_context(settings)
        self.config = uvicorn.Config(
            app,
            host=settings.host,
            port=settings.port,
            http=PeerNotingHttp.within(settings.header_timeout),
            ws=PeerNotingWebSockets,
            proxy_headers=False,  # scope["client"] is the socket's peer: no header names another
            log_level="warning",
            access_log=False,
            ssl_context_factory=None if context is None else (lambda _config, _default: context),
            **server_options(settings),
        )
        self.server = uvicorn.Server(self.config)
        self.reloader = None if context is None else CertificateReloader(context, settings.tls_files())

    def run(self) -> None:
        """Serve until the process is told to stop (SIGINT, SIGTERM)."""
        with asyncio.Runner(loop_factory=self.config.get_loop_factory()) as runner:
            runner.run(self.serve())

    async def serve(self) -> None:
        watching = None if self.reloader is None else asyncio.create_task(self.reloader.watch())
        try:
            await self.server.serve()
        finally:
            if watching is not None:
                watching.cancel()

    def stop(self) -> None:
        """Stop serving, from any thread."""
        self.server.should_exit = True


def serve(app: Any, settings: MasterSettings) -> None:
    """Serve the master's `app` until the process is told to stop."""
    MasterServer(app, settings).run()
