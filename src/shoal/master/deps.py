"""Who is calling, and the master they reach: the dependencies every route of the API uses."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, Request
from starlette.requests import HTTPConnection
from starlette.types import Scope

from shoal.errors import Forbidden, ShoalError
from shoal.master.server import Master, NotLeading
from shoal.master.serving import peer_of_scope
from shoal.model import Caller, Role
from shoal.tls import NODE_UNIT

AGENT = "agent"  # who the cluster token speaks for: any agent
_CALLER = "caller"  # where a call's state keeps whom its token speaks for


class Unauthorized(ShoalError):
    pass


def bearer(authorization: str) -> str | None:
    """The token of an `Authorization: Bearer <token>` header's value; None for any other."""
    scheme, _, token = authorization.partition(" ")
    return token if scheme.lower() == "bearer" and token else None


def node_principal(name: str) -> str:
    """Whom the audit trail names for a call over node `name`'s certificate."""
    return f"agent:{name}"


async def master_of(request: Request) -> Master:
    master: Master | None = request.app.state.master
    if master is None or not master.serving():
        raise NotLeading("this master does not lead now; the call goes to the leader (`shoal masters`)")
    return master


def caller_in(scope: Scope) -> Caller | None:
    """Whom the call's API token (its first Authorization header) speaks for; None for none,
    or a token that is no API token or no longer good. Looked up once a call, whoever asks
    (`FastReads`, then the route it passes the call on to)."""
    state = scope.setdefault("state", {})  # what request.state reads and writes
    if _CALLER not in state:
        first = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
        token = bearer(first.decode("latin-1"))
        state[_CALLER] = scope["app"].state.tokens.caller(token) if token is not None else None
    caller: Caller | None = state[_CALLER]
    return caller


async def caller_of(request: Request) -> Caller:
    caller = caller_in(request.scope)
    if caller is None:
        raise Unauthorized("a valid API token is required: Authorization: Bearer <token>")
    request.state.principal = caller  # whom the audit trail names
    return caller


def while_token_holds(request: Request, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """`chunks`, for as long as the call's token holds: a stream outlives the check made when
    it opened, so a token revoked or expired meanwhile ends it at its next chunk (a quiet
    stream's next is its keep-alive)."""
    token = bearer(request.headers.get("authorization", ""))
    tokens = request.app.state.tokens

    async def held() -> AsyncIterator[bytes]:
        async with contextlib.aclosing(chunks):  # type: ignore[type-var]
            async for chunk in chunks:
                if token is None or tokens.caller(token) is None:
                    return
                if chunk:
                    yield chunk

    return held()


async def writer(caller: Annotated[Caller, Depends(caller_of)]) -> Caller:
    if caller.role is Role.READER:
        raise Forbidden("read-only tokens cannot change anything")
    return caller


async def admin(caller: Annotated[Caller, Depends(caller_of)]) -> Caller:
    if caller.role is not Role.ADMIN:
        raise Forbidden("this needs an admin token")
    return caller


def is_agent(connection: HTTPConnection) -> bool:
    """Whether the call presents the cluster token (a master on plain HTTP: any agent)."""
    token = bearer(connection.headers.get("authorization", ""))
    if token is not None and connection.app.state.tokens.is_cluster(token):
        connection.state.principal = AGENT
        return True
    return False


async def admin_or_agent(request: Request) -> None:
    """Blobs move between admins (shoal copy) and agents (the cluster token)."""
    if not is_agent(request):
        await admin(await caller_of(request))


async def anyone(request: Request) -> None:
    """Any API token, the cluster token (plain HTTP) or a node's certificate: what agents
    and clients both ask (which masters there are). The cluster CA vouched for the
    certificate at the handshake; the leader also holds it to the node's identity (a
    removed node is refused), which followers, keeping none, cannot."""
    peer = peer_of_scope(request.scope)
    if peer is not None and peer.unit == NODE_UNIT:
        master: Master | None = request.app.state.master
        if master is not None and master.identities is not None:
            if not master.identities.admits(peer, time.time()):
                raise Forbidden(f"{peer.name}'s certificate is refused (removed from the cluster)")
        request.state.principal = node_principal(peer.name)
        return
    if not is_agent(request):
        await caller_of(request)


MasterDep = Annotated[Master, Depends(master_of)]
CallerDep = Annotated[Caller, Depends(caller_of)]
