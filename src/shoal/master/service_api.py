"""The registry over HTTP (`/v1/services`): listings, blocking queries, watches, and
registrations from outside, as Consul's catalog and health endpoints.

A blocking query (`?index=N&wait=30s`) answers when the service's index passes N, or when
the wait is over; every answer carries the index in `X-Shoal-Index`. A watch is a stream
of server-sent events, one `endpoints` event per change of that service only.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import AsyncIterator
from typing import Annotated, Literal

from fastapi import APIRouter, Body, Depends, Path, Query, Request, Response
from fastapi.responses import StreamingResponse

from shoal.checks import OUTPUT_LIMIT, CheckStatus
from shoal.errors import SpecError
from shoal.master.deps import CallerDep, MasterDep, while_token_holds, writer
from shoal.master.events import CheckService, DeregisterService, RegisterService
from shoal.master.server import ANY_SERVICE, Master
from shoal.model import Caller
from shoal.services import Endpoint, Registration, ServiceSummary, label

router = APIRouter()

INDEX_HEADER = "X-Shoal-Index"
MAX_WAIT = 600.0  # seconds a blocking query may wait, as Consul's ten minutes
DEFAULT_WAIT = 300.0
KEEPALIVE = 15.0  # seconds between comments on a quiet watch, so proxies keep it open
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m)?")
_UNIT = {"ms": 0.001, "s": 1.0, "m": 60.0, None: 1.0}
_VERDICTS = {"pass": CheckStatus.PASSING, "warn": CheckStatus.WARNING, "fail": CheckStatus.CRITICAL}

Name = Annotated[str, Path(description="a service: a DNS label")]
Index = Annotated[int, Query(ge=0, description="answer once the index passes this (a blocking query)")]
Wait = Annotated[str | None, Query(description="how long a blocking query may wait: 30s, 500ms, 5m")]
Flag = Annotated[str | None, Query()]
Tag = Annotated[str | None, Query(max_length=63)]
RegistrationId = Annotated[str, Path(max_length=128)]


def _seconds(wait: str | None) -> float:
    """The wait asked for, less up to a sixteenth: watchers that started together do not all
    time out and ask again in the same instant (Consul adds its jitter; taking it off keeps
    every answer within a client's timeout for the wait it asked)."""
    if wait is None:
        seconds = DEFAULT_WAIT
    elif (match := _DURATION.fullmatch(wait.strip())) is None:
        raise SpecError("wait", f"{wait!r} is not a duration such as 30s, 500ms or 5m")
    else:
        seconds = min(MAX_WAIT, float(match[1]) * _UNIT[match[2]])
    return seconds - random.uniform(0, seconds / 16)


def _set(flag: str | None) -> bool:
    """A flag given as `?all`, `?all=1` or `?all=true` (absent, or `false`/`0`: not set)."""
    return flag is not None and flag.lower() not in ("false", "0", "no")


def _service_name(name: str) -> str:
    try:
        return label(name)
    except ValueError as e:
        raise SpecError("name", str(e)) from None


def _endpoints(master: Master, name: str, every: bool, tag: str | None) -> list[Endpoint]:
    registry = master.state.registry
    return registry.ordered(registry.endpoints(name, passing=not every, tag=tag), random.shuffle)


@router.get("/v1/services", response_model=list[ServiceSummary])
async def services(
    master: MasterDep, caller: CallerDep, response: Response, index: Index = 0, wait: Wait = None
) -> list[ServiceSummary]:
    """Every service with its tags and how many endpoints pass, warn and fail."""
    if index:
        await master.service_changed(ANY_SERVICE, index, _seconds(wait))
    response.headers[INDEX_HEADER] = str(master.state.registry.index)
    return master.state.registry.summaries()


@router.get("/v1/services/{name}", response_model=list[Endpoint])
async def service(
    name: Name,
    master: MasterDep,
    caller: CallerDep,
    response: Response,
    index: Index = 0,
    wait: Wait = None,
    tag: Tag = None,
    all: Flag = None,  # noqa: A002 - the query parameter's name, as Consul's
) -> list[Endpoint]:
    """The service's endpoints: those passing, or all (`?all`)."""
    name = _service_name(name)
    if index:
        await master.service_changed(name, index, _seconds(wait))
    response.headers[INDEX_HEADER] = str(master.state.registry.index_of(name))
    return _endpoints(master, name, _set(all), tag)


@router.get("/v1/services/{name}/watch", response_class=StreamingResponse)
async def watch(
    request: Request,
    name: Name,
    master: MasterDep,
    caller: CallerDep,
    all: Flag = None,  # noqa: A002 - the query parameter's name, as Consul's
    tag: Tag = None,
) -> StreamingResponse:
    """Server-sent events: `endpoints` now, then again at every change of this service."""
    name = _service_name(name)
    events = while_token_holds(request, _events(master, name, _set(all), tag))
    return StreamingResponse(events, media_type="text/event-stream")


async def _events(master: Master, name: str, every: bool, tag: str | None) -> AsyncIterator[bytes]:
    index = -1
    while True:
        current = master.state.registry.index_of(name)
        if current == index:
            yield b": still watching\n\n"
        else:
            index = current
            endpoints = [e.model_dump(mode="json") for e in _endpoints(master, name, every, tag)]
            yield f"event: endpoints\nid: {index}\ndata: {json.dumps(endpoints)}\n\n".encode()
        await master.service_changed(name, index, KEEPALIVE)


@router.put("/v1/services/register", responses={200: {"description": "the registry's index"}})
async def register(
    spec: Annotated[Registration, Body()], master: MasterDep, caller: Annotated[Caller, Depends(writer)]
) -> dict[str, int]:
    """Register a service shoal does not run; it lapses unless passed within its TTL."""
    index = await master.request(lambda req, now: RegisterService(req, caller, spec, now))
    return {"index": int(index)}  # type: ignore[call-overload]


@router.put("/v1/services/deregister/{registration}")
async def deregister(
    registration: RegistrationId, master: MasterDep, caller: Annotated[Caller, Depends(writer)]
) -> dict[str, int]:
    index = await master.request(lambda req, now: DeregisterService(req, caller, registration, now))
    return {"index": int(index)}  # type: ignore[call-overload]


@router.put("/v1/services/{registration}/{verdict}")
async def check(
    registration: RegistrationId,
    verdict: Literal["pass", "warn", "fail"],
    master: MasterDep,
    caller: Annotated[Caller, Depends(writer)],
    note: Annotated[str, Query(max_length=OUTPUT_LIMIT)] = "",
) -> dict[str, int]:
    """A registration's TTL check: passed (or warned, or failed) now, with a note."""
    status = _VERDICTS[verdict]
    index = await master.request(lambda req, now: CheckService(req, caller, registration, status, note, now))
    return {"index": int(index)}  # type: ignore[call-overload]
