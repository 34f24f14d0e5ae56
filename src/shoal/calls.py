"""HTTP calls that find the master serving them: the I/O shell of `masters.Failover`.

A call goes to the current master; a follower's redirect is followed with the call's token
(httpx drops it on the way to another origin, so redirects are ours to follow), a master
down or in an election is passed for the next, a master's rate limit (429) is waited out
a few times (`Patience`), and the call gives up with `Unreachable` as `Failover` decides.
`Calls` blocks (the SDK and its watches); `AsyncCalls` is the asyncio flavour (the asyncio
framework driver, an agent's file transfers).

Once a redirect names a master the caller was not given, every master is asked for, once
(`GET /v1/masters`), so calls go on past the loss of the masters it was given.
"""

from __future__ import annotations

import asyncio
import ssl
import threading
import time
import urllib.parse
from pathlib import Path
from typing import Any

import httpx

from shoal import trust
from shoal.masters import MASTERS_PATH, PATIENCE, Failover, Masters, Patience, Unreachable

_SAFE = ("GET", "HEAD")  # methods repeated after a connection broke with the call sent
_CONNECT = (httpx.ConnectError, httpx.ConnectTimeout)  # nothing was sent: any call may go again
_LIMITS = httpx.Limits(max_connections=100, max_keepalive_connections=20)  # httpx's own default
_LISTING_TIMEOUT = 5.0  # seconds: the masters' list is a help, and the call has its answer


class Calls:
    """Blocking calls over connections of their own. Plain connections serve http masters;
    TLS ones are made at the first https master, trusting the cluster CA in the file `ca`
    alone (without one, the system's CAs). An http master is never spoken to over TLS
    (redirects go to another master's own URL), so it needs no CA bundle: loading one costs
    a command more CPU than its request. A master whose certificate does not pass stops the
    call (`trust.UntrustedMaster`): that is a setting to fix, not a master down.
    Thread-safe; `close()` from any thread cuts off a pause between tries."""

    def __init__(
        self,
        masters: Masters,
        token: str,
        timeout: httpx.Timeout | float,
        failover: float,
        limits: httpx.Limits = _LIMITS,
        ca: str | Path | None = None,
        patience: Patience = PATIENCE,
    ) -> None:
        self.masters = masters
        self.failover = failover
        self.ca = ca
        self.patience = patience
        self.closed = threading.Event()
        self._options = {"headers": _auth(token), "timeout": timeout, "limits": limits}
        self._clients: dict[bool, httpx.Client] = {}
        self._lock = threading.Lock()

    def send(
        self,
        method: str,
        path: str,
        *,
        stream: bool = False,
        safe: bool | None = None,
        **kwargs: Any,
    ) -> httpx.Response:
        """The answer of the master that serves the call, errors included. `safe`: it may be
        repeated after the connection broke with the call sent (default: GET and HEAD). With
        `stream`, the answer is open: the caller closes it. `kwargs` as httpx's `request`."""
        route = _route(self.masters, method, path, safe, self.failover, self.patience)
        while True:
            url = self.masters.current
            http = self._to(url)
            try:
                response = http.send(http.build_request(method, url + path, **kwargs), stream=stream)
            except httpx.TransportError as e:
                if self.closed.is_set():
                    raise Unreachable("closed while calling") from e
                if (wrong := _misconfigured(url, e, self.ca)) is not None:
                    raise wrong from None
                wait = _broke(route, url, e)
            else:
                wait = route.answered(url, response.status_code, response.headers, time.monotonic())
                if wait is None:
                    if self.masters.wants_listing():
                        self.masters.listed(self._listing())
                    return response
                response.close()
            if self.closed.wait(wait):
                raise Unreachable("closed while calling")

    def close(self) -> None:
        self.closed.set()
        with self._lock:
            for client in self._clients.values():
                client.close()

    def _listing(self) -> bytes:
        # One try, at the master that has just answered: the call itself has its answer.
        url = self.masters.current
        try:
            response = self._to(url).get(url + MASTERS_PATH, timeout=_LISTING_TIMEOUT)
        except httpx.TransportError:
            return b""
        return response.content if response.status_code == 200 else b""

    def _to(self, url: str) -> httpx.Client:
        tls = not url.startswith("http://")
        with self._lock:
            if tls not in self._clients:
                self._clients[tls] = httpx.Client(verify=_verify(tls, self.ca), **self._options)
            return self._clients[tls]


