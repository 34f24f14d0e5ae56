"""The master's limits: the token bucket's arithmetic (properties), then a live master that
refuses oversized bodies and blobs, floods and slow heads, and keeps answering the others."""

from __future__ import annotations

import asyncio
import copy
import hashlib
import json
import socket
import time
from collections.abc import Iterator

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from shoal.master.buckets import Bucket, Buckets
from shoal.model import Role
from shoal.testing.live import LiveCluster, live_cluster

rates = st.floats(0.1, 1000.0)
bursts = st.integers(1, 300)
instants = st.floats(0.0, 1000.0)


def _window_bound_holds(admitted: list[float], rate: float, burst: int) -> bool:
    """No stretch of time [s, e] admitted more than burst + rate * (e - s) calls."""
    return all(
        j - i + 1 <= burst + rate * (admitted[j] - admitted[i]) + 1e-6
        for i in range(len(admitted))
        for j in range(i, len(admitted))
    )


@given(rates, bursts, st.lists(instants, min_size=1, max_size=150))
def test_no_stretch_of_time_admits_more_than_the_burst_and_the_rate(
    rate: float, burst: int, times: list[float]
) -> None:
    times.sort()
    bucket = Bucket.full(rate, burst, times[0])
    admitted = [t for t in times if bucket.take(t) == 0.0]
    assert _window_bound_holds(admitted, rate, burst)


@given(rates, bursts, st.lists(instants, min_size=1, max_size=150))
def test_a_clock_that_steps_back_gives_no_calls(rate: float, burst: int, times: list[float]) -> None:
    bucket = Bucket.full(rate, burst, times[0])
    admitted = sum(bucket.take(t) == 0.0 for t in times)
    assert admitted <= burst + rate * (max(times) - times[0]) + 1e-6


@given(rates, bursts, instants, st.lists(st.floats(0.0, 3.0), max_size=100))
def test_a_caller_within_the_rate_is_never_refused(
    rate: float, burst: int, start: float, slack: list[float]
) -> None:
    bucket = Bucket.full(rate, burst, start)
    now = start
    for extra in slack:
        now += (1.0 + extra) / rate
        assert bucket.take(now) == 0.0


@given(rates, bursts, instants)
def test_a_full_bucket_gives_its_burst_at_once_then_says_when_the_next_comes(
    rate: float, burst: int, now: float
) -> None:
    bucket = Bucket.full(rate, burst, now)
    assert all(bucket.take(now) == 0.0 for _ in range(burst))
    assert bucket.empty(now)
    assert bucket.take(now) == pytest.approx(1.0 / rate)


@given(rates, bursts, st.lists(instants, min_size=1, max_size=150))
def test_the_wait_given_is_enough_and_no_more(rate: float, burst: int, times: list[float]) -> None:
    times.sort()
    bucket = Bucket.full(rate, burst, times[0])
    for t in times:
        wait = bucket.take(t)
        if wait > 0:
            assert copy.copy(bucket).take(t + wait) == 0.0
            assert copy.copy(bucket).take(t + wait * 0.99) > 0 or wait < 1e-6


@given(st.lists(st.integers(0, 40), max_size=200), st.integers(1, 10))
def test_the_table_keeps_the_most_recent_callers_and_no_more(keys: list[int], size: int) -> None:
    table = Buckets(1.0, 1.0, size)
    for key in keys:
        table.take(key, 0.0)
        assert len(table) <= size
    recent = list(dict.fromkeys(reversed(keys)))[:size]
    assert all(key in table for key in recent)


def test_a_caller_forgotten_comes_back_full() -> None:
    table = Buckets(1.0, 2.0, size=1)
    assert table.take("a", 0.0) == 0.0 and table.take("a", 0.0) == 0.0 and table.take("a", 0.0) > 0
    table.take("b", 0.0)  # "a" is forgotten
    assert table.take("a", 0.0) == 0.0


# --- a live master -------------------------------------------------------------------------

BODY_MAX = 64 * 1024
BLOB_MAX = 256 * 1024
BLOB_QUOTA = 1024 * 1024
HEADER_TIMEOUT = 1.0


@pytest.fixture(scope="module")
def master(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveCluster]:
    settings = {
        "max_body": str(BODY_MAX),
        "blob_max": str(BLOB_MAX),
        "blob_quota": str(BLOB_QUOTA),
        "rate_limit": "2",
        "rate_burst": "8",
        "rate_tarpit": "0.2",
        "header_timeout": str(HEADER_TIMEOUT),
    }
    with live_cluster(tmp_path_factory.mktemp("limits"), agents=0, master_settings=settings) as cluster:
        yield cluster


