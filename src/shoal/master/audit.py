"""The audit trail: every call that changes something (POST, PUT, PATCH, DELETE) is recorded.

A record says who (see below), what (a kind named after the route: `job.submit`,
`token.revoke`; a route not named here is `METHOD /path/{template}`), to what (the path's
parameters: a job, a node, a token's id), when, from where (the caller's address) and the
status answered. Refused calls are recorded too: a 403 with the name of the token that was
not allowed. A call made to no route (404, 405) did nothing and is not recorded.

Refusals before the caller is known (a 401, or any error of a call without a token the
master takes) are not records: anyone who can reach the master can make them, and they must
not push the records out. They are counted in memory, one count a minute per address, kind
and status, and written to a bounded table of their own a second after the first
(`GET /v1/audit/refused`): a flood of them costs a write a second.

Who: `request.state.principal`, when a dependency set it (the API's own set the `Caller`
of an API token, or `agent` for the cluster token; another may set a name such as
`agent:node3` or `bootstrap:<token name>`); else whom the bearer token speaks for; else
`anonymous`.

A record is written once the status is known and before the answer leaves, so an answered
call has its record (a failed write is logged, and the answer goes out: what was done is
done). The records of one turn of the event loop are written together, in one transaction:
calls answered together (submissions the ledger took in one batch) cost one sync. A route
that keeps its own, fuller record (a parallel command: its nodes and how it ended on each)
says so with `kept`, and the trail adds none.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from shoal.errors import ShoalError
from shoal.master.auth import Tokens
from shoal.master.deps import AGENT, MasterDep, admin, bearer
from shoal.master.server import Master
from shoal.model import Caller
from shoal.shell.protocol import AuditRecord

log = logging.getLogger("shoal.master")

MUTATING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
ANONYMOUS = "anonymous"
KINDS = {
    ("POST", "/v1/jobs"): "job.submit",
    ("POST", "/v1/jobs/{job_id}/kill"): "job.kill",
    ("POST", "/v1/exec"): "exec",
    ("POST", "/v1/copy"): "copy",
    ("POST", "/v1/rcopy"): "rcopy",
    ("POST", "/v1/audit"): "exec",  # a parallel command run over SSH, recorded by its runner
    ("POST", "/v1/audit/{record_id}/end"): "exec.end",
    ("PUT", "/v1/blobs/{blob}"): "blob.put",
    ("POST", "/v1/tokens"): "token.create",
    ("POST", "/v1/tokens/{token_id}/revoke"): "token.revoke",
    ("POST", "/v1/frameworks/subscribe"): "framework.subscribe",
    ("POST", "/v1/frameworks/{framework_id}/call"): "framework.call",
    ("POST", "/v1/rebalance"): "rebalance",
    ("POST", "/v1/nodes/{name}/drain"): "node.drain",
    ("POST", "/v1/nodes/{name}/undrain"): "node.undrain",
    ("POST", "/v1/nodes/join"): "node.join",
    ("POST", "/v1/nodes/{name}/renew"): "node.renew",
    ("DELETE", "/v1/nodes/{name}"): "node.remove",
    ("PUT", "/v1/services/register"): "service.register",
    ("PUT", "/v1/services/deregister/{registration}"): "service.deregister",
    ("PUT", "/v1/services/{registration}/{verdict}"): "service.check",
}
_KIND_MAX = 200  # characters of an unknown route's path kept as its kind
_KEPT = "audit_kept"
_FLUSH_AFTER = 1.0  # seconds refusals are counted in memory before they are written
_PENDING_MAX = 4096  # counts held in memory at most: past it they are written at once

router = APIRouter()


@router.get("/v1/audit/refused", response_model=list[AuditRecord])
async def refused(
    master: MasterDep,
    caller: Annotated[Caller, Depends(admin)],
    offset: Annotated[int, Query(ge=0, le=2**62)] = 0,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 100,
    since: Annotated[float | None, Query(ge=0, le=2**40, description="only since this Unix time")] = None,
) -> list[AuditRecord]:
    """Calls refused before the caller was known, newest first: one record a minute for each
    address, kind and status, with its count (written within a second of the first)."""
    return master.store.refusals(offset, limit, since)


def kind_of(scope: Scope) -> str:
    method = scope["method"]
    route = scope.get("route")
    template = getattr(route, "path", None) or scope["path"]
    return KINDS.get((method, template)) or f"{method} {template}"[:_KIND_MAX]


def record_for(request: Request, caller: Caller, status: int, **fields: Any) -> AuditRecord:
    """The record of this call as the trail would make it, for a route that keeps its own
    (with `fields` the trail cannot know), answering `status`."""
    return AuditRecord(
        at=time.time(),
        who=caller.name,
        role=caller.role.value,
        kind=kind_of(request.scope),
        target=_target(request.scope),
        source=_source(request.scope),
        status=status,
        **fields,
    )


def kept(request: Request) -> None:
    """This call's route has kept its record: the trail adds none."""
    request.state.audit_kept = True


