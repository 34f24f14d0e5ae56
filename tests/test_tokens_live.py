"""Token lifecycles and the audit trail on a real master and agent: an expired or revoked
token is refused within a second, listings say when a token was last used, and every call
that changes something is recorded with who, what, from where and the status answered, and
calls refused before the caller is known are counted apart, never pushing records out."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import httpx
import pytest
from rich.console import Console
from typer.testing import CliRunner

from shoal.cli import app
from shoal.cli.render import tokens_table
from shoal.client import ApiError, Client
from shoal.model import JobSpec, Role
from shoal.shell.protocol import AuditRecord, ExecRequest, Selection
from shoal.testing.live import LiveCluster, live_cluster
from shoal.views import TokenView


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveCluster]:
    # A short trail, which refusals must not flush; no rate limit, so a flood reaches the trail.
    settings = {"audit_retention_count": "30", "rate_limit": "0"}
    with live_cluster(tmp_path_factory.mktemp("tokens"), agents=1, master_settings=settings) as c:
        yield c


def refused_within(cluster: LiveCluster, token: str, seconds: float) -> float:
    """Seconds until a call with `token` is refused (401), polled for at most `seconds`."""
    began = time.monotonic()
    with cluster.client(token) as client:
        while time.monotonic() - began <= seconds:
            try:
                client.whoami()
            except ApiError as e:
                assert e.status == 401
                return time.monotonic() - began
            time.sleep(0.02)
    raise AssertionError(f"the token was still accepted after {seconds}s")


def refusals(admin: Client, kind: str, count: int) -> list[AuditRecord]:
    """The refusals of `kind` once they add up to `count`: they are written within a second."""
    began = time.monotonic()
    while True:
        found = [r for r in admin.refusals() if r.kind == kind]
        if sum(r.count for r in found) >= count or time.monotonic() - began > 5:
            return found
        time.sleep(0.1)


def test_an_expired_token_is_refused_from_its_expiry(cluster: LiveCluster) -> None:
    with cluster.client() as admin:
        made = admin.create_token("brief", Role.USER, ttl=1)
    with cluster.client(made.token) as brief:
        assert brief.whoami().name == "brief"  # found, and remembered by the master
    assert made.expires is not None
    time.sleep(max(0.0, made.expires - time.time()))
    assert refused_within(cluster, made.token, 1.0) < 1.0


def test_a_revoked_token_is_refused_within_a_second(cluster: LiveCluster) -> None:
    with cluster.client() as admin:
        made = admin.create_token("leaver", Role.ADMIN)
        with cluster.client(made.token) as leaver:
            assert leaver.whoami().name == "leaver"
        revoked = cluster.cli("token", "revoke", made.id)
        assert revoked.returncode == 0, revoked.stderr
        assert refused_within(cluster, made.token, 1.0) < 1.0
        [view] = [t for t in admin.tokens() if t.id == made.id]
        assert view.state == "revoked" and view.revoked is not None
        with pytest.raises(ApiError) as unknown:
            admin.revoke_token("0123456789abcdef")
        assert unknown.value.status == 404


def test_token_list_shows_when_each_was_last_used(cluster: LiveCluster) -> None:
    with cluster.client() as admin:
        made = admin.create_token("lister", Role.READER, ttl=3600)
    before = time.time()
    with cluster.client(made.token) as lister:
        lister.jobs()
    listing = cluster.cli("token", "list", "--json")
    assert listing.returncode == 0, listing.stderr
    [view] = [t for t in json.loads(listing.stdout) if t["id"] == made.id]
    assert (view["name"], view["kind"], view["role"], view["state"]) == ("lister", "api", "reader", "active")
    assert before - 1 <= view["last_used"] <= time.time()
    assert 3590 < view["expires"] - view["created"] <= 3600
    assert "token" not in view and made.token not in listing.stdout
    narrow = Console(width=60, record=True)
    narrow.print(tokens_table([TokenView.model_validate(view)]))
    assert made.id in narrow.export_text()  # what revokes it is never cut short


def test_a_bootstrap_token_opens_no_api_call_and_bad_requests_say_why(cluster: LiveCluster) -> None:
    created = cluster.cli("token", "create", "rack7", "--bootstrap", "--uses", "2", "--ttl", "10m", "--json")
    assert created.returncode == 0, created.stderr
    made = json.loads(created.stdout)
    assert (made["kind"], made["uses"]) == ("bootstrap", 2)
    assert refused_within(cluster, made["token"], 0.5) < 0.5
    with cluster.client() as admin:
        [view] = [t for t in admin.tokens() if t.id == made["id"]]
    assert view.uses_left == 2
    auth = {"Authorization": f"Bearer {cluster.admin_token}"}
    for bad, field in (({"uses": 3}, "uses"), ({"ttl": 0}, "ttl"), ({"ttl": 1e12}, "ttl")):
        refused = httpx.post(f"{cluster.url}/v1/tokens", json={"name": "x", **bad}, headers=auth)
        assert refused.status_code == 422
        assert [f["field"] for f in refused.json()["fields"]] == [field]
    usage = CliRunner().invoke(app, ["token", "create", "y", "--ttl", "soon"])
    assert usage.exit_code == 2 and "not a duration" in usage.output


def test_every_change_is_audited_with_who_what_where_and_status(cluster: LiveCluster) -> None:
    with cluster.client() as admin:
        xavier = admin.create_token("xavier", Role.USER).token
        with cluster.client(xavier) as client:
            client.submit(JobSpec(command="true"))
            with pytest.raises(ApiError):
                client.drain("node1")  # 403: not an admin
        list(admin.exec(ExecRequest(select=Selection(nodes=["node1"]), command="true")))
    blank = {"select": {"all": True}, "command": " "}
    auth = {"Authorization": f"Bearer {cluster.admin_token}"}
    assert httpx.post(f"{cluster.url}/v1/exec", json=blank, headers=auth).status_code == 422
    bad_token = {"Authorization": "Bearer not-a-token"}
    assert (
        httpx.post(f"{cluster.url}/v1/jobs", json={"command": "true"}, headers=bad_token).status_code == 401
    )

    submitted = cluster.cli("audit", "--who", "xavier", "--kind", "job.submit", "--json")
    assert submitted.returncode == 0, submitted.stderr
    [record] = json.loads(submitted.stdout)
    assert (record["who"], record["role"], record["kind"]) == ("xavier", "user", "job.submit")
    assert (record["source"], record["status"]) == ("127.0.0.1", 201)
    with cluster.client() as admin:
        mine = admin.audit(who="xavier", since=time.time() - 60)
        assert [(r.kind, r.target, r.status) for r in mine] == [
            ("node.drain", "node1", 403),
            ("job.submit", "", 201),
        ]
        assert admin.audit(who="anonymous") == []  # refusals are counted apart
        [refused] = refusals(admin, "job.submit", 1)
        assert (refused.source, refused.status, refused.count) == ("127.0.0.1", 401, 1)
        # One record for each parallel command, the stream's own, with how the master answered.
        runs = admin.audit(who="admin", kind="exec")
        assert [(r.status, r.nodes, r.results) for r in runs] == [
            (422, "", {}),
            (200, "node1", {"0": "node1"}),
        ]
    table = cluster.cli("audit", "--who", "xavier")
    assert "job.submit" in table.stdout and "127.0.0.1" in table.stdout


def test_refusals_before_authentication_never_push_records_out(cluster: LiveCluster) -> None:
    with cluster.client() as admin:
        admin.create_token("witness", Role.READER)
        kept = admin.audit(limit=30)  # all the trail keeps here
        assert kept[0].kind == "token.create"
        with httpx.Client(base_url=cluster.url) as anyone:
            for _ in range(2_000):
                assert anyone.post("/v1/rebalance").status_code == 401
            assert anyone.post("/v1/no-such-call").status_code == 404  # no route: not recorded
        assert admin.audit(limit=30) == kept
        flood = refusals(admin, "rebalance", 2_000)
        assert sum(r.count for r in flood) == 2_000 and len(flood) <= 2  # a record a minute
        assert {(r.who, r.source, r.status) for r in flood} == {("anonymous", "127.0.0.1", 401)}
        assert all("no-such-call" not in r.kind for r in admin.refusals() + admin.audit(limit=30))
    listed = cluster.cli("audit", "--refused", "--json")
    assert listed.returncode == 0, listed.stderr
    assert sum(r["count"] for r in json.loads(listed.stdout) if r["kind"] == "rebalance") == 2_000
