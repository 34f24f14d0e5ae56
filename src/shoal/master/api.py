"""The REST API (`/v1`) and the agents' WebSocket entrance: routes, auth, validation; thin.

Every route authenticates: API tokens for people and programs, the cluster token for
agents. Bad input answers 4xx with the field and the reason (`ErrorBody`), never a 500.
"""

from __future__ import annotations

import logging
import random
import time
from typing import Annotated, Literal

from ClusterShell.NodeSet import NodeSet
from fastapi import Body, Depends, FastAPI, Path, Query, Request, WebSocket
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from shoal.config import MasterSettings
from shoal.errors import Forbidden, NotFound, SpecError
from shoal.framework import protocol as fp
from shoal.master import ha, identity_api, queue_api, service_api, stream_api, token_api, ui
from shoal.master.audit import AuditTrail, kept, record_for
from shoal.master.audit import router as audit_router
from shoal.master.deps import (
    CallerDep,
    MasterDep,
    Unauthorized,
    admin,
    anyone,
    while_token_holds,
    writer,
)
from shoal.master.events import Drain, FrameworkCall, KillJob, Principal, RebalanceNow, Submit
from shoal.master.ha import FollowerGate
from shoal.master.history_api import router as history_router
from shoal.master.job_reads import FastReads, job_of, list_jobs, view_job, view_of
from shoal.master.limits import LimitPolicy, Limits
from shoal.master.metrics import instrument
from shoal.master.node_access import blob_reader, blob_writer, serve_agent
from shoal.master.opening import lifespan
from shoal.master.run_as import RunAs, accept_as, job_as
from shoal.master.server import Master, NotLeading, Unavailable
from shoal.master.serving import peer_of_scope
from shoal.master.shell import Order
from shoal.master.store import AuditQuery, Deposed
from shoal.master.store.gateway import EtcdError
from shoal.masters import LEADER_HEADER
from shoal.model import Caller, JobSpec, Migration, Role, TaskRecord
from shoal.shell.groups import NodeGroups, choose, resolve
from shoal.shell.protocol import AuditEnd, AuditRecord, AuditStart, CopyRequest, ExecRequest, FetchRequest
from shoal.views import (
    ErrorBody,
    FieldError,
    FrameworkView,
    JobView,
    MasterView,
    NodeView,
    PlannedMove,
    Submitted,
)

log = logging.getLogger("shoal.master")


def _principal(caller: Caller) -> Principal:
    return Principal(caller.name, caller.role is Role.ADMIN, frozenset(caller.roles))


def _node_names(spec: JobSpec, master: Master) -> frozenset[str] | None:
    """The job's node set, resolved with ClusterShell and shoal's node groups (`@gpu`,
    `@rack:r1`, groups.conf); group sources may need I/O, so this is done here."""
    if spec.nodes is None:
        return None
    groups = NodeGroups(master.node_views() if "@" in spec.nodes else ())
    return frozenset(resolve(groups, [spec.nodes]))


def _users_decided(
    call: fp.Call, master: Master, caller: Principal, framework_id: str, run_as: RunAs
) -> fp.Call:
    """An ACCEPT with the user of each task decided for the framework's principal (an admin
    calling for it may name any user). Other calls, and calls to frameworks that are not the
    caller's, go as they are: the framework desk answers them."""
    framework = master.state.frameworks.frameworks.get(framework_id)
    if not isinstance(call, fp.Accept) or framework is None:
        return call
    owner = framework.record.principal
    if not (caller.admin or caller.name == owner):
        return call
    return accept_as(call, run_as, owner, caller.admin)


def _fan_out(
    master: Master,
    request: Request,
    caller: Caller,
    body: ExecRequest | CopyRequest | FetchRequest,
    what: object,
) -> StreamingResponse:
    """Send `body` to the nodes it selects, audited, answering with the stream of events."""
    chosen = choose(master.node_views(), body.select, random.shuffle)
    if not chosen.targets and not chosen.down:
        raise SpecError("select", "no node matches the selection", status=404)
    nodes = str(NodeSet.fromlist([*chosen.targets, *chosen.down]))
    record = record_for(request, caller, 200, command=what, nodes=nodes)
    record.id = master.store.add_audit(record)
    kept(request)
    log.info("parallel #%d by %s on %s: %s", record.id, caller.name, record.nodes, what)
    order = Order.of(body)
    return StreamingResponse(
        master.shell.stream(order, chosen, record, master.store.end_audit), media_type=_MSGPACK
    )


