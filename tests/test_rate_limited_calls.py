"""A call the master's rate limit refuses (429 with Retry-After: nothing was done) goes
again after the wait asked, a few times and never long, writes as well as reads; after
that its error says that the master limits this token and what to do. The rules (pure),
then the SDK, its asyncio calls and the command line against a master with a small limit."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import httpx
import pytest
from typer.testing import CliRunner

from shoal.api_errors import api_error
from shoal.calls import AsyncCalls
from shoal.cli import app
from shoal.client import ApiError, Client
from shoal.masters import FAILOVER, PATIENCE, Failover, Masters, Patience
from shoal.model import Role
from shoal.testing.live import LiveCluster, live_cluster

A = "http://m1:8470"
LIMITED = {"Retry-After": "3"}


def call(*, safe: bool = False, within: float = 15.0, patience: Patience = PATIENCE) -> Failover:
    return Failover(Masters([A]), "/v1/jobs", safe=safe, now=0.0, within=within, patience=patience)


@pytest.mark.parametrize("safe", [True, False])
def test_a_call_refused_for_the_rate_goes_again_after_the_wait_asked_a_few_times(safe: bool) -> None:
    route = call(safe=safe, patience=Patience(tries=3, longest=10.0))
    assert [route.answered(A, 429, LIMITED, 0.0) for _ in range(2)] == [3.0, 3.0]
    assert route.answered(A, 429, LIMITED, 6.0) is None  # the third refusal is the answer


def test_the_wait_for_the_rate_is_capped_and_not_held_to_the_failover_deadline() -> None:
    route = call(within=1.0)
    assert route.answered(A, 429, {"Retry-After": "3600"}, 0.0) == 10.0
    assert route.answered(A, 429, {"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"}, 10.0) == 10.0
    assert route.answered(A, 429, {"Retry-After": "0"}, 20.0) == 0.0
    assert route.answered(A, 429, LIMITED, 20.0) is None  # the default: four tries in all


def test_a_429_without_retry_after_is_the_calls_answer_at_once() -> None:
    # The registry's: a count of registrations at its most, which no wait changes.
    assert call().answered(A, 429, {}, 0.0) is None


def test_the_error_after_the_last_try_says_the_token_is_limited_and_what_to_do() -> None:
    said = {"error": "too many calls: at most 1 a second; try again in 1s", "fields": []}
    limited = api_error(httpx.Response(429, json=said, headers={"Retry-After": "1"}))
    assert limited.status == 429
    assert "the master is rate limiting this token (too many calls: at most 1 a second" in limited.message
    assert "wait a while" in limited.message and "raise the master's rate_limit" in limited.message
    full = api_error(httpx.Response(429, json={"error": "the registry holds 5 registrations", "fields": []}))
    assert full.message == "the registry holds 5 registrations"


# --- a master with a small rate limit ----------------------------------------------------

RATE, BURST = 1.0, 2


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveCluster]:
    settings = {"rate_limit": str(RATE), "rate_burst": str(BURST), "rate_tarpit": "0"}
    with live_cluster(tmp_path_factory.mktemp("rate"), agents=0, master_settings=settings) as running:
        yield running


def token(cluster: LiveCluster, name: str, role: Role = Role.USER) -> str:
    with cluster.client() as admin:
        return admin.create_token(name, role).token


def drain(cluster: LiveCluster, secret: str) -> None:
    """Spend the token's burst: its next call is refused for the rate."""
    with httpx.Client(base_url=cluster.url, headers={"Authorization": f"Bearer {secret}"}) as http:
        answers = [http.get("/v1/whoami").status_code for _ in range(BURST + 1)]
    assert answers[-1] == 429


def test_writes_go_through_a_rate_limit_each_once(cluster: LiveCluster) -> None:
    limited = token(cluster, "writer", Role.ADMIN)
    began = time.monotonic()
    with Client(cluster.url, limited) as writer:
        made = [writer.create_token(f"made-{i}", Role.USER).id for i in range(BURST + 3)]
    # The burst at once, then about a call a second: each refused call waited, and went again.
    assert time.monotonic() - began >= 3 / RATE - 0.5
    with cluster.client() as admin:
        kept = [t.id for t in admin.tokens() if t.name.startswith("made-")]
    assert sorted(kept) == sorted(made) and len(set(made)) == BURST + 3  # none made twice


def test_asyncio_calls_wait_out_the_rate_limit_too(cluster: LiveCluster) -> None:
    limited = token(cluster, "reader")

    async def read_at_once() -> list[int]:
        calls = AsyncCalls(Masters(cluster.url), limited, 30.0, FAILOVER)
        try:
            answers = await asyncio.gather(*(calls.send("GET", "/v1/whoami") for _ in range(BURST + 2)))
        finally:
            await calls.aclose()
        return [a.status_code for a in answers]

    assert asyncio.run(read_at_once()) == [200] * (BURST + 2)


def test_the_command_line_waits_out_the_rate_limit(cluster: LiveCluster) -> None:
    limited = token(cluster, "person")
    drain(cluster, limited)
    began = time.monotonic()
    listed = CliRunner().invoke(app, ["jobs", "--json"], env=cluster.cli_env(limited))
    assert listed.exit_code == 0, listed.output
    assert listed.output.strip() == "[]" and time.monotonic() - began >= 0.5 / RATE


def test_past_its_patience_a_call_says_the_token_is_rate_limited(cluster: LiveCluster) -> None:
    limited = token(cluster, "hasty")
    drain(cluster, limited)
    with Client(cluster.url, limited, patience=Patience(tries=2, longest=0.1)) as hasty:
        with pytest.raises(ApiError) as refused:
            hasty.whoami()
    assert refused.value.status == 429
    assert "the master is rate limiting this token" in refused.value.message
    assert "rate_limit" in refused.value.message
