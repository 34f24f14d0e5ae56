"""Reading jobs: `GET /v1/jobs` and `GET /v1/jobs/{job_id}`, and the path that binds their
common calls without FastAPI's machinery.

These two reads are most of the calls a busy cluster's clients make (dashboards, `shoal
jobs`, scripts waiting on their jobs). FastAPI's generic work per call (routing through
every route before them, solving the dependencies, validating the parameters, the
response machinery) costs about 180 µs, more than the reads themselves (a page of twenty
jobs' summaries, kept encoded, about 100 µs; measured in process: the API's app called
through ASGI with and without `FastReads`). At a thousand calls a second that is a fifth
of a core, on a master whose one core the ledger needs.

`FastReads` is ASGI middleware, inside the latency's timing, the limits and the follower
gate, so it is held to them all. It binds the common shape of the two calls itself (a bearer
token, digits for `offset` and `limit` within the routes' bounds, nothing else) and calls
the very endpoint functions the routes call, with the caller the token speaks for (looked
up as the routes do, once a call: `deps.caller_in`). Any other
shape (an unknown or repeated parameter, a value out of bounds, no token or a bad one, a
master that does not serve) and any error the endpoint raises are passed on to the routes,
which answer as they always do. So an answer is the same either way, and the API's schema
stays the routes'.
"""

from __future__ import annotations

import re
from typing import Annotated

from fastapi import Query
from fastapi.routing import APIRoute
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from shoal.errors import Forbidden, NotFound, ShoalError
from shoal.master.deps import CallerDep, MasterDep, caller_in
from shoal.master.listings import JobQuery, listings_of
from shoal.master.server import Master
from shoal.model import QUEUE_NAME, Caller, JobRecord, JobState, Role
from shoal.views import JobView

TASKS_SHOWN = 1000  # tasks in a job's view unless asked for another page
JOBS_SHOWN = 1000  # jobs listed unless asked for another page
OFFSET_MAX = 2**62
JOBS_LIMIT_MAX = 10_000
TASKS_LIMIT_MAX = 100_000
_JSON = "application/json"


def job_of(master: Master, caller: Caller, job_id: int) -> JobRecord:
    """Job `job_id`, if `caller` may see it."""
    job = master.state.ledger.jobs.get(job_id)
    if job is None:
        raise NotFound(f"no job {job_id}")
    if not caller.may_see(job.owner):
        raise Forbidden(f"job {job_id} belongs to another user")
    return job


def view_of(
    master: Master, caller: Caller, job_id: int, offset: int = 0, limit: int = TASKS_SHOWN
) -> JobView:
    """Job `job_id` with a page of its tasks, as `caller` may see it."""
    job = job_of(master, caller, job_id)
    return JobView.detail(
        job,
        master.state.ledger.tasks_of(job_id),
        master.state.why_waiting(job_id),
        slice(offset, offset + limit),
    )


async def list_jobs(
    master: MasterDep,
    caller: CallerDep,
    offset: Annotated[int, Query(ge=0, le=OFFSET_MAX, description="jobs skipped, newest first")] = 0,
    limit: Annotated[int, Query(ge=1, le=JOBS_LIMIT_MAX, description="jobs shown")] = JOBS_SHOWN,
    state: Annotated[JobState | None, Query(description="only jobs in this state")] = None,
    owner: Annotated[str | None, Query(max_length=64, description="only this owner's jobs")] = None,
    queue: Annotated[str | None, Query(pattern=QUEUE_NAME, description="only this queue's jobs")] = None,
) -> Response:
    """The jobs the caller may see, newest first: of an owner, in a state, in a queue, when
    asked. A user sees their own jobs alone."""
    if caller.role is Role.USER:  # Caller.may_see
        if owner not in (None, caller.name):
            raise Forbidden(f"a user lists their own jobs alone: ask for owner={caller.name}, or none")
        owner = caller.name
    ledger = master.state.ledger
    query = JobQuery(owner, state, queue)
    return Response(listings_of(ledger).page(ledger, query, offset, limit), media_type=_JSON)


async def view_job(
    job_id: int,
    master: MasterDep,
    caller: CallerDep,
    offset: Annotated[int, Query(ge=0, description="first task shown")] = 0,
    limit: Annotated[int, Query(ge=0, le=TASKS_LIMIT_MAX, description="tasks shown")] = TASKS_SHOWN,
) -> Response:
    return Response(view_of(master, caller, job_id, offset, limit).model_dump_json(), media_type=_JSON)


_VIEW = re.compile(r"/v1/jobs/([0-9]{1,18})")
_DIGITS_MAX = len(str(OFFSET_MAX))


def _page(query: bytes, default_limit: int, limit_min: int, limit_max: int) -> tuple[int, int] | None:
    """(offset, limit) of a query string holding at most one of each, as digits within the
    bounds (an offset up to OFFSET_MAX: a larger one is the route's); None for any other query."""
    found: dict[bytes, int] = {}
    for part in query.split(b"&") if query else ():
        key, _, value = part.partition(b"=")
        if key not in (b"offset", b"limit") or key in found:
            return None
        if not value.isdigit() or len(value) > _DIGITS_MAX:  # bytes: ASCII digits only
            return None
        found[key] = int(value)
    offset, limit = found.get(b"offset", 0), found.get(b"limit", default_limit)
    if offset > OFFSET_MAX or not limit_min <= limit <= limit_max:
        return None
    return offset, limit


class FastReads:
    """ASGI middleware: the common calls of `list_jobs` and `view_job`, bound here (see the
    module's doc)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        # endpoint -> its route: the latency's label, found without a walk through every route
        self._routes: dict[object, APIRoute] = {}
        self.answered = 0  # calls answered here rather than by the routes (tests read it)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "GET":
            response = await self._answer(scope)
            if response is not None:
                self.answered += 1
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)

    async def _answer(self, scope: Scope) -> Response | None:
        path = scope["path"]
        if path == "/v1/jobs":
            page = _page(scope["query_string"], JOBS_SHOWN, 1, JOBS_LIMIT_MAX)
            job_id = None
        elif (found := _VIEW.fullmatch(path)) is not None:
            page = _page(scope["query_string"], TASKS_SHOWN, 0, TASKS_LIMIT_MAX)
            job_id = int(found.group(1))
        else:
            return None
        if page is None:
            return None
        try:
            if (bound := self._caller(scope)) is None:
                return None
            master, caller = bound
            if job_id is None:
                response = await list_jobs(master, caller, *page)
            else:
                response = await view_job(job_id, master, caller, *page)
        except ShoalError:
            return None  # the route answers it, as it answers every error
        scope["route"] = self._route(scope, list_jobs if job_id is None else view_job)
        return response

    @staticmethod
    def _caller(scope: Scope) -> tuple[Master, Caller] | None:
        master: Master | None = scope["app"].state.master
        if master is None or not master.serving():
            return None
        caller = caller_in(scope)
        return None if caller is None else (master, caller)

    def _route(self, scope: Scope, endpoint: object) -> APIRoute:
        route = self._routes.get(endpoint)
        if route is None:
            routes = scope["app"].router.routes
            route = next(r for r in routes if isinstance(r, APIRoute) and r.endpoint is endpoint)
            self._routes[endpoint] = route
        return route
