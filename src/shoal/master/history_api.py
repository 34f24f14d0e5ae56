"""`GET /v1/history`: the tasks that have ended, as Slurm's sacct lists jobs (see
shoal.master.history, which chooses and pages them). Users see their own jobs' only."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from shoal.errors import Forbidden
from shoal.master import history
from shoal.master.deps import CallerDep, MasterDep
from shoal.model import TERMINAL, Role, TaskState
from shoal.views import ErrorBody, HistoryPage

SHOWN = 100  # rows a page holds unless asked for more

router = APIRouter()


@router.get("/v1/history", response_model=HistoryPage, responses={403: {"model": ErrorBody}})
async def history_(
    master: MasterDep,
    caller: CallerDep,
    user: Annotated[
        str | None, Query(max_length=256, description="only this owner's jobs (a user token: its own)")
    ] = None,
    state: Annotated[
        list[history.EndState] | None, Query(max_length=6, description="only tasks that ended so")
    ] = None,
    since: Annotated[
        float | None, Query(ge=0, le=2**40, description="only tasks ended at or after this Unix time")
    ] = None,
    until: Annotated[
        float | None, Query(ge=0, le=2**40, description="only tasks ended before this Unix time")
    ] = None,
    node: Annotated[str | None, Query(max_length=253, description="only tasks last run on this node")] = None,
    after: Annotated[
        str | None, Query(pattern=history.CURSOR, description="go on after this task (a page's `next`)")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=history.LIMIT, description="rows at most")] = SHOWN,
) -> HistoryPage:
    """Tasks that have ended, newest jobs first, each as its last run left it: node, times,
    state, exit status or signal, CPU time, peak memory, runs. Only what the master still
    holds: a finished job is forgotten after `job_retention` seconds (or beyond
    `job_retention_count` finished jobs), and leaves the history then. A page holds `limit`
    rows at most, fewer when it has looked at as many tasks as one page may; `next` then
    says where the next one starts."""
    if caller.role is Role.USER and user not in (None, caller.name):
        raise Forbidden(f"a user token sees its own history only, not {user}'s")
    owner = caller.name if caller.role is Role.USER else user
    query = history.Query(
        owner=owner,
        states=frozenset(TaskState(s) for s in state) if state else TERMINAL,
        since=since,
        until=until,
        node=node,
    )
    cursor = history.parse_cursor(after) if after is not None else None
    return history.page(master.state.ledger, query, cursor, limit)
