"""Schemathesis fuzzes every operation of the OpenAPI schema: bad input gets a 4xx, never a 5xx.

The master runs without agents, so no fuzzed command is ever executed.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from shoal.testing.live import LiveCluster


@pytest.fixture(scope="module")
def lone_master(tmp_path_factory: pytest.TempPathFactory):
    cluster = LiveCluster(
        Path(tmp_path_factory.mktemp("fuzz")), agents=0, heartbeat_timeout=2, heartbeat_interval=1
    )
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


def operations(url: str) -> list:
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    return [result.ok() for result in schema.get_all_operations()]


def test_no_operation_answers_a_server_error(lone_master: LiveCluster) -> None:
    ops = operations(lone_master.url)
    assert len(ops) >= 8
    for op in ops:

        @given(case=op.as_strategy())
        @settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
        def fuzz(case) -> None:
            for token in (lone_master.admin_token, "not-a-token"):
                headers = {"Authorization": f"Bearer {token}"}
                where = f"{case.method} {case.formatted_path}"
                if case.formatted_path.endswith(("/subscribe", "/watch")):
                    _stream(case, lone_master.url, headers)
                    continue
                if case.method == "GET" and case.formatted_path.startswith("/v1/services"):
                    case.query = {**(case.query or {}), "wait": "10ms"}  # a blocking query: briefly
                response = case.call(base_url=lone_master.url, headers=headers)
                assert response.status_code < 500, f"{where}: {response.status_code} {response.text}"
                if response.status_code >= 400 and case.method != "HEAD":  # a HEAD answer has no body
                    assert "error" in response.json(), where

        fuzz()


def _stream(case, url: str, headers: dict[str, str]) -> None:
    """A framework's event stream, or a watch, never ends by itself: read its status, then
    hang up."""
    kwargs = case.as_transport_kwargs(base_url=url, headers=headers)
    with (
        httpx.Client(timeout=10) as http,
        http.stream(
            kwargs["method"], kwargs["url"], headers=kwargs["headers"], json=kwargs.get("json")
        ) as response,
    ):
        assert response.status_code < 500, f"{case.formatted_path}: {response.status_code}"
        if response.status_code >= 400:
            assert "error" in json.loads(response.read())