def _token(cluster: LiveCluster, name: str, role: str = "admin") -> dict[str, str]:
    with cluster.client() as client:
        made = client.create_token(name, Role(role))
    return {"Authorization": f"Bearer {made.token}"}


def _blobs(cluster: LiveCluster) -> list[str]:
    return sorted(p.name for p in (cluster.root / "master" / "blobs").iterdir())


def _chunks(data: bytes, piece: int = 16 * 1024) -> Iterator[bytes]:
    """`data` as a body sent chunked (no Content-Length)."""
    for start in range(0, len(data), piece):
        yield data[start : start + piece]


def _assert_error_body(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert {"error", "fields"} <= body.keys()
    return body


def test_an_oversized_body_gets_413_and_the_master_answers_others(master: LiveCluster) -> None:
    headers = _token(master, "big-bodies")
    with httpx.Client(base_url=master.url, headers=headers) as http:
        declared = http.post("/v1/jobs", content=b" " * (BODY_MAX + 100))
        body = _assert_error_body(declared, 413)
        assert "max_body" in body["error"] and body["fields"][0]["field"] == "body"
        # A body found too large as it streams is read to its end (it is short enough)
        # and thrown away: the connection is kept.
        chunked = http.post("/v1/jobs", content=_chunks(b" " * 2 * BODY_MAX))
        _assert_error_body(chunked, 413)
        assert chunked.headers.get("connection") != "close"
        job = {"name": "small", "command": "true"}
        assert http.post("/v1/jobs", json=job).status_code == 201


def test_a_body_declared_far_too_large_is_answered_before_it_is_sent(master: LiveCluster) -> None:
    head = (
        f"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {1 << 30}\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", master.port), timeout=10) as s:
        s.sendall(head.encode())
        answer = _read_all(s)
    assert answer.startswith(b"HTTP/1.1 413 ") and b"connection: close" in answer.lower()


def test_an_oversized_blob_is_refused_and_leaves_no_partial_file(master: LiveCluster) -> None:
    headers = _token(master, "blobs")
    content = b"b" * (BLOB_MAX + 1)
    name = hashlib.sha256(content).hexdigest()
    with httpx.Client(base_url=master.url, headers=headers) as http:
        _assert_error_body(http.put(f"/v1/blobs/{name}", content=_chunks(content)), 413)
        _assert_error_body(http.put(f"/v1/blobs/{name}", content=content), 413)
        assert _blobs(master) == []
        # Under blob_max, but past the store's quota after four of them.
        stored = []
        for i in range(5):
            part = bytes([i]) * (BLOB_MAX - 1024)
            digest = hashlib.sha256(part).hexdigest()
            answer = http.put(f"/v1/blobs/{digest}", content=_chunks(part))
            if answer.status_code == 201:
                stored.append(digest)
        _assert_error_body(answer, 507)
        assert len(stored) == 4 and _blobs(master) == sorted(stored)


async def _flood(url: str, headers: dict[str, str], calls: int) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=url, headers=headers) as http:
        return await asyncio.gather(*(http.get("/v1/whoami") for _ in range(calls)))


def test_a_flood_with_one_token_gets_429s_while_another_token_gets_through(master: LiveCluster) -> None:
    flooder, other = _token(master, "flooder", "user"), _token(master, "patient", "user")
    answers = asyncio.run(_flood(master.url, flooder, 40))
    refused = [a for a in answers if a.status_code == 429]
    assert len(refused) >= 40 - 8 - 2 * 5  # the burst, and the rate over a generous 5 s
    assert all(a.status_code in (200, 429) for a in answers)
    for answer in refused:
        _assert_error_body(answer, 429)
        assert int(answer.headers["retry-after"]) >= 1
    with httpx.Client(base_url=master.url, headers=other) as http:
        assert [http.get("/v1/whoami").status_code for _ in range(3)] == [200, 200, 200]


def test_calls_without_a_good_token_are_counted_by_address(master: LiveCluster) -> None:
    known = _token(master, "known", "user")
    with httpx.Client(base_url=master.url) as http:
        assert http.get("/v1/whoami", headers=known).status_code == 200  # seen before the flood
        made_up = [http.get("/v1/whoami", headers={"Authorization": f"Bearer fake{i}"}) for i in range(20)]
        assert {a.status_code for a in made_up} == {401, 429}
        assert http.get("/v1/whoami", headers=known).status_code == 200


