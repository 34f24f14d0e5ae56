"""The API of nodes' identities: a node joins (its first certificate, for a bootstrap
token), renews its certificate over the one it holds, and an admin removes a node."""

from __future__ import annotations

import logging
import time
from typing import Annotated, cast

from fastapi import APIRouter, Depends, Path, Request

from shoal.errors import Forbidden, NotFound
from shoal.master.auth import public_id
from shoal.master.deps import MasterDep, Unauthorized, admin, bearer
from shoal.master.events import RemoveNode
from shoal.master.identities import Identities
from shoal.master.node_access import certified_node
from shoal.master.server import Master
from shoal.model import NODE_NAME, Caller
from shoal.node_identity import JoinRequest, NodeCertificateView, NodeRemoved, RenewRequest
from shoal.tls import NodeCertificate
from shoal.views import ErrorBody

log = logging.getLogger("shoal.master")
router = APIRouter()

NodePath = Annotated[str, Path(min_length=1, max_length=253, pattern=NODE_NAME)]
_ERRORS = {status: {"model": ErrorBody} for status in (401, 403, 404, 409, 422)}


def _identities(master: Master) -> Identities:
    if master.identities is None:
        raise NotFound(
            "this master serves plain HTTP (--insecure): it gives nodes no certificates, agents "
            "present the cluster token"
        )
    return master.identities


def _view(name: str, cert: NodeCertificate, identities: Identities) -> NodeCertificateView:
    return NodeCertificateView(
        name=name,
        certificate=cert.pem.decode(),
        serial=cert.serial,
        not_after=cert.not_after,
        ca=identities.ca_pem(),
    )


async def bootstrap_token(request: Request, master: MasterDep) -> str:
    """The call's bootstrap token, if it is one that may still let a node join or ask again
    for a join it made (unexpired, unrevoked; nothing spent); else 401. A dependency, so it
    is checked before the body: a caller without one makes the master do nothing for it."""
    token = bearer(request.headers.get("authorization", ""))
    if token is None:
        raise Unauthorized(
            "a bootstrap token is required: Authorization: Bearer <token> "
            "(`shoal token create NAME --bootstrap` makes one)"
        )
    if master.tokens.bootstrap(token, used_up=True) is None:
        raise _spent()
    return token


def _spent() -> Unauthorized:
    return Unauthorized(
        "this bootstrap token is unknown, expired, revoked or used up: make another with "
        "`shoal token create NAME --bootstrap`"
    )


@router.post("/v1/nodes/join", status_code=201, response_model=NodeCertificateView, responses=_ERRORS)
async def join(
    body: JoinRequest, request: Request, master: MasterDep, token: Annotated[str, Depends(bootstrap_token)]
) -> NodeCertificateView:
    """A node's first certificate, made out to its name, for a bootstrap token (once per
    node: a name that has one is refused until `shoal node remove NAME`). Asked again with
    the key it was given for (its answer lost), it answers the same certificate again,
    spending nothing, for the token that made the join or any that may make one."""
    identities = _identities(master)
    csr = body.csr.encode()
    held = master.tokens.bootstrap(token, used_up=True)
    if held is None:  # revoked or expired since the dependency looked
        raise _spent()
    used_up = held.uses_left() == 0  # good only to ask again for a join it made
    again = identities.joined_before(body.name, csr, time.time())
    if again is not None and (not used_up or again.token == public_id(token)):
        request.state.principal = f"bootstrap:{held.name}"
        log.info(
            "node %s asked again to join, with its key: certificate %s again",
            body.name,
            again.certificate.serial,
        )
        return _view(body.name, again.certificate, identities)
    if used_up:
        raise _spent()
    # Everything that may refuse the request comes before the use is spent, so a request
    # refused for itself spends none.
    identities.check_request(body.name, csr)
    identities.check_free(body.name)
    entry = master.tokens.redeem_bootstrap(token)
    if entry is None:
        raise _spent()
    cert = identities.sign(body.name, csr)
    identities.record_join(body.name, cert, time.time(), public_id(token))
    request.state.principal = f"bootstrap:{entry.name}"
    log.info("node %s joined with bootstrap token %s (certificate %s)", body.name, entry.name, cert.serial)
    return _view(body.name, cert, identities)


@router.post("/v1/nodes/{name}/renew", response_model=NodeCertificateView, responses=_ERRORS)
async def renew(
    name: NodePath, body: RenewRequest, request: Request, master: MasterDep
) -> NodeCertificateView:
    """A new certificate for a node, asked for over its current one (mutual TLS); the old
    one stays good until it expires."""
    identities = _identities(master)
    node = certified_node(request, master)
    if node is None:
        raise Unauthorized(f"a renewal comes over {name}'s own certificate (mutual TLS), with no token")
    if node != name:
        raise Forbidden(f"this connection's certificate is {node}'s: it renews {node}'s only, not {name}'s")
    cert = identities.sign(name, body.csr.encode())
    identities.record_renewal(name, cert, time.time())
    log.info("node %s renewed its certificate (now %s)", name, cert.serial)
    return _view(name, cert, identities)


@router.delete("/v1/nodes/{name}", response_model=NodeRemoved, responses=_ERRORS)
async def remove(name: NodePath, master: MasterDep, caller: Annotated[Caller, Depends(admin)]) -> NodeRemoved:
    """Take a node out of the cluster (admin only): its certificates are refused from now on,
    its connection is closed, and its tasks are lost, to run elsewhere as their restart
    policy says. It is listed no more until it joins again, with a new bootstrap token."""
    had = master.identities.remove(name) if master.identities is not None else False
    try:
        tasks = cast(list[str], await master.request(lambda req, now: RemoveNode(req, name, now)))
    except NotFound:
        if not had:
            raise NotFound(f"no node {name}: `shoal nodes` lists them") from None
        tasks = []  # it joined, and never registered
    log.warning("node %s removed by %s: %d tasks lost", name, caller.name, len(tasks))
    return NodeRemoved(name=name, identity=had, tasks=tasks)
