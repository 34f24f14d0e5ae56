"""Several masters on etcd: the elected one serves, the others point at it.

`reign` runs for the life of a master process: whenever its `Seat` is elected it opens a
`Master` on the store fenced by the new token (the ledger rebuilt from etcd), serves until
the seat says it may no longer act or a write is refused, then stands that master down and
throws it away, so a master that leads again starts from what etcd holds, never from what
it believed. `FollowerGate` answers every call a follower receives: a 307 to the leader
(HTTP) or a close with code 4307 naming it (the agents' WebSocket), or a 503 while no leader
is known. `GET /v1/masters` and `GET /metrics` are the calls every master answers itself
(a follower's metrics say it does not lead, and how its API answers).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
import urllib.parse
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager

from starlette.types import ASGIApp, Receive, Scope, Send

from shoal.master.events import MastersSeen
from shoal.master.leadership import Member, Seat
from shoal.master.server import Master
from shoal.master.store.gateway import EtcdError
from shoal.masters import LEADER_HEADER, NOT_LEADER_CLOSE, TRY_AGAIN_CLOSE
from shoal.services import MASTER_SERVICE, Endpoint
from shoal.views import MasterView

log = logging.getLogger("shoal.master")
OPEN_PATHS = frozenset({"/v1/masters", "/metrics"})  # answered by followers too (metrics: their own)
_LEADER = LEADER_HEADER.lower().encode()
_LIST_EVERY = 2.0  # seconds between reads of the masters alive, for the registry
_CHECK_EVERY = 0.1  # seconds between checks that a leader may still act
_FAILED_PAUSE = 10.0  # seconds a master that failed to lead waits before it stands again


async def reign(seat: Seat, serving: Callable[[int], AbstractAsyncContextManager[Master]]) -> None:
    """Serve as leader each time `seat` is elected; stand down the moment it may not act."""
    while True:
        await _until(seat, lambda: seat.leading)
        token = seat.token
        failed = False
        try:
            async with serving(token) as master:
                log.info("leading: the ledger holds %d jobs", len(master.state.ledger.jobs))
                lister = asyncio.create_task(_list_masters(seat, master))
                try:
                    await _until(seat, functools.partial(_must_stand_down, seat, master, token))
                finally:
                    lister.cancel()
        except Exception:
            log.exception("leading failed; standing down, and standing again only after a pause")
            failed = True
        if not failed:
            log.warning("standing down: %s", _why_down(seat, token))
        if seat.leading and seat.token == token:
            # Still elected, but we stood down: the deadline passed before the lease thread
            # heard it was lost, a write was refused, or leading failed. Give the lease up, so
            # the next leader (maybe this master again) starts from what etcd holds; a master
            # that failed waits before it stands again, so another takes its turn.
            await asyncio.to_thread(seat.abdicate, _FAILED_PAUSE if failed else 0.0)


async def _list_masters(seat: Seat, master: Master) -> None:
    """Keep `shoal-master` in the registry listing the masters alive, as etcd has them."""
    listed: tuple[Endpoint, ...] = ()
    while True:
        with contextlib.suppress(EtcdError):
            alive = tuple(endpoint_of(m) for m in await asyncio.to_thread(seat.members))
            if alive != listed:
                master.soon(MastersSeen(alive, time.time()))
                listed = alive
        await asyncio.sleep(_LIST_EVERY)


def endpoint_of(member: Member) -> Endpoint:
    """A master as the registry lists it: its API's address and port, its DNS port in meta."""
    url = urllib.parse.urlsplit(member.url)
    return Endpoint(
        id=url.netloc,
        service=MASTER_SERVICE,
        kind="master",
        address=url.hostname or "",
        port=url.port or 80,
        meta={"dns_port": str(member.dns_port), "name": member.name},
    )


def _why_down(seat: Seat, token: int) -> str:
    if seat.token != token or not seat.leading:
        return "the leadership was lost"
    if not seat.may_act():
        return f"the lease could not be renewed in time ({-seat.time_left():.2f}s past its deadline)"
    return "the store refused a write"