def create_app(settings: MasterSettings) -> FastAPI:
    # No OpenTelemetry: its check alone costs each call a few percent of the master's time.
    app = FastAPI(
        title="shoal",
        version="0.1.0",
        lifespan=lambda app: lifespan(app, settings),
        telemetry={"tracing": False, "metrics": False, "logs": False},
    )
    _errors(app)
    _routes(app, settings.run_as)
    app.include_router(service_api.router)
    app.include_router(identity_api.router)
    app.include_router(token_api.router)
    app.include_router(audit_router)
    app.include_router(stream_api.router)
    app.include_router(queue_api.router)
    app.include_router(ui.router)  # the dashboard at /ui: static files, out of the schema
    app.include_router(history_router)
    app.add_middleware(FastReads)  # innermost: held to the gate, the limits and the latency
    app.add_middleware(
        AuditTrail,
        master=lambda: app.state.master,
        tokens=lambda: getattr(app.state, "tokens", None),
    )
    app.add_middleware(
        FollowerGate,
        seat=lambda: app.state.seat,
        serving=lambda: (master := app.state.master) is not None and master.serving(),
    )
    # Outermost: a call over its limits is refused before anything else looks at it.
    app.add_middleware(
        Limits,
        policy=LimitPolicy.of(settings),
        tokens=lambda: getattr(app.state, "tokens", None),
        peer=peer_of_scope,
    )
    instrument(app)  # GET /metrics; every call timed, from outside the limits
    return app


Blob = Annotated[str, Path(pattern=r"^[0-9a-f]{64}$", description="sha256 of the content")]


_MSGPACK = "application/x-msgpack"
_NDJSON = "application/x-ndjson"


def _task(master: Master, caller: Caller, task_id: str) -> TaskRecord:
    task = master.state.ledger.tasks.get(task_id)
    if task is None:
        raise NotFound(f"no task {task_id}")
    if not caller.may_see(master.state.ledger.jobs[task.job_id].owner):
        raise Forbidden(f"task {task_id} belongs to another user")
    return task


