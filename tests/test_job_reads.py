"""Reading jobs answers the same through `FastReads` as through the routes: the API's app,
in process, asked each read twice, once as it comes and once with a parameter the routes
ignore, which `FastReads` passes on to them."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from fastapi import FastAPI
from hypothesis import given, settings
from hypothesis import strategies as st

from shoal.config import MasterSettings
from shoal.master.api import create_app
from shoal.master.job_reads import FastReads, _page

ADMIN = "admin-" + "a" * 40
JOB = {"command": ["true"], "resources": {"cpus": 0.1, "mem": 16}}


@dataclass
class Answer:
    status: int
    headers: dict[bytes, bytes]
    body: bytes


@dataclass
class Api:
    app: FastAPI
    runner: asyncio.Runner
    tokens: dict[str, str]  # who -> token
    jobs: dict[str, list[int]]  # owner -> job ids

    def call(self, method: str, path: str, token: str | None, body: bytes = b"") -> Answer:
        return self.runner.run(_call(self.app, method, path, token, body))

    def fast_reads(self) -> FastReads:
        layer = self.app.middleware_stack
        while not isinstance(layer, FastReads):
            layer = layer.app  # type: ignore[union-attr]
        return layer


async def _call(app: FastAPI, method: str, target: str, token: str | None, body: bytes) -> Answer:
    path, _, query = target.partition("?")
    headers = [(b"host", b"master")]
    if token is not None:
        headers.append((b"authorization", f"Bearer {token}".encode()))
    if body:
        headers += [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "https",
        "path": path,
        "raw_path": path.encode(),
        "query_string": query.encode(),
        "root_path": "",
        "headers": headers,
        "client": ("127.0.0.1", 40000),
        "server": ("127.0.0.1", 443),
    }
    given_body = False
    answer = Answer(0, {}, b"")

    async def receive() -> dict:
        nonlocal given_body
        if given_body:
            await asyncio.Event().wait()
        given_body = True
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: dict) -> None:
        if message["type"] == "http.response.start":
            answer.status = message["status"]
            answer.headers = dict(message["headers"])
        else:
            answer.body += message.get("body", b"")

    await app(scope, receive, send)
    return answer


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    settings_ = MasterSettings(
        state_dir=Path(tmp_path_factory.mktemp("master")), insecure=True, rate_limit=0, admin_token=ADMIN
    )
    app = create_app(settings_)
    with asyncio.Runner() as runner:
        lifespan = app.router.lifespan_context(app)
        runner.run(lifespan.__aenter__())
        try:
            api = Api(app, runner, {"admin": ADMIN}, {})
            for who, role in [("alice", "user"), ("bob", "user"), ("rita", "reader"), ("ravi", "admin")]:
                made = api.call("POST", "/v1/tokens", ADMIN, json.dumps({"name": who, "role": role}).encode())
                assert made.status == 201, made.body
                api.tokens[who] = json.loads(made.body)["token"]
            revoked = api.call("POST", f"/v1/tokens/{json.loads(made.body)['id']}/revoke", ADMIN)
            assert revoked.status == 200, revoked.body  # ravi's: a token that was good
            for owner, count in [("alice", 3), ("bob", 2)]:
                for _ in range(count):
                    made = api.call("POST", "/v1/jobs", api.tokens[owner], json.dumps(JOB).encode())
                    assert made.status == 201, made.body
                    api.jobs.setdefault(owner, []).append(json.loads(made.body)["id"])
            yield api
        finally:
            runner.run(lifespan.__aexit__(None, None, None))


# The queries the fast path binds, with pages small enough to cut the few jobs there are
# short; and those it must pass on: unknown keys, repeats, values out of bounds or not plain
# digits.
bound = st.tuples(st.none() | st.integers(0, 6), st.none() | st.integers(0, 6), st.booleans()).map(
    lambda page: "&".join(
        f"{key}={value}"
        for key, value in (("offset", page[0]), ("limit", page[1]))[:: -1 if page[2] else 1]
        if value is not None
    )
)
values = st.one_of(
    st.integers(-1, 6).map(str),
    st.sampled_from(["", "abc", "1e3", "+3", "%31", "10000", "10001", "100000", "100001"]),
    st.sampled_from([str(2**62), str(2**62 + 1)]),
)
wild = st.lists(st.tuples(st.sampled_from(["offset", "limit", "other"]), values), max_size=3).map(
    lambda pairs: "&".join(f"{k}={v}" for k, v in pairs)
)
queries = bound | wild


@settings(max_examples=300)
@given(
    who=st.sampled_from(["admin", "alice", "bob", "rita", "ravi", "nobody", None]),
    which=st.sampled_from(["list", "list", "alice", "bob", "gone", "bad"]),
    query=queries,
)
def test_a_read_answers_the_same_whichever_path_takes_it(
    api: Api, who: str | None, which: str, query: str
) -> None:
    path = {
        "list": "/v1/jobs",
        "alice": f"/v1/jobs/{api.jobs['alice'][0]}",
        "bob": f"/v1/jobs/{api.jobs['bob'][-1]}",
        "gone": "/v1/jobs/99999",
        "bad": "/v1/jobs/x1",
    }[which]
    token = api.tokens.get(who, "not-a-token") if who is not None else None
    answered = api.fast_reads().answered
    fast = api.call("GET", f"{path}?{query}", token)
    took = api.fast_reads().answered - answered
    routed = api.call("GET", f"{path}?{query}&_=0" if query else f"{path}?_=0", token)
    assert api.fast_reads().answered == answered + took  # the extra parameter is passed on
    assert (fast.status, fast.body) == (routed.status, routed.body)
    assert fast.headers[b"content-type"] == routed.headers[b"content-type"]
    # The common calls are the fast path's: a good token and a query it binds.
    common = who not in ("ravi", "nobody", None) and which != "bad" and _bound(which, query)
    assert took == (common and fast.status == 200)


def _bound(which: str, query: str) -> bool:
    raw = query.encode()
    return (
        _page(raw, 1000, 1, 10_000) is not None
        if which == "list"
        else _page(raw, 1000, 0, 100_000) is not None
    )


def test_a_user_reads_their_own_jobs_and_no_one_elses_on_the_fast_path(api: Api) -> None:
    answered = api.fast_reads().answered
    listed = api.call("GET", "/v1/jobs?limit=20", api.tokens["bob"])
    assert listed.status == 200 and api.fast_reads().answered == answered + 1
    assert [job["id"] for job in json.loads(listed.body)] == api.jobs["bob"][::-1]
    assert api.call("GET", f"/v1/jobs/{api.jobs['alice'][0]}", api.tokens["bob"]).status == 403
    everyone = json.loads(api.call("GET", "/v1/jobs", api.tokens["rita"]).body)
    assert len(everyone) == 5


def test_a_listing_holds_the_jobs_of_the_state_owner_and_queue_asked(api: Api) -> None:
    def listed(query: str, who: str = "admin") -> list[int]:
        answer = api.call("GET", f"/v1/jobs?{query}", api.tokens[who])
        assert answer.status == 200, answer.body
        return [job["id"] for job in json.loads(answer.body)]

    everyone = api.jobs["bob"][::-1] + api.jobs["alice"][::-1]  # newest first; none placed: no node
    assert listed("state=pending") == listed("queue=default") == everyone
    assert listed("state=running") == listed("queue=batch") == []
    assert listed("owner=alice&state=pending&limit=2&offset=1") == api.jobs["alice"][::-1][1:3]
    assert listed("owner=bob", "bob") == listed("state=pending", "bob") == api.jobs["bob"][::-1]
    theirs = api.call("GET", "/v1/jobs?owner=alice", api.tokens["bob"])
    assert theirs.status == 403 and b"owner=bob" in theirs.body
    for query, field in [
        ("state=done", b"state"),
        ("queue=Batch", b"queue"),
        ("owner=" + "x" * 65, b"owner"),
    ]:
        refused = api.call("GET", f"/v1/jobs?{query}", ADMIN)
        assert refused.status == 422 and field in refused.body


@pytest.mark.parametrize(
    ("query", "page"),
    [
        (b"", (0, 1000)),
        (b"limit=20", (0, 20)),
        (b"offset=3&limit=1", (3, 1)),
        (b"limit=0", None),  # below the list's bound
        (b"limit=10001", None),
        (b"limit=1&limit=2", None),  # repeated: the route decides
        (b"limit=", None),
        (b"limit=%32", None),
        (b"page=2", None),
        (b"limit=20&", None),
        (f"offset={2**62 + 1}".encode(), None),
    ],
)
def test_the_fast_path_binds_only_the_queries_it_knows(query: bytes, page: tuple[int, int] | None) -> None:
    assert _page(query, 1000, 1, 10_000) == page


def test_a_fast_answer_is_timed_under_its_route(api: Api) -> None:
    api.call("GET", f"/v1/jobs/{api.jobs['alice'][0]}", api.tokens["alice"])
    scraped = api.call("GET", "/metrics", ADMIN)
    assert scraped.status == 200
    timed = b'shoal_api_request_seconds_count{method="GET",route="/v1/jobs/{job_id}",status="2xx"}'
    assert timed in scraped.body