def test_the_agents_own_paths_are_not_counted_against_the_cluster_token(master: LiveCluster) -> None:
    agent = {"Authorization": f"Bearer {master.cluster_token}"}
    with httpx.Client(base_url=master.url, headers=agent) as http:
        answers = {http.head(f"/v1/blobs/{'0' * 64}").status_code for _ in range(30)}
    assert answers == {404}


def _read_all(s: socket.socket) -> bytes:
    """Everything the master sends until it closes the connection."""
    data = b""
    while chunk := s.recv(65536):
        data += chunk
    return data


def test_a_client_that_never_finishes_its_headers_is_disconnected(master: LiveCluster) -> None:
    with socket.create_connection(("127.0.0.1", master.port), timeout=10) as slow:
        slow.sendall(b"GET /v1/whoami HTTP/1.1\r\nHost: x\r\n")
        slow.settimeout(0.1)
        closed = False
        deadline = time.monotonic() + 10 * HEADER_TIMEOUT
        while not closed and time.monotonic() < deadline:
            try:
                slow.sendall(b"X-Slow: a\r\n")  # a header a tenth of a second
                closed = slow.recv(1) == b""
            except TimeoutError:
                continue
            except (BrokenPipeError, ConnectionResetError):
                closed = True
        assert closed, "the master kept a connection whose head never ended"


def test_a_body_that_stops_coming_is_disconnected(master: LiveCluster) -> None:
    with socket.create_connection(("127.0.0.1", master.port), timeout=10 * HEADER_TIMEOUT) as slow:
        slow.sendall(b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n" + b" " * 10)
        began = time.monotonic()
        assert slow.recv(1) == b"", "the master answered a body it has not had"
    assert time.monotonic() - began < 5 * HEADER_TIMEOUT


def test_a_body_that_comes_slowly_but_steadily_is_taken(master: LiveCluster) -> None:
    headers = _token(master, "steady")
    body = json.dumps({"name": "steady", "command": ["true"]}).encode() + b" " * 30
    head = (
        "POST /v1/jobs HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\n"
        f"Authorization: {headers['Authorization']}\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    pieces = [body[i : i + 10] for i in range(0, len(body), 10)]
    pause = 2.5 * HEADER_TIMEOUT / len(pieces)  # in all, longer than any one piece may take
    with socket.create_connection(("127.0.0.1", master.port), timeout=10 * HEADER_TIMEOUT) as steady:
        steady.sendall(head.encode())
        for piece in pieces:
            time.sleep(pause)
            steady.sendall(piece)
        answer = _read_all(steady)
    assert answer.startswith(b"HTTP/1.1 201 "), answer[:200]


def test_a_connection_that_sends_nothing_is_closed(master: LiveCluster) -> None:
    with socket.create_connection(("127.0.0.1", master.port), timeout=10 * HEADER_TIMEOUT) as idle:
        assert idle.recv(1) == b""


def test_an_oversized_head_gets_431(master: LiveCluster) -> None:
    with socket.create_connection(("127.0.0.1", master.port), timeout=10) as s:
        s.sendall(b"GET /v1/whoami HTTP/1.1\r\nHost: x\r\n" + b"X-Pad: " + b"p" * (80 * 1024))
        answer = _read_all(s)
    assert answer.startswith(b"HTTP/1.1 431 ")
    assert {"error", "fields"} <= json.loads(answer.split(b"\r\n\r\n", 1)[1]).keys()


def test_a_second_authorization_header_does_not_take_a_tokens_calls_off_its_count(
    master: LiveCluster,
) -> None:
    """The routes read the first Authorization header: so does the count. A made-up token
    added after it once had the calls counted against the address instead, so that a token
    spread over many addresses passed its rate."""
    token = _token(master, "two-headers", "user")["Authorization"]
    with httpx.Client(base_url=master.url) as http:
        assert http.get("/v1/whoami", headers={"Authorization": token}).status_code == 200  # known
    doubled = httpx.Headers([("Authorization", token), ("Authorization", "Bearer made-up")])
    answers = asyncio.run(_flood(master.url, doubled, 40))
    assert {a.status_code for a in answers} == {200, 429}
    assert all(a.json()["name"] == "two-headers" for a in answers if a.status_code == 200)
    with httpx.Client(base_url=master.url, headers={"Authorization": token}) as http:
        assert 429 in [http.get("/v1/whoami").status_code for _ in range(5)]
