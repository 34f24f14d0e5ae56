"""Which node a call speaks for, and what it may do with the blob store.

On a master serving TLS a node is known by the certificate its connection presents: one
this master issued, for that node's name, still good (`Identities.admits`). Its WebSocket
speaks for that node only, and it fetches and puts only the blobs the master asked it to
(`BlobAccess`). On a master on plain HTTP (`insecure`) any holder of the cluster token may
speak for any node, as before certificates.
"""

from __future__ import annotations

import logging
import time

from fastapi import Request, WebSocket
from starlette.requests import HTTPConnection

from shoal.errors import Forbidden
from shoal.master.deps import MasterDep, admin, admin_or_agent, bearer, caller_of, node_principal
from shoal.master.server import Master, refuse
from shoal.master.serving import peer_of_scope
from shoal.masters import REMOVED_CLOSE
from shoal.tls import NODE_UNIT

log = logging.getLogger("shoal.master")


def certified_node(connection: HTTPConnection, master: Master) -> str | None:
    """The node whose certificate `connection` presents; None when it presents none
    (people and programs bring tokens) or the master knows no certificates (plain HTTP).
    Forbidden when the certificate is not good any more."""
    peer = peer_of_scope(connection.scope)
    if peer is None or master.identities is None:
        return None
    if not master.identities.admits(peer, time.time()):
        raise Forbidden(
            f"{_not_good(peer.name)} (`shoal token create NAME --bootstrap` makes one; "
            f"`shoal node remove {peer.name}` first if it is still known)"
        )
    connection.state.principal = node_principal(peer.name)
    return peer.name


def _not_good(name: str) -> str:
    return f"{name}'s certificate is refused (removed or expired): join again with a new bootstrap token"


async def blob_reader(blob: str, request: Request, master: MasterDep) -> None:
    """Admins; and a node the master gave a reason to fetch `blob` (a copy order sent to
    it, the saved state of a run placed on it)."""
    if master.identities is None:
        await admin_or_agent(request)
        return
    node = certified_node(request, master)
    if node is None:
        await admin(await caller_of(request))
    elif not master.blob_access.may_fetch(master.state.ledger, node, blob):
        raise Forbidden(
            f"{node} was sent no order that names blob {blob}: a node fetches only the files of a "
            "copy sent to it and the saved state of its own runs"
        )


async def blob_writer(request: Request, master: MasterDep) -> str | None:
    """Admins; and a node asked for a blob (the file of a pull sent to it, the saved state
    of a checkpointing run of its own): that node's name, to note what it put."""
    if master.identities is None:
        await admin_or_agent(request)
        return None
    node = certified_node(request, master)
    if node is None:
        await admin(await caller_of(request))
    elif not master.blob_access.may_put(master.state.ledger, node):
        raise Forbidden(
            f"{node} was asked for no file: a node puts only the file of a pull sent to it and the "
            "saved state of its own runs that move with their state"
        )
    return node


async def serve_agent(ws: WebSocket) -> None:
    """The agents' entrance: a node's certificate (TLS), or the cluster token (plain HTTP)."""
    master: Master = ws.app.state.master
    if master.identities is None:
        token = bearer(ws.headers.get("authorization", ""))
        if token is None or not master.tokens.is_cluster(token):
            await ws.close(code=1008, reason="a valid cluster token is required")  # answered 403
            return
        await master.agent_session(ws)
        return
    peer = peer_of_scope(ws.scope)
    if peer is not None and peer.unit != NODE_UNIT:
        peer = None  # a master's certificate, say: no node's
    if peer is None or not master.identities.admits(peer, time.time()):
        # The handshake verified the certificate, expiry included: one not admitted now is
        # one of a node removed, whose agent is to stop its runs.
        why, code = (
            ("a node certificate is required: join once with a bootstrap token (--bootstrap-token)", 1008)
            if peer is None
            else (_not_good(peer.name), REMOVED_CLOSE)
        )
        log.warning("refused an agent connection from %s: %s", ws.client, why)
        await ws.accept()  # first, so that the agent reads why: a refusal before it is a bare 403
        await refuse(ws, why, code)
        return
    log.info("agent %s connects with certificate %s", peer.name, peer.serial)
    await master.agent_session(ws, peer)
