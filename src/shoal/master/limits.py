"""What one client may cost the master: calls a second, bytes a request, seconds a head.

`Limits` is ASGI middleware, the outermost: it decides before any routing or validation,
so a refused call costs the master next to nothing.

- Calls: a token bucket (`buckets.Bucket`) per caller. A caller is the node a verified
  certificate names, or a bearer token, known by its digest (the token itself is never
  kept); the cluster token is one caller. Nodes (and the cluster token) pass freely on the
  agents' own paths, their WebSocket and the blob store: what they fetch and put there is
  what the master asked of them. A call with no token, or one the master does not know,
  counts against its address. A token seen for the first time is looked up only while its
  address may still call, so a flood of made-up tokens costs at most the address's rate of
  lookups. Over the limit: 429 with `Retry-After`, held back first (a tarpit: an asyncio
  sleep, free) so that a client that calls again at once, as a flooder does on its
  keep-alive connections, is slowed to a call a second per connection; a bounded number
  are held at once, the rest answered at once.
- Bodies: `max_body` bytes, checked on Content-Length before the app runs and counted as a
  chunked body streams; blob uploads are held to `blob_max` instead (the blob store holds
  them to its quota). Over it: 413, the body drained (up to `max_body` more bytes) so the
  client reads the answer, or the connection closed when more is coming.

`server_options` are uvicorn's own limits (WebSocket frames, idle connections, headers) and
`GuardedHttpTools` the HTTP protocol that adds what uvicorn lacks: a deadline for a request's
head (slowloris) and a cap on its size.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

from shoal.config import MasterSettings
from shoal.master.auth import Tokens
from shoal.master.buckets import Buckets
from shoal.master.store.gateway import EtcdError
from shoal.tls import Peer

CALLERS = 50_000  # buckets kept at most (least recently seen dropped): about 15 MB
TARPIT_SLOTS = 1024  # refused calls held back at once, at most; past it they are answered at once
MAX_HEAD = 64 * 1024  # bytes of a request line and headers
BACKLOG = 4096  # connections the kernel queues before accepting: a thousand clients connecting at once
AGENT_PATHS = ("/v1/blobs/",)  # HTTP paths nodes and the cluster token pass without counting


@dataclass(frozen=True, slots=True)
class LimitPolicy:
    max_body: int  # bytes of a request's body
    blob_max: int  # bytes of an uploaded blob
    rate: float  # calls a second a caller may keep up (0: no limit)
    burst: float  # calls a caller may make at once
    tarpit: float  # seconds a refused call is held back, at most

    @classmethod
    def of(cls, settings: MasterSettings) -> LimitPolicy:
        return cls(
            max_body=settings.max_body,
            blob_max=settings.blob_max,
            rate=settings.rate_limit,
            burst=settings.rate_burst,
            tarpit=settings.rate_tarpit,
        )


def server_options(settings: MasterSettings) -> dict[str, Any]:
    """uvicorn.Config's keyword arguments for the master's limits. The HTTP protocol is
    `GuardedHttpTools.within(settings.header_timeout)` (or a subclass's `within`)."""
    return {
        # Agents' largest message is a Register: about 110 bytes a run, and up to 560 more
        # for each health check's output (checks.OUTPUT_LIMIT); the default fits 10,000 runs
        # with a check each.
        "ws_max_size": settings.ws_max,
        "timeout_keep_alive": settings.idle_timeout,
        # uvicorn's h11 protocol reads this; GuardedHttpTools holds httptools to it too.
        "h11_max_incomplete_event_size": MAX_HEAD,
        "backlog": BACKLOG,
    }


def _error(status: int, error: str, field: str | None = None) -> bytes:
    fields = [{"field": field, "reason": error}] if field is not None else []
    return json.dumps({"error": error, "fields": fields}).encode()


async def _answer(send: Send, status: int, body: bytes, *headers: tuple[bytes, bytes]) -> None:
    start = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": [*start, *headers]})
    await send({"type": "http.response.body", "body": body})


def _size(size: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if size >= 1 << shift:
            return f"{size / (1 << shift):.3g} {unit}"
    return f"{size} bytes"


class Limits:
    """ASGI middleware: the call and body limits of `LimitPolicy` (see the module's doc)."""

    def __init__(
        self,
        app: ASGIApp,
        policy: LimitPolicy,
        tokens: Callable[[], Tokens | None],
        peer: Callable[[Scope], Peer | None],
    ) -> None:
        self.app = app
        self.policy = policy
        self.tokens = tokens
        self.peer = peer  # who a connection's verified certificate names
        self.callers = Buckets(policy.rate, policy.burst, CALLERS)
        self.held = 0  # refused calls held back now
        self._cluster: bytes | None = None  # the cluster token's digest, once seen

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind != "http" and kind != "websocket":
            await self.app(scope, receive, send)
            return
        token, length, chunked = _read_headers(scope)
        if self.policy.rate > 0 and (wait := self._admit(scope, token, time.monotonic())) > 0:
            await self._refuse(scope, receive, send, wait, length, chunked)
            return
        if kind == "websocket" or (length is None and not chunked):
            await self.app(scope, receive, send)  # no body: nothing to count
            return
        blob = scope["method"] == "PUT" and scope["path"].startswith("/v1/blobs/")
        cap = self.policy.blob_max if blob else self.policy.max_body
        body = CappedBody(receive, send, cap, self.policy.max_body, "blob_max" if blob else "max_body")
        if length is not None and length > cap:
            await body.refuse(more=True, declared=length)
            return
        try:
            await self.app(scope, body.receive, body.send)
        except Exception:
            if not body.refused:
                raise
            # The app failed because its body was cut short: the client has its 413.

    # --- calls a second -------------------------------------------------------------------

    def _admit(self, scope: Scope, token: bytes | None, now: float) -> float:
        """0.0 to let the call through (its token taken), else the seconds until its caller
        may call again."""
        if (peer := self.peer(scope)) is not None:
            return 0.0 if _agents_own(scope) else self.callers.take(f"peer:{peer.name}", now)
        client = scope.get("client")
        address = client[0] if client else ""
        if token is None:
            return self.callers.take(address, now)
        digest = hashlib.sha256(token).digest()
        if digest == self._cluster:
            return 0.0 if _agents_own(scope) else self.callers.take(digest, now)
        if digest in self.callers:  # a token found good before
            return self.callers.take(digest, now)
        tokens = self.tokens()
        if tokens is None:
            return self.callers.take(address, now)
        if self._cluster is None and tokens.is_cluster(token.decode("latin-1")):
            self._cluster = digest
            return self._admit(scope, token, now)
        if self.callers.empty(address, now):
            return self.callers.take(address, now)  # no lookups for an address over its limit
        try:
            good = tokens.caller(token.decode("latin-1")) is not None
        except EtcdError:
            good = False  # counted against the address; the route answers that etcd is down
        return self.callers.take(digest if good else address, now)

    async def _refuse(
        self, scope: Scope, receive: Receive, send: Send, wait: float, length: int | None, chunked: bool
    ) -> None:
        retry = max(1, math.ceil(wait))
        if self.held < TARPIT_SLOTS and self.policy.tarpit > 0:
            self.held += 1
            try:
                await asyncio.sleep(min(self.policy.tarpit, retry))
            finally:
                self.held -= 1
        error = f"too many calls: at most {self.policy.rate:g} a second; try again in {retry}s"
        headers = [(b"retry-after", str(retry).encode())]
        if scope["type"] == "websocket":
            await _deny_websocket(scope, receive, send, _error(429, error), headers)
            return
        # A body the client is still sending would be read for nothing: hang up on it.
        if chunked or (length is not None and length > self.policy.max_body):
            headers.append((b"connection", b"close"))
        await _answer(send, 429, _error(429, error), *headers)


def _read_headers(scope: Scope) -> tuple[bytes | None, int | None, bool]:
    """The bearer token, the Content-Length and whether the body is chunked. The token is
    that of the first Authorization header, the one the routes read (Starlette's
    `headers.get`): a call is counted against the token it is made with, whatever other
    Authorization headers it adds."""
    token = length = None
    chunked = authorized = False
    for name, value in scope["headers"]:
        if name == b"authorization":
            if not authorized and value[:7].lower() == b"bearer ":
                token = value[7:].strip() or None
            authorized = True
        elif name == b"content-length":
            try:
                length = int(value)
            except ValueError:
                length = None
        elif name == b"transfer-encoding":
            chunked = True
    return token, length, chunked


def _agents_own(scope: Scope) -> bool:
    return scope["type"] == "websocket" or scope["path"].startswith(AGENT_PATHS)


async def _deny_websocket(
    scope: Scope, receive: Receive, send: Send, body: bytes, headers: list[tuple[bytes, bytes]]
) -> None:
    """Answer a WebSocket handshake with a 429, where the server can (else it closes)."""
    if (await receive())["type"] != "websocket.connect":
        return
    if "websocket.http.response" not in scope.get("extensions", {}):
        await send({"type": "websocket.close", "code": 1008, "reason": "too many calls"})
        return
    start = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "websocket.http.response.start", "status": 429, "headers": [*start, *headers]})
    await send({"type": "websocket.http.response.body", "body": body})