def _routes(app: FastAPI, run_as: RunAs) -> None:
    @app.post(
        "/v1/jobs",
        status_code=201,
        response_model=Submitted,
        responses={403: {"model": ErrorBody}, 422: {"model": ErrorBody}},
    )
    async def submit(
        spec: JobSpec, master: MasterDep, caller: Annotated[Caller, Depends(writer)]
    ) -> Submitted:
        spec = job_as(spec, run_as, caller.name, caller.role is Role.ADMIN)
        names = _node_names(spec, master)
        job_id = await master.request(lambda req, now: Submit(req, caller.name, spec, now, names))
        return Submitted(id=job_id)  # type: ignore[arg-type]

    # Named as they were when their functions were: the operations' ids stay as they were.
    app.get("/v1/jobs", response_model=list[JobView], name="jobs")(list_jobs)
    app.get("/v1/jobs/{job_id}", response_model=JobView, name="job")(view_job)

    @app.post("/v1/jobs/{job_id}/kill", response_model=JobView)
    async def kill(job_id: int, master: MasterDep, caller: Annotated[Caller, Depends(writer)]) -> Response:
        if not caller.may_change(job_of(master, caller, job_id).owner):
            raise Forbidden(f"a {caller.role.value} token cannot kill job {job_id}")
        await master.request(lambda req, now: KillJob(req, job_id, now))
        return Response(view_of(master, caller, job_id).model_dump_json(), media_type="application/json")

    @app.get("/v1/tasks/{task_id}", response_model=TaskRecord)
    async def task(task_id: str, master: MasterDep, caller: CallerDep) -> TaskRecord:
        return _task(master, caller, task_id)

    @app.get("/v1/tasks/{task_id}/logs", response_class=Response)
    async def logs(
        request: Request,
        task_id: str,
        master: MasterDep,
        caller: CallerDep,
        stream: Literal["stdout", "stderr"] = "stdout",
        offset: Annotated[int, Query(ge=0)] = 0,
        follow: bool = False,
        attempt: Annotated[int | None, Query(ge=0)] = None,
    ) -> Response:
        current = _task(master, caller, task_id)
        attempt = current.attempt if attempt is None else attempt
        if attempt > current.attempt:
            raise SpecError("attempt", f"task {task_id} has had {current.attempt + 1} attempts", status=404)
        if follow:
            chunks = while_token_holds(request, master.follow_log(task_id, attempt, stream, offset))
            return StreamingResponse(chunks, media_type="application/octet-stream")
        piece = await master.read_log(current, attempt, stream, offset)
        return Response(piece.data, media_type="application/octet-stream")

    @app.get("/v1/nodes", response_model=list[NodeView])
    async def nodes(master: MasterDep, caller: CallerDep) -> list[NodeView]:
        return master.node_views()

    @app.post(
        "/v1/exec",
        response_class=StreamingResponse,
        responses={200: {"content": {_MSGPACK: {}}, "description": "a stream of msgpack events"}},
    )
    async def exec_(
        body: ExecRequest, request: Request, master: MasterDep, caller: Annotated[Caller, Depends(admin)]
    ) -> StreamingResponse:
        """Run a command on a node set now, through the agents (admin only; audited)."""
        return _fan_out(master, request, caller, body, body.command)

    @app.post("/v1/copy", response_class=StreamingResponse, responses={200: {"content": {_MSGPACK: {}}}})
    async def copy(
        body: CopyRequest, request: Request, master: MasterDep, caller: Annotated[Caller, Depends(admin)]
    ) -> StreamingResponse:
        """Push uploaded blobs to a node set, through the agents (admin only; audited)."""
        if missing := sorted({f.blob for f in body.files if not master.blobs.has(f.blob)}):
            raise SpecError("files", f"upload these blobs first: {', '.join(missing[:3])}", status=409)
        for blob in {f.blob for f in body.files}:
            master.blobs.touch(blob)
        names = ", ".join(f.path for f in body.files[:3]) + (", ..." if len(body.files) > 3 else "")
        return _fan_out(master, request, caller, body, f"copy {names} -> {body.dest}")

    @app.post("/v1/rcopy", response_class=StreamingResponse, responses={200: {"content": {_MSGPACK: {}}}})
    async def rcopy(
        body: FetchRequest, request: Request, master: MasterDep, caller: Annotated[Caller, Depends(admin)]
    ) -> StreamingResponse:
        """Pull one file from every node of a set into the blob store (admin only; audited)."""
        return _fan_out(master, request, caller, body, f"rcopy {body.path}")

    @app.post("/v1/audit", status_code=201, response_model=AuditRecord)
    async def audit_start(
        body: AuditStart, request: Request, master: MasterDep, caller: Annotated[Caller, Depends(admin)]
    ) -> AuditRecord:
        """Record a parallel command run around the master (over SSH), before it runs."""
        record = record_for(request, caller, 201, command=body.command, nodes=body.nodes, via=body.via)
        record.id = master.store.add_audit(record)
        kept(request)
        return record

    @app.post("/v1/audit/{record_id}/end", response_model=AuditRecord)
    async def audit_end(
        record_id: Annotated[int, Path(ge=1, le=2**62)],
        body: AuditEnd,
        request: Request,
        master: MasterDep,
        caller: Annotated[Caller, Depends(admin)],
    ) -> AuditRecord:
        """Complete a record made with POST /v1/audit, once, by whoever made it."""
        record = master.store.audit_record(record_id)
        if record is None or record.who != caller.name:
            raise NotFound(f"no audit record {record_id} of yours")
        if record.ended_at is not None:
            raise SpecError("record_id", f"audit record {record_id} has ended already", status=409)
        record.ended_at, record.results = time.time(), body.results
        master.store.end_audit(record)
        kept(request)  # the end of the record made at the start, not a record of its own
        return record

    @app.put("/v1/blobs/{blob}", status_code=201)
    async def put_blob(
        blob: Blob, request: Request, master: MasterDep, node: Annotated[str | None, Depends(blob_writer)]
    ) -> dict[str, int]:
        """Upload a file's content, named by its sha256 (admins, and agents asked for it)."""
        length = request.headers.get("content-length")
        declared = int(length) if length is not None and length.isdigit() else None
        size = await master.blobs.put(blob, request.stream(), declared)
        if node is not None:
            master.blob_access.put_by(node, blob, time.time())  # it held what it may name as its own
        return {"size": size}

    @app.api_route("/v1/blobs/{blob}", methods=["GET", "HEAD"], dependencies=[Depends(blob_reader)])
    async def get_blob(blob: Blob, master: MasterDep) -> FileResponse:
        """A stored file's content (admins, and agents sent it)."""
        if not master.blobs.has(blob):
            raise NotFound(f"no blob {blob}")
        master.blobs.touch(blob)
        return FileResponse(master.blobs.path(blob), media_type="application/octet-stream")

    @app.get("/v1/audit", response_model=list[AuditRecord])
    async def audit(
        master: MasterDep,
        caller: Annotated[Caller, Depends(admin)],
        offset: Annotated[int, Query(ge=0, le=2**62)] = 0,
        limit: Annotated[int, Query(ge=1, le=10_000)] = 100,
        who: Annotated[str | None, Query(max_length=256, description="only this principal's")] = None,
        kind: Annotated[
            str | None, Query(max_length=256, description="only of this kind: job.submit")
        ] = None,
        since: Annotated[float | None, Query(ge=0, le=2**40, description="only since this Unix time")] = None,
    ) -> list[AuditRecord]:
        """Every call that changed something, newest first: who asked what of what, from
        where, and the answer's status; a parallel command also where it ran and how it ended."""
        return master.store.audit(offset, limit, AuditQuery(who, kind, since))

    @app.post(
        "/v1/frameworks/subscribe",
        response_class=StreamingResponse,
        responses={
            200: {"content": {_NDJSON: {}}, "description": "the framework's events, a JSON line each"}
        },
    )
    async def subscribe(
        request: Request, body: fp.Subscribe, master: MasterDep, caller: Annotated[Caller, Depends(writer)]
    ) -> StreamingResponse:
        """Subscribe a framework (or take one up again) and stream its events."""
        events = await master.subscribe(_principal(caller), body)
        return StreamingResponse(while_token_holds(request, events), media_type=_NDJSON)

    @app.post("/v1/frameworks/{framework_id}/call", response_model=fp.Accepted | dict[str, str])
    async def framework_call(
        framework_id: Annotated[str, Path(max_length=64)],
        call: Annotated[fp.Call, Body()],
        master: MasterDep,
        caller: Annotated[Caller, Depends(writer)],
    ) -> object:
        """One call of a subscribed framework: accept, decline, suppress, revive, kill,
        acknowledge, reconcile or teardown."""
        principal = _principal(caller)
        call = _users_decided(call, master, principal, framework_id, run_as)
        return await master.request(lambda req, now: FrameworkCall(req, principal, framework_id, call, now))

    @app.get("/v1/frameworks", response_model=list[FrameworkView])
    async def frameworks(master: MasterDep, caller: CallerDep) -> list[FrameworkView]:
        return [v for v in master.state.frameworks.views() if caller.may_see(v.principal)]

    @app.get("/v1/rebalance", response_model=list[PlannedMove])
    async def rebalance_plan(master: MasterDep, caller: CallerDep) -> list[PlannedMove]:
        """The moves a rebalancing round would make now, and why (a dry run)."""
        names = master.state.ledger.table.names
        return [
            PlannedMove(task_id=m.task_id, source=names[m.source], target=names[m.target], reason=m.reason)
            for m in master.state.moves.plan(time.time())
        ]

    @app.post("/v1/rebalance", response_model=list[Migration])
    async def rebalance_now(master: MasterDep, caller: Annotated[Caller, Depends(admin)]) -> object:
        """Run one rebalancing round now (admin only)."""
        return await master.request(lambda req, now: RebalanceNow(req, now))

    @app.post("/v1/nodes/{name}/drain", response_model=list[Migration])
    async def drain(
        name: Annotated[str, Path(max_length=253)],
        master: MasterDep,
        caller: Annotated[Caller, Depends(admin)],
        deadline: Annotated[float | None, Query(gt=0, le=7 * 86_400)] = None,
    ) -> object:
        """Take no new work on a node and move its tasks off; after `deadline` seconds, also
        those whose mode is never (admin only)."""
        return await master.request(lambda req, now: Drain(req, name, True, now, deadline))

    @app.post("/v1/nodes/{name}/undrain", response_model=list[Migration])
    async def undrain(
        name: Annotated[str, Path(max_length=253)],
        master: MasterDep,
        caller: Annotated[Caller, Depends(admin)],
    ) -> object:
        """Let a drained node take work again (admin only)."""
        return await master.request(lambda req, now: Drain(req, name, False, now))

    @app.get("/v1/events", response_model=list[Migration])
    async def events(
        master: MasterDep,
        caller: CallerDep,
        limit: Annotated[int, Query(ge=1, le=10_000)] = 100,
    ) -> list[Migration]:
        """Migrations, newest first: reason, source, target and how long the move took (a
        user's: of their own jobs)."""
        moves = list(master.state.ledger.migrations.values())
        if caller.role is Role.USER:  # of their own jobs (Caller.may_see)
            jobs = master.state.ledger.jobs
            moves = [m for m in moves if (job := jobs.get(m.job_id)) is not None and job.owner == caller.name]
        return sorted(moves, key=lambda m: -m.id)[:limit]

    @app.get("/v1/whoami", response_model=Caller)
    async def whoami(caller: CallerDep) -> Caller:
        return caller

    @app.get("/v1/masters", response_model=list[MasterView], dependencies=[Depends(anyone)])
    async def masters(request: Request) -> list[MasterView]:
        """Every master alive, the leader marked; followers answer this too."""
        return await ha.masters(request.app.state.seat, request.app.state.me)

    @app.websocket("/v1/agent")
    async def agent(ws: WebSocket) -> None:
        await serve_agent(ws)


