"""Who is calling, and the master they reach: the dependencies every route of the API uses."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from shoal.errors import Forbidden, ShoalError
from shoal.master.server import Master, NotLeading
from shoal.master.serving import peer_of_scope
from shoal.model import Caller, Role
from shoal.tls import NODE_UNIT

AGENT = "agent"  # who the cluster token speaks for: any agent


class Unauthorized(ShoalError):
    pass


async def master_of(request: Request) -> Master:
    master: Master | None = request.app.state.master
    if master is None or not master.serving():
        raise NotLeading("this master does not lead now; the call goes to the leader (`shoal masters`)")
    return master


async def caller_of(request: Request) -> Caller:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    caller = request.app.state.tokens.caller(token) if scheme.lower() == "bearer" and token else None
    if caller is None:
        raise Unauthorized("a valid API token is required: Authorization: Bearer <token>")
    request.state.principal = caller  # whom the audit trail names
    return caller


async def writer(caller: Annotated[Caller, Depends(caller_of)]) -> Caller:
    if caller.role is Role.READER:
        raise Forbidden("read-only tokens cannot change anything")
    return caller


async def admin(caller: Annotated[Caller, Depends(caller_of)]) -> Caller:
    if caller.role is not Role.ADMIN:
        raise Forbidden("this needs an admin token")
    return caller


def _is_agent(request: Request) -> bool:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and request.app.state.tokens.is_cluster(token):
        request.state.principal = AGENT
        return True
    return False


async def admin_or_agent(request: Request) -> None:
    """Blobs move between admins (shoal copy) and agents (the cluster token)."""
    if not _is_agent(request):
        await admin(await caller_of(request))


async def anyone(request: Request) -> None:
    """Any API token, the cluster token or a node's certificate: what agents and clients
    both ask (which masters there are). The cluster CA vouched for the certificate at the
    handshake; followers, which keep no identities, answer this too."""
    peer = peer_of_scope(request.scope)
    if peer is not None and peer.unit == NODE_UNIT:
        request.state.principal = f"agent:{peer.name}"
        return
    if not _is_agent(request):
        await caller_of(request)


MasterDep = Annotated[Master, Depends(master_of)]
CallerDep = Annotated[Caller, Depends(caller_of)]