def _must_stand_down(seat: Seat, master: Master, token: int) -> bool:
    return master.deposed or not seat.may_act() or seat.token != token


async def _until(seat: Seat, condition: Callable[[], bool]) -> None:
    """Wait until `condition` holds: woken by the seat, and checked every `_CHECK_EVERY`
    seconds besides (a lease deadline passes with no news from anyone)."""
    while not condition():
        seat.changed.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(seat.changed.wait(), _CHECK_EVERY)


def leader_elsewhere(seat: Seat | None) -> Member | None:
    """The leader to send callers to: None while none is known, and while this master is
    elected but still loading the ledger (they are told to come back in a second)."""
    if seat is None or (leader := seat.leader) is None or leader.name == seat.me.name:
        return None
    return leader


class FollowerGate:
    """ASGI middleware: calls reach the routes only while this master serves as leader.

    The others are told where to go: to the leader (307; agents, a close 4307 naming it);
    nowhere yet (503 and an empty leader header: nothing was done; agents, a close 4307
    with no name, which also tells them no leader can be counting their silence); or, by a
    master cut off from etcd that cannot know who leads, to another master (503 and an
    empty leader header; agents, a close 1013, which tells them nothing more)."""

    def __init__(self, app: ASGIApp, seat: Callable[[], Seat | None], serving: Callable[[], bool]) -> None:
        self.app = app
        self.seat = seat
        self.serving = serving

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or self.serving() or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        seat = self.seat()
        if seat is not None and not seat.in_touch:
            await _unsure(scope, receive, send)
            return
        leader = leader_elsewhere(seat)
        if scope["type"] == "websocket":
            await _close_websocket(receive, send, NOT_LEADER_CLOSE, leader.url if leader is not None else "")
            return
        await _redirect(scope, send, leader)


async def _unsure(scope: Scope, receive: Receive, send: Send) -> None:
    why = "this master cannot reach etcd, so it cannot say who leads; try another master"
    if scope["type"] == "websocket":
        await _close_websocket(receive, send, TRY_AGAIN_CLOSE, why)
        return
    body = b'{"error": "' + why.encode() + b'", "fields": []}'
    # Nothing was done (the empty leader header says so): a client goes to another master.
    headers = [(b"retry-after", b"1"), (b"content-type", b"application/json"), (_LEADER, b"")]
    await _respond(send, 503, body, headers)


async def _close_websocket(receive: Receive, send: Send, code: int, reason: str) -> None:
    """Accept, then close with `code` and `reason` (for 4307, the leader an agent dials next)."""
    if (await receive())["type"] != "websocket.connect":
        return
    await send({"type": "websocket.accept"})
    await send({"type": "websocket.close", "code": code, "reason": reason})


async def _redirect(scope: Scope, send: Send, leader: Member | None) -> None:
    if leader is None:
        await _respond(
            send,
            503,
            b'{"error": "no master serves as leader yet (an election is under way, or the new leader '
            b'is loading the ledger); retry in a second", "fields": []}',
            # An empty leader header: nothing was done, so the caller may go to another master.
            [(b"retry-after", b"1"), (b"content-type", b"application/json"), (_LEADER, b"")],
        )
        return
    query = scope.get("query_string", b"")
    path = scope.get("raw_path") or scope["path"].encode()
    location = leader.url.encode() + path + (b"?" + query if query else b"")
    await _respond(
        send,
        307,
        b"",
        [(b"location", location), (_LEADER, leader.url.encode())],
    )


async def _respond(send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]]) -> None:
    length = (b"content-length", str(len(body)).encode())
    await send({"type": "http.response.start", "status": status, "headers": [*headers, length]})
    await send({"type": "http.response.body", "body": body})


async def masters(seat: Seat | None, me: Member) -> list[MasterView]:
    """What `GET /v1/masters` answers: every master alive, the leader marked."""
    if seat is None:
        return [MasterView(name=me.name, url=me.url, leader=True)]
    alive = await asyncio.to_thread(seat.members)
    leader = seat.leader
    return [
        MasterView(name=m.name, url=m.url, leader=leader is not None and m.name == leader.name) for m in alive
    ]