def _body(status: int, error: str, fields: list[FieldError] | None = None, **headers: str) -> JSONResponse:
    return JSONResponse(
        ErrorBody(error=error, fields=fields or []).model_dump(), status_code=status, headers=headers
    )


def _errors(app: FastAPI) -> None:
    @app.exception_handler(HTTPException)
    async def refused(_: Request, exc: HTTPException) -> JSONResponse:
        # What the framework itself refuses (no such path or method, a body it cannot
        # parse) answers in the shape of every other error.
        return _body(exc.status_code, str(exc.detail), **(exc.headers or {}))

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        fields = [
            FieldError(
                field=".".join(str(p) for p in e["loc"] if p not in ("body",)) or "body",
                reason=e["msg"].removeprefix("Value error, "),
            )
            for e in exc.errors()
        ]
        summary = "; ".join(f"{f.field}: {f.reason}" for f in fields)
        return _body(422, f"invalid request: {summary}", fields)

    @app.exception_handler(SpecError)
    async def spec(_: Request, exc: SpecError) -> JSONResponse:
        return _body(exc.status, exc.reason, [FieldError(field=exc.field, reason=exc.reason)])

    @app.exception_handler(Unauthorized)
    async def unauthorized(_: Request, exc: Unauthorized) -> JSONResponse:
        return _body(401, str(exc), **{"WWW-Authenticate": "Bearer"})

    @app.exception_handler(Forbidden)
    async def forbidden(_: Request, exc: Forbidden) -> JSONResponse:
        return _body(403, str(exc))

    @app.exception_handler(NotFound)
    async def not_found(_: Request, exc: NotFound) -> JSONResponse:
        return _body(404, str(exc))

    @app.exception_handler(Unavailable)
    async def unavailable(_: Request, exc: Unavailable) -> JSONResponse:
        return _body(503, str(exc))

    @app.exception_handler(NotLeading)
    async def not_leading(_: Request, exc: NotLeading) -> JSONResponse:
        # An empty leader header: nothing was done, so the call may go to another master.
        return _body(503, str(exc), **{"Retry-After": "1", LEADER_HEADER: ""})

    @app.exception_handler(EtcdError)
    async def etcd_down(_: Request, exc: EtcdError) -> JSONResponse:
        return _body(503, f"etcd did not answer ({exc}); check that most of its members are up and reachable")

    @app.exception_handler(Deposed)
    async def deposed(_: Request, exc: Deposed) -> JSONResponse:
        return _body(
            503,
            f"{exc}: a change asked for may or may not have been made; check (`shoal jobs`) before "
            "asking again",
            **{"Retry-After": "1"},
        )