class CappedBody:
    """A request's receive and send with its body held to `cap` bytes. Past it the app
    hears that the client has gone (whatever it would answer is dropped) and the client is
    answered 413, once the rest of the body, up to `spare` bytes, is read and thrown away:
    a client that writes its whole body before reading gets the answer, not a reset. A body
    longer still is cut off, the answer saying `connection: close`."""

    __slots__ = ("_receive", "_send", "cap", "spare", "setting", "seen", "started", "refused")

    def __init__(self, receive: Receive, send: Send, cap: int, spare: int, setting: str) -> None:
        self._receive = receive
        self._send = send
        self.cap = cap
        self.spare = spare
        self.setting = setting
        self.seen = 0
        self.started = False  # the app has begun its answer
        self.refused = False

    async def receive(self) -> Message:
        if self.refused:
            return {"type": "http.disconnect"}
        message = await self._receive()
        if message["type"] == "http.request":
            self.seen += len(message.get("body", b""))
            if self.seen > self.cap:
                await self.refuse(more=message.get("more_body", False))
                return {"type": "http.disconnect"}
        return message

    async def send(self, message: Message) -> None:
        if self.refused:
            return
        self.started = True
        await self._send(message)

    async def refuse(self, more: bool, declared: int | None = None) -> None:
        """Answer 413; `more`: the body goes on past what was read; `declared`: its length."""
        self.refused = True
        if more and (declared is None or declared - self.seen <= self.spare):
            more = await self._drain()
        if self.started:
            return  # too late for a status: the app's answer is cut short instead
        error = f"the request body is larger than {_size(self.cap)} (the master's {self.setting})"
        closing = [(b"connection", b"close")] if more else []
        await _answer(self._send, 413, _error(413, error, "body"), *closing)

    async def _drain(self) -> bool:
        """Read the rest of the body, up to `spare` bytes; whether more is still coming."""
        thrown = 0
        while thrown <= self.spare:
            message = await self._receive()
            if message["type"] != "http.request":
                return False  # the client went away
            thrown += len(message.get("body", b""))
            if not message.get("more_body", False):
                return False
        return True


