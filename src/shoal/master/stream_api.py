"""`GET /v1/stream`: the event stream as server-sent events (shoal.master.broadcast feeds it).

A client starts from now, or resumes after an index (`Last-Event-ID`, as browsers'
EventSource send it, or `?index=`); an index the log no longer holds is answered 410 before
anything is streamed. A master serves `SUBSCRIBERS` streams at most (503 past them), one
token name `streams_per_caller` of them (429). A client that takes `deflate` (browsers,
httpx, aiohttp, `curl --compressed`) is sent the stream compressed, each chunk compressed
once for every stream it goes to (shoal.master.deflate).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import StreamingResponse

from shoal.errors import Forbidden, SpecError
from shoal.master.deflate import accepts_deflate, deflating
from shoal.master.deps import CallerDep, MasterDep, while_token_holds
from shoal.master.stream import Filter, Gone
from shoal.model import Role
from shoal.sse import TOPICS
from shoal.views import ErrorBody

AUDIT = "audit"
SUBSCRIBERS = 1024  # streams a master serves at once, at most

router = APIRouter()


@router.get(
    "/v1/stream",
    response_class=StreamingResponse,
    responses={
        200: {"content": {"text/event-stream": {}}},
        410: {"model": ErrorBody},
        429: {"model": ErrorBody},
    },
)
async def stream(
    request: Request,
    master: MasterDep,
    caller: CallerDep,
    topic: Annotated[
        list[str] | None, Query(max_length=len(TOPICS), description="topics (default: all)")
    ] = None,
    job: Annotated[int | None, Query(ge=0, le=2**62, description="only this job's events")] = None,
    node: Annotated[str | None, Query(max_length=253, description="only events on this node")] = None,
    index: Annotated[int | None, Query(ge=0, le=2**62, description="resume after this index")] = None,
    last_event_id: Annotated[int | None, Header(ge=0, le=2**62)] = None,
) -> StreamingResponse:
    """Every change the ledger makes, as server-sent events (`id` the index, `event` the
    topic, `data` the change as JSON), from now or after an index. Users get only their
    own jobs' events and the cluster's nodes and services; only admins get the audit topic."""
    broadcast = master.broadcast
    if unknown := sorted(set(topic or ()) - set(TOPICS)):
        raise SpecError("topic", f"no topic {', '.join(unknown)}: topics are {', '.join(TOPICS)}")
    if broadcast.subscribers >= SUBSCRIBERS:
        raise SpecError("stream", f"this master serves {SUBSCRIBERS} streams already; try again later", 503)
    # One token must not take every stream: waiting would not help, so no Retry-After.
    if (held := broadcast.held[caller.name]) >= (most := request.app.state.streams_per_caller):
        raise SpecError(
            "stream",
            f"{caller.name} holds {held} streams open already, the most one caller may "
            f"(streams_per_caller, {most}): end one it no longer reads (each dashboard tab and "
            "`shoal events -f` holds one), or ask an admin to raise streams_per_caller",
            429,
        )
    after = index if index is not None else last_event_id
    cursor = broadcast.log.last if after is None else after
    try:
        broadcast.log.after(cursor)
    except Gone as e:
        raise SpecError("index", str(e), status=410) from None
    topics = frozenset(topic or TOPICS)
    if caller.role is not Role.ADMIN:  # the audit trail is an admin's to read, as GET /v1/audit
        if topic and AUDIT in topics:
            raise Forbidden("only an admin token follows the audit topic")
        topics -= {AUDIT}
    which = Filter(
        topics=topics,
        job=job,
        node=node,
        user=caller.name if caller.role is Role.USER else None,
    )
    frames = while_token_holds(request, broadcast.follow(cursor, which, caller.name))
    # no-transform: a proxy must not compress it again, nor hold it back to.
    headers = {
        "Cache-Control": "no-cache, no-transform",
        "X-Accel-Buffering": "no",
        "Vary": "Accept-Encoding",
    }
    if accepts_deflate(",".join(request.headers.getlist("accept-encoding"))):
        frames = deflating(frames, broadcast.piece_of)
        headers["Content-Encoding"] = "deflate"
    return StreamingResponse(frames, media_type="text/event-stream", headers=headers)
