"""Watching a service: its endpoints now, then again at every change, over blocking queries
of the master's registry (`GET /v1/services/{name}?index=N&wait=...`)."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import httpx
from pydantic import TypeAdapter

from shoal.api_errors import ApiError, api_error
from shoal.calls import Calls, segment
from shoal.masters import Unreachable
from shoal.services import Endpoint

if TYPE_CHECKING:
    from shoal.client import Client

INDEX_HEADER = "X-Shoal-Index"
ENDPOINTS = TypeAdapter(list[Endpoint])
_DEFAULT_WAIT, _MAX_WAIT = 300.0, 600.0  # seconds: a blocking query's, as the master has them


class Watch:
    """A service's endpoints now, then again at every change: an iterator of lists, each in
    the order the master gives. Made by `Client.watch`; a context manager.

    It runs on blocking queries (`?index=N&wait=...`), not on the server-sent events stream:
    every query is a bounded request (the wait, then a read timeout), so a master that dies
    or a connection that silently drops is noticed within one wait, not never; the index
    makes each query resume where the last left off, over any connection; and nothing parses
    a stream. Each query goes where the client's calls go (it shares their `Masters`): to the
    leader, on past masters that are down. When none serves, it is retried with a backoff (up
    to `MAX_BACKOFF` seconds) and then asked afresh, without an index, so a change made
    meanwhile (or an index that started over with another master) is not missed. Only the
    first query raises for lost masters (a wrong URL fails at once); API errors (401, 403,
    422) always raise.

    A list is given only when it differs from the last one given, as a set: answers list
    endpoints of equally loaded nodes in a new order every time. `close()`, from any thread,
    cuts off the query under way and ends the iteration; the watch has its own connection.
    """

    MAX_BACKOFF = 5.0

    def __init__(self, client: Client, name: str, *, every: bool, tag: str | None, wait: float) -> None:
        self._path = service_path(name)
        self._params = service_query(every, tag, 0, wait)
        self._calls = Calls(
            client.known,
            client._token,
            blocking_timeout(1, wait),
            client._calls.failover,
            httpx.Limits(max_connections=1),
            client._calls.ca,
            client._calls.patience,
        )
        self._closed = self._calls.closed
        self._lock = threading.Lock()  # between close() and the thread querying
        self._socket: socket.socket | None = None  # the connection's, to cut a query off
        self._busy = False
        self._index: int | None = None  # None: no answer yet; 0: ask without blocking
        self._last: list[Endpoint] | None = None

    def __iter__(self) -> Watch:
        return self

    def __enter__(self) -> Watch:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def __next__(self) -> list[Endpoint]:
        delay = 0.0
        while not self._closed.is_set():
            try:
                endpoints, index = self._query()
            except (Unreachable, ApiError) as e:
                if self._closed.is_set():
                    break
                if self._index is None or (isinstance(e, ApiError) and e.status < 500):
                    raise
                self._index = 0
                delay = min(self.MAX_BACKOFF, max(0.1, 2 * delay))
                self._closed.wait(delay)
                continue
            if self._closed.is_set():
                break
            delay = 0.0
            self._index = max(index, 1)  # index 0 (never had an endpoint) would not block
            if self._last is None or _by_id(endpoints) != _by_id(self._last):
                self._last = endpoints
                return endpoints
        self.close()
        raise StopIteration

    def close(self) -> None:
        """Stop watching: a query under way is cut off; iterating ends."""
        with self._lock:
            self._closed.set()
            if self._socket is not None:
                with contextlib.suppress(OSError):
                    self._socket.shutdown(socket.SHUT_RDWR)
            if not self._busy:
                self._calls.close()

    def _query(self) -> tuple[list[Endpoint], int]:
        with self._lock:
            if self._closed.is_set():
                raise Unreachable("the watch is closed")
            self._busy = True
        params = {**self._params, "index": str(self._index or 0)}
        try:
            response = self._calls.send("GET", self._path, params=params, extensions={"trace": self._trace})
        finally:
            with self._lock:
                self._busy = False
        if response.is_error:
            raise api_error(response)
        return ENDPOINTS.validate_python(response.json()), int(response.headers.get(INDEX_HEADER, 0))

    def _trace(self, event: str, info: Mapping[str, Any]) -> None:
        """httpcore's trace of the request: keeps the socket of each new connection."""
        if event == "connection.connect_tcp.complete":
            with self._lock:
                self._socket = info["return_value"].get_extra_info("socket")
                if self._closed.is_set() and self._socket is not None:
                    self._socket.shutdown(socket.SHUT_RDWR)


def _by_id(endpoints: list[Endpoint]) -> list[Endpoint]:
    return sorted(endpoints, key=lambda e: e.id)


def service_path(name: str) -> str:
    return f"/v1/services/{segment(name)}"


def service_query(every: bool, tag: str | None, index: int, wait: float | None) -> dict[str, str]:
    params = {"all": "true"} if every else {}
    if tag is not None:
        params["tag"] = tag
    if index:
        params["index"] = str(index)
    if wait is not None:
        params["wait"] = f"{max(0, round(wait * 1000))}ms"
    return params


def blocking_timeout(index: int, wait: float | None) -> httpx.Timeout | Any:
    """A blocking query may take its whole wait (the master caps it at ten minutes) before
    answering; anything else, the client's timeout."""
    if not index:
        return httpx.USE_CLIENT_DEFAULT
    waits = min(_MAX_WAIT, _DEFAULT_WAIT if wait is None else wait)
    return httpx.Timeout(30.0, read=waits + 15.0)