class AsyncCalls:
    """`Calls` for asyncio, over one client (long-lived callers: the CA bundle is loaded once).
    `ca` as for `Calls`, or the TLS context itself (an agent presents its certificate)."""

    def __init__(
        self,
        masters: Masters,
        token: str | None,
        timeout: httpx.Timeout | float,
        failover: float,
        ca: str | Path | ssl.SSLContext | None = None,
        patience: Patience = PATIENCE,
    ) -> None:
        self.masters = masters
        self.failover = failover
        self.ca = ca
        self.patience = patience
        verify = ca if isinstance(ca, ssl.SSLContext) else _verify(True, ca)
        self._http = httpx.AsyncClient(headers=_auth(token), timeout=timeout, verify=verify)

    async def send(
        self, method: str, path: str, *, stream: bool = False, safe: bool | None = None, **kwargs: Any
    ) -> httpx.Response:
        """As `Calls.send`."""
        route = _route(self.masters, method, path, safe, self.failover, self.patience)
        while True:
            url = self.masters.current
            try:
                request = self._http.build_request(method, url + path, **kwargs)
                response = await self._http.send(request, stream=stream)
            except httpx.TransportError as e:
                if (wrong := await asyncio.to_thread(_misconfigured, url, e, self.ca)) is not None:
                    raise wrong from None
                wait = _broke(route, url, e)
            else:
                wait = route.answered(url, response.status_code, response.headers, time.monotonic())
                if wait is None:
                    if self.masters.wants_listing():
                        self.masters.listed(await self._listing())
                    return response
                await response.aclose()
            await asyncio.sleep(wait)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _listing(self) -> bytes:
        try:
            response = await self._http.get(self.masters.current + MASTERS_PATH, timeout=_LISTING_TIMEOUT)
        except httpx.TransportError:
            return b""
        return response.content if response.status_code == 200 else b""


def _verify(tls: bool, ca: str | Path | None) -> ssl.SSLContext | bool:
    return trust.master_context(ca) if tls and ca else tls


def _misconfigured(url: str, error: httpx.TransportError, ca: object) -> trust.UntrustedMaster | None:
    """The TLS setting to fix behind a failed call, if that is what failed it: a master's
    certificate that did not pass, TLS met where plain HTTP was sent, or the reverse."""
    if url.startswith("https://"):
        return trust.untrusted(error, url, ca if isinstance(ca, str | Path) else None)
    # A master speaking TLS hangs up on plain HTTP without a word: one handshake tells
    # that from a master gone, and only after a call has failed.
    if isinstance(error, httpx.RemoteProtocolError | httpx.ReadError) and trust.speaks_tls(url):
        return trust.refused_plain(url)
    return None


def _auth(token: str | None) -> dict[str, str]:
    """The call's token; none for a caller its TLS certificate speaks for (an agent)."""
    return {"Authorization": f"Bearer {token}"} if token is not None else {}


def _route(
    masters: Masters, method: str, path: str, safe: bool | None, within: float, patience: Patience
) -> Failover:
    safe = method in _SAFE if safe is None else safe
    return Failover(masters, path, safe=safe, now=time.monotonic(), within=within, patience=patience)


def _broke(route: Failover, url: str, error: httpx.TransportError) -> float:
    why = str(error) or type(error).__name__
    return route.broke(url, why, sent=not isinstance(error, _CONNECT), now=time.monotonic())


def segment(value: str) -> str:
    """`value` as one segment of a path, whatever it holds."""
    return urllib.parse.quote(value, safe="")
