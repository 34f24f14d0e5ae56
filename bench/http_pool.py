"""A lean HTTP/1.1 client for load generators: keep-alive connections in one pool, each
request written as prepared bytes and each answer read by its Content-Length.

The load a benchmark offers comes from processes on the master's own machine, standing for
other machines: every millisecond of CPU a call costs its client is taken from the master.
aiohttp spends about 0.7 ms of CPU a call; this spends a fraction of that, by doing only
what the benchmarks' calls need: no redirects, no cookies, no chunked answers (the calls
they make are answered with a length; any other answer is an error).
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections import deque
from dataclasses import dataclass
from urllib.parse import urlsplit


class ProtocolError(Exception):
    """An answer this client does not read (no Content-Length), or a connection cut short."""


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    body: bytes


class _Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.idle_since = time.monotonic()

    async def call(self, request: bytes) -> tuple[Answer, bool]:
        """The answer to `request`, and whether the connection may carry another."""
        self.writer.write(request)
        try:
            head = await self.reader.readuntil(b"\r\n\r\n")
            lines = head.lower().split(b"\r\n")
            status = int(lines[0][9:12])
            length = None
            again = True
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                if name == b"content-length":
                    length = int(value)
                elif name == b"connection" and b"close" in value:
                    again = False
            if length is None:
                raise ProtocolError(f"an answer {status} without Content-Length")
            body = await self.reader.readexactly(length) if length else b""
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as e:
            raise ProtocolError(f"an answer cut short or not HTTP/1.1: {e}") from e
        return Answer(status, body), again

    def close(self) -> None:
        self.writer.close()


class Pool:
    """Up to `size` keep-alive connections to `url`'s host; one kept idle longer than
    `keep_idle` seconds is closed rather than used (the server may be closing it)."""

    def __init__(self, url: str, context: ssl.SSLContext | None, size: int, keep_idle: float) -> None:
        """`context`: None for plain HTTP."""
        parts = urlsplit(url)
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.context = context
        self.keep_idle = keep_idle
        self._idle: deque[_Connection] = deque()
        self._room = asyncio.Semaphore(size)
        self._authority = f"{self.host}:{self.port}"

    def get(self, path: str, token: str) -> bytes:
        return (
            f"GET {path} HTTP/1.1\r\nHost: {self._authority}\r\nAuthorization: Bearer {token}\r\n\r\n"
        ).encode()

    def post(self, path: str, token: str, body: bytes) -> bytes:
        return (
            f"POST {path} HTTP/1.1\r\nHost: {self._authority}\r\nAuthorization: Bearer {token}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode() + body

    async def call(self, request: bytes) -> Answer:
        """Send `request` (from `get` or `post`) on a connection of the pool; its answer."""
        async with self._room:
            connection = await self._take()
            try:
                answer, again = await connection.call(request)
            except BaseException:
                connection.close()
                raise
            if again:
                connection.idle_since = time.monotonic()
                self._idle.append(connection)
            else:
                connection.close()
            return answer

    async def _take(self) -> _Connection:
        now = time.monotonic()
        while self._idle:
            connection = self._idle.pop()  # the most recently used: the least likely closed
            if now - connection.idle_since < self.keep_idle and not connection.reader.at_eof():
                return connection
            connection.close()
        reader, writer = await asyncio.open_connection(
            self.host, self.port, ssl=self.context, server_hostname=self.host if self.context else None
        )
        return _Connection(reader, writer)

    def close(self) -> None:
        while self._idle:
            self._idle.pop().close()