class GuardedHttpTools(HttpToolsProtocol):
    """uvicorn's httptools protocol with deadlines on what a client sends and a size cap on
    each request's head.

    A connection must bring a whole request line and headers within `header_timeout`
    seconds of connecting, or of the previous answer on a keep-alive connection, and then
    each piece of the request's body within `header_timeout` of the one before (as nginx's
    client_body_timeout), or it is closed: uvicorn alone waits for ever, so a client that
    trickles its headers or its body (slowloris) or sends nothing holds a connection for
    good. A body read paused because the route is slow to take it is not the client's
    lateness: its deadline waits. A head larger than the config's
    `h11_max_incomplete_event_size` is answered 431 and closed (httptools has no cap of its
    own). `within(seconds)` makes the subclass with another deadline."""

    header_timeout: ClassVar[float] = 10.0

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self._max_head = config.h11_max_incomplete_event_size or MAX_HEAD
        self._head_due: asyncio.TimerHandle | None = None  # set while a head is awaited
        self._head_bytes = 0
        self._body_due: asyncio.TimerHandle | None = None  # set while more of a body is awaited

    @classmethod
    def within(cls, seconds: float) -> type[GuardedHttpTools]:
        return type(cls.__name__, (cls,), {"header_timeout": seconds})

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._await_head()

    def connection_lost(self, exc: Exception | None) -> None:
        self._head_arrived()
        self._body_arrived()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._head_due is None:
            if self.cycle is not None and self.cycle.more_body and not self.cycle.response_complete:
                self._await_body()
            return
        # Still no whole head: all of `data` was head.
        self._head_bytes += len(data)
        if self._head_bytes > self._max_head and not self.transport.is_closing():
            self._head_arrived()
            body = _error(431, f"the request's line and headers pass {self._max_head} bytes")
            self.transport.write(
                b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: application/json\r\n"
                b"content-length: " + str(len(body)).encode() + b"\r\nconnection: close\r\n\r\n" + body
            )
            self.transport.close()

    def on_headers_complete(self) -> None:
        self._head_arrived()
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._body_arrived()
        super().on_message_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        # The next head is awaited unless a pipelined request (its head in) has started.
        if not self.transport.is_closing() and (self.cycle is None or self.cycle.response_complete):
            self._await_head()

    def _await_head(self) -> None:
        self._head_arrived()
        self._head_bytes = 0
        self._head_due = self.loop.call_later(self.header_timeout, self._head_late)

    def _head_arrived(self) -> None:
        if self._head_due is not None:
            self._head_due.cancel()
            self._head_due = None

    def _head_late(self) -> None:
        self._head_due = None
        if not self.transport.is_closing():
            self.transport.close()

    def _await_body(self) -> None:
        self._body_arrived()
        if not self.transport.is_closing():
            self._body_due = self.loop.call_later(self.header_timeout, self._body_late)

    def _body_arrived(self) -> None:
        if self._body_due is not None:
            self._body_due.cancel()
            self._body_due = None

    def _body_late(self) -> None:
        self._body_due = None
        if self.flow.read_paused:  # the route has not taken what came: the client is not late
            self._await_body()
        elif not self.transport.is_closing():
            self.transport.close()