class AuditTrail:
    """ASGI middleware: a record of every mutating call under /v1, written through the
    serving master's store."""

    def __init__(
        self, app: ASGIApp, master: Callable[[], Master | None], tokens: Callable[[], Tokens | None]
    ) -> None:
        self.app = app
        self.master = master
        self.tokens = tokens
        self.records = Records(master)
        self.refusals = Refusals(master)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in MUTATING or not scope["path"].startswith("/v1/"):
            await self.app(scope, receive, send)
            return
        state = scope.setdefault("state", {})  # what request.state reads and writes
        at = time.time()
        answered = False

        async def send_answer(message: Message) -> None:
            nonlocal answered
            if message["type"] == "http.response.start" and not answered:
                answered = True
                await self._keep(scope, state, at, message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_answer)
        except Exception:
            if not answered:
                await self._keep(scope, state, at, 500)
            raise

    async def _keep(self, scope: Scope, state: dict[str, Any], at: float, status: int) -> None:
        if state.get(_KEPT) or self.master() is None or status == 405 or scope.get("route") is None:
            return
        who, role = self._who(scope, state, status)
        if who == ANONYMOUS and status >= 400:
            self.refusals.add(at, status, _source(scope), kind_of(scope))
            return
        await self.records.add(
            AuditRecord(
                at=at,
                who=who,
                role=role,
                kind=kind_of(scope),
                target=_target(scope),
                source=_source(scope),
                status=status,
            )
        )

    def _who(self, scope: Scope, state: dict[str, Any], status: int) -> tuple[str, str]:
        """The principal's name and role ("" when it has none)."""
        principal = state.get("principal")
        if status == 401:
            return ANONYMOUS, ""
        if isinstance(principal, Caller):
            return principal.name, principal.role.value
        if isinstance(principal, str):
            return principal, ""
        token = bearer(_header(scope, b"authorization"))
        tokens = self.tokens()
        if token is None or tokens is None:
            return ANONYMOUS, ""
        if (caller := tokens.caller(token)) is not None:
            return caller.name, caller.role.value
        return (AGENT, "") if tokens.is_cluster(token) else (ANONYMOUS, "")


class Records:
    """The records of one turn of the loop, written together when it ends."""

    def __init__(self, master: Callable[[], Master | None]) -> None:
        self.master = master
        self.pending: list[AuditRecord] = []
        self.written: asyncio.Future[None] | None = None

    async def add(self, record: AuditRecord) -> None:
        """Keep `record` with this turn's others; back once they are written (or failed to be)."""
        self.pending.append(record)
        if self.written is None:
            loop = asyncio.get_running_loop()
            self.written = loop.create_future()
            loop.call_soon(self._write)
        await asyncio.shield(self.written)  # a caller gone does not stop the others' write

    def _write(self) -> None:
        pending, written = self.pending, self.written
        self.pending, self.written = [], None
        try:
            if (master := self.master()) is not None:
                first = master.store.add_audit(*pending)
                for i, record in enumerate(pending):
                    record.id = first + i
                master.broadcast.audited(pending)
                master.broadcast.wake()
        except ShoalError as e:
            for r in pending:
                log.warning("%s of %s by %s (%d) went unrecorded: %s", r.kind, r.target, r.who, r.status, e)
        finally:
            assert written is not None
            written.set_result(None)


class Refusals:
    """Counts of refusals before the caller is known, held a second and written together."""

    def __init__(self, master: Callable[[], Master | None]) -> None:
        self.master = master
        self.pending: dict[tuple[float, int, str, str], int] = {}  # (minute, status, source, kind)
        self.due: asyncio.TimerHandle | None = None

    def add(self, at: float, status: int, source: str, kind: str) -> None:
        key = (at - at % 60, status, source, kind)
        self.pending[key] = self.pending.get(key, 0) + 1
        if len(self.pending) >= _PENDING_MAX:  # many addresses: memory stays bounded
            self.flush()
        elif self.due is None:
            self.due = asyncio.get_running_loop().call_later(_FLUSH_AFTER, self.flush)

    def flush(self) -> None:
        if self.due is not None:
            self.due.cancel()
            self.due = None
        pending, self.pending = self.pending, {}
        master = self.master()
        if not pending or master is None:
            return
        records = [
            AuditRecord(at=minute, who=ANONYMOUS, kind=kind, source=source, status=status, count=count)
            for (minute, status, source, kind), count in pending.items()
        ]
        try:
            master.store.add_refusals(records)
        except ShoalError as e:
            log.warning("%d refused calls went uncounted: %s", sum(pending.values()), e)


def _header(scope: Scope, name: bytes) -> str:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return value.decode("latin-1")
    return ""


def _target(scope: Scope) -> str:
    return "/".join(str(value) for value in scope.get("path_params", {}).values())


def _source(scope: Scope) -> str:
    client = scope.get("client")
    return client[0] if client else ""
