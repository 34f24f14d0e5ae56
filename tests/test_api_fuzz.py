"""Schemathesis fuzzes every operation of the OpenAPI schema with every role's token and a
bad one: bad input gets a 4xx with the error body, never a 5xx, and a read-only token never
changes anything.

The master serves TLS, as by default, so the calls only it answers (a node's join and
renewal) are fuzzed too: a join with a bootstrap token. It runs without agents, so no
fuzzed command is ever executed.
"""

from __future__ import annotations

import json
import ssl
from pathlib import Path

import httpx
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings

from shoal.testing.live import LiveCluster

_MUTATING = frozenset({"POST", "PUT", "PATCH", "DELETE"})


@pytest.fixture(scope="module")
def lone_master(tmp_path_factory: pytest.TempPathFactory):
    cluster = LiveCluster(
        Path(tmp_path_factory.mktemp("fuzz")), agents=0, heartbeat_timeout=2, heartbeat_interval=1, tls=True
    )
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


def operations(url: str, ca: str) -> list:
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json", verify=ca)
    return [result.ok() for result in schema.get_all_operations()]


def _token(cluster: LiveCluster, name: str, role: str, kind: str = "api") -> str:
    response = httpx.post(
        f"{cluster.url}/v1/tokens",
        json={"name": name, "role": role, "kind": kind},
        headers={"Authorization": f"Bearer {cluster.admin_token}"},
        verify=ssl.create_default_context(cafile=cluster.ca),
    )
    response.raise_for_status()
    return response.json()["token"]


def test_no_operation_answers_a_server_error(lone_master: LiveCluster) -> None:
    assert lone_master.ca is not None
    ops = operations(lone_master.url, lone_master.ca)
    assert len(ops) >= 8
    tokens = {
        "admin": lone_master.admin_token,
        "user": _token(lone_master, "fuzz-user", "user"),
        "reader": _token(lone_master, "fuzz-reader", "reader"),
        "bad": "not-a-token",
    }
    # A join is fuzzed with a bootstrap token in the user's place, which it cannot tell from
    # the admin's here: as many calls, and the join's checks of what it is sent are reached.
    joining = tokens | {"user": _token(lone_master, "fuzz-join", "user", kind="bootstrap")}
    # One connection pool for all the calls: a client of its own for each would cost more
    # (a TLS context, a handshake) than the call.
    trusted = ssl.create_default_context(cafile=lone_master.ca)
    with requests.Session() as session, httpx.Client(timeout=10, verify=trusted) as http:
        session.verify = lone_master.ca
        session.trust_env = False  # no proxy, netrc or CA bundle looked up afresh for each call
        for op in ops:
            tried = joining if op.path == "/v1/nodes/join" else tokens
            _fuzz(op, lone_master.url, tried, session, http)


def _fuzz(op, url: str, tokens: dict[str, str], session: requests.Session, http: httpx.Client) -> None:
    """Each case of `op` with each token."""

    @given(case=op.as_strategy())  # 20 cases of each of some 40 operations, each with every token
    @settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck))
    def fuzz(case) -> None:
        if case.method == "GET" and case.formatted_path.startswith("/v1/services"):
            case.query = {**(case.query or {}), "wait": "10ms"}  # a blocking query: briefly
        for role, token in tokens.items():
            headers = {"Authorization": f"Bearer {token}"}
            where = f"{role}: {case.method} {case.formatted_path}"
            if case.formatted_path.endswith(("/subscribe", "/watch", "/v1/stream")):
                status, body = _stream(http, case, url, headers)
            else:
                response = case.call(base_url=url, headers=headers, session=session, verify=session.verify)
                status = response.status_code
                body = response.content if case.method != "HEAD" else None  # a HEAD answer has none
            assert status < 500, f"{where}: {status} {body!r}"
            if status >= 400 and body is not None:
                assert {"error", "fields"} <= json.loads(body).keys(), f"{where}: {status} {body!r}"
            if role == "reader" and case.method in _MUTATING:
                assert status >= 400, f"{where}: a read-only token was let through ({status})"

    fuzz()


def _stream(http: httpx.Client, case, url: str, headers: dict[str, str]) -> tuple[int, bytes | None]:
    """A framework's event stream, the cluster's event stream, or a watch, never ends by
    itself: its status, and its body when it is an error; then hang up."""
    kwargs = case.as_transport_kwargs(base_url=url, headers=headers)
    with http.stream(
        kwargs["method"], kwargs["url"], headers=kwargs["headers"], json=kwargs.get("json")
    ) as response:
        return response.status_code, response.read() if response.status_code >= 400 else None


def test_a_nul_byte_is_refused_at_submission_naming_its_field(lone_master: LiveCluster) -> None:
    """A command, a variable and a working directory reach processes as C strings: one
    holding a NUL byte is refused at once (422, the field named), in a job and in a
    framework's task alike, not failed on each node it would be placed on."""
    auth = {"Authorization": f"Bearer {lone_master.admin_token}"}
    trusted = ssl.create_default_context(cafile=lone_master.ca)
    bad = [
        ({"command": "echo a\0b"}, "command"),
        ({"command": ["echo", "a\0b"]}, "command"),
        ({"command": "true", "env": {"A": "a\0b"}}, "env.A"),
        ({"command": "true", "workdir": "/srv/a\0b"}, "workdir"),
    ]
    with httpx.Client(base_url=lone_master.url, headers=auth, verify=trusted) as http:
        jobs = http.get("/v1/jobs").json()  # the fuzzing's, when it ran first
        for spec, field in bad:
            launch = {"type": "accept", "offer_ids": ["o"], "tasks": [{"name": "t", **spec}]}
            for path, body, where in (
                ("/v1/jobs", spec, field),
                ("/v1/frameworks/f1/call", launch, f"accept.tasks.0.{field}"),
            ):
                response = http.post(path, json=body)
                assert response.status_code == 422, (path, body, response.text)
                [error] = response.json()["fields"]
                assert error["field"] == where and "holds a NUL byte" in error["reason"], error
        assert http.get("/v1/jobs").json() == jobs
