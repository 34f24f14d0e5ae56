"""Tokens on real stores (SQLite, and etcd when installed): they expire, are revoked at once
whatever was remembered, and a bootstrap token opens no API call and gives out exactly its
uses (looking one up spends none); it lasts a day unless made for less or more, a week at
most. A database made before tokens had all this keeps its tokens and audit records working."""

from __future__ import annotations

import hashlib
import json
import secrets
import shutil
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from pydantic import ValidationError

from shoal.master.auth import USES_WRITTEN_EVERY, Tokens
from shoal.master.store import AuditQuery, Store
from shoal.master.store.etcd import EtcdStore
from shoal.master.store.gateway import Gateway, absent, put_op
from shoal.master.store.sqlite import SqliteStore
from shoal.model import Role
from shoal.shell.protocol import AuditRecord
from shoal.testing.etcd import EtcdCluster
from shoal.views import BOOTSTRAP_TTL, MAX_BOOTSTRAP_TTL, TokenRequest


class Clock:
    """Time that moves only when told to."""

    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway | None]:
    if shutil.which("etcd") is None:
        yield None
        return
    with EtcdCluster(1, tmp_path_factory.mktemp("etcd")) as etcd:
        gateway = Gateway(etcd.endpoints)
        yield gateway
        gateway.close()


def _etcd_stores(gateway: Gateway, prefix: str) -> Callable[[], Store]:
    """Stores on `prefix` of the leader that takes its key now."""
    leader_key = f"{prefix}leader".encode()
    fence = gateway.txn([absent(leader_key)], [put_op(leader_key, b"me")]).revision
    return lambda: EtcdStore(gateway, prefix, fence=fence, leader_key=leader_key)


@pytest.fixture(params=["sqlite", "etcd"])
def new_store(request: pytest.FixtureRequest, tmp_path: Path, gateway: Gateway | None) -> Callable[[], Store]:
    """Opens the same store again at each call, as a master starting over it would."""
    if request.param == "sqlite":
        return lambda: SqliteStore(tmp_path / "shoal.db", fsync=False)
    if gateway is None:
        pytest.skip("etcd is not installed (make test does)")
    return _etcd_stores(gateway, f"/tokens-test/{secrets.token_hex(4)}/")


def test_a_token_expires_at_its_time_and_is_refused_from_then(new_store: Callable[[], Store]) -> None:
    clock = Clock()
    tokens = Tokens(new_store(), "cluster", clock=clock)
    made = tokens.add("alice", Role.USER, ttl=60)
    assert made.entry.expires == clock.now + 60
    assert tokens.caller(made.token).name == "alice"  # remembered from here on
    clock.now += 59.9
    assert tokens.caller(made.token) is not None
    clock.now += 0.1
    assert tokens.caller(made.token) is None
    assert Tokens(new_store(), "cluster", clock=clock).caller(made.token) is None


def test_a_revoked_token_is_refused_at_once_though_it_was_remembered(new_store: Callable[[], Store]) -> None:
    clock = Clock()
    tokens = Tokens(new_store(), "cluster", clock=clock)
    made = tokens.add("bob", Role.ADMIN)
    assert tokens.caller(made.token).name == "bob"
    revoked = tokens.revoke(made.id)
    assert revoked is not None and revoked.revoked == clock.now
    assert tokens.caller(made.token) is None
    assert Tokens(new_store(), "cluster", clock=clock).caller(made.token) is None
    assert tokens.revoke("0" * 16) is None
    [(listed_id, entry)] = tokens.listing()
    assert (listed_id, entry.revoked) == (made.id, clock.now)


def test_a_bootstrap_token_opens_no_call_and_gives_out_its_uses_only(new_store: Callable[[], Store]) -> None:
    clock = Clock()
    tokens = Tokens(new_store(), "cluster", clock=clock)
    made = tokens.add("rack7", Role.USER, kind="bootstrap", uses=2, ttl=100)
    assert tokens.caller(made.token) is None
    assert [tokens.redeem_bootstrap(made.token).used for _ in range(2)] == [1, 2]
    assert tokens.redeem_bootstrap(made.token) is None
    again = Tokens(new_store(), "cluster", clock=clock)  # the count was written
    assert again.redeem_bootstrap(made.token) is None
    unlimited = tokens.add("lab", Role.USER, kind="bootstrap", ttl=100)
    assert all(tokens.redeem_bootstrap(unlimited.token) for _ in range(5))
    clock.now += 100
    assert tokens.redeem_bootstrap(unlimited.token) is None  # expired
    api = tokens.add("carol", Role.USER)
    assert tokens.redeem_bootstrap(api.token) is None
    assert tokens.redeem_bootstrap("shoal_nothing") is None
    revoked = tokens.add("gone", Role.USER, kind="bootstrap")
    tokens.revoke(revoked.id)
    assert tokens.redeem_bootstrap(revoked.token) is None


def test_a_bootstrap_token_looked_up_spends_no_use(new_store: Callable[[], Store]) -> None:
    tokens = Tokens(new_store(), None)  # a master serving TLS: no cluster token
    made = tokens.add("node-join", Role.USER, kind="bootstrap", uses=1)
    assert all(tokens.bootstrap(made.token) == made.entry for _ in range(3))
    assert tokens.redeem_bootstrap(made.token).used == 1
    assert tokens.bootstrap(made.token) is None and tokens.redeem_bootstrap(made.token) is None
    assert tokens.bootstrap(tokens.add("api", Role.ADMIN).token) is None
    assert not tokens.is_cluster("") and not tokens.is_cluster("cluster")


def test_a_bootstrap_token_lasts_a_day_unless_told_and_a_week_at_most() -> None:
    assert TokenRequest(name="racks", kind="bootstrap").ttl == BOOTSTRAP_TTL == 86_400
    assert TokenRequest(name="racks", kind="bootstrap", ttl=3600).ttl == 3600
    assert TokenRequest(name="ci").ttl is None  # an API token lasts as long as it is made to
    with pytest.raises(ValidationError) as long:
        TokenRequest(name="racks", kind="bootstrap", ttl=MAX_BOOTSTRAP_TTL + 1)
    assert long.value.errors()[0]["loc"] == ("ttl",)


def test_last_use_is_written_now_and_then_and_when_listed(new_store: Callable[[], Store]) -> None:
    clock = Clock()
    store = new_store()
    tokens = Tokens(store, "cluster", clock=clock)
    made = tokens.add("dave", Role.USER)
    digest = next(d for d, _ in store.tokens())
    tokens.caller(made.token)
    assert store.token(digest).last_used is None  # kept in memory only
    clock.now += USES_WRITTEN_EVERY
    tokens.caller(made.token)  # written with this call
    assert store.token(digest).last_used == clock.now
    clock.now += 1
    tokens.caller(made.token)
    [(_, listed)] = tokens.listing()
    assert listed.last_used == clock.now == store.token(digest).last_used


def test_the_seeded_admin_token_keeps_its_history_and_its_revocation(new_store: Callable[[], Store]) -> None:
    clock = Clock()
    tokens = Tokens(new_store(), "cluster", clock=clock)
    tokens.seed("admin", Role.ADMIN, "shoal_admin")
    [(admin_id, first)] = tokens.listing()
    clock.now += 10
    restarted = Tokens(new_store(), "cluster", clock=clock)
    restarted.seed("admin", Role.ADMIN, "shoal_admin")
    assert restarted.listing() == [(admin_id, first)]
    restarted.revoke(admin_id)
    Tokens(new_store(), "cluster", clock=clock).seed("admin", Role.ADMIN, "shoal_admin")
    assert Tokens(new_store(), "cluster", clock=clock).caller("shoal_admin") is None


def test_a_follower_forgets_a_token_it_found_within_seconds(new_store: Callable[[], Store]) -> None:
    clock = Clock()
    leader = Tokens(new_store(), "cluster", clock=clock)
    follower = Tokens(new_store(), "cluster", read_only=True, clock=clock)
    made = leader.add("erin", Role.READER)
    assert follower.caller(made.token) is not None
    leader.revoke(made.id)
    clock.now += 5.1
    assert follower.caller(made.token) is None


def test_an_old_database_keeps_its_tokens_and_audit_records(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as db:  # the tables as shoal made them before
        db.executescript(
            """
            CREATE TABLE tokens (digest TEXT PRIMARY KEY, name TEXT NOT NULL, role TEXT NOT NULL);
            CREATE TABLE token_roles (digest TEXT PRIMARY KEY, roles TEXT NOT NULL);
            CREATE TABLE audit (id INTEGER PRIMARY KEY AUTOINCREMENT, doc TEXT NOT NULL);
            """
        )
        digest = hashlib.sha256(b"shoal_old").hexdigest()
        db.execute("INSERT INTO tokens VALUES (?, 'frank', 'user')", (digest,))
        db.execute(
            "INSERT INTO audit (doc) VALUES (?)",
            (json.dumps({"at": 5.0, "who": "admin", "command": "uptime", "nodes": "n[1-2]"}),),
        )
    store = SqliteStore(path, fsync=False)
    tokens = Tokens(store, "cluster")
    assert tokens.caller("shoal_old").name == "frank"
    [(_, entry)] = tokens.listing()
    assert (entry.kind, entry.expires, entry.revoked, entry.roles) == ("api", None, None, ())
    [record] = store.audit(0, 10, AuditQuery(who="admin", kind="exec", since=5.0))
    assert (record.id, record.command, record.nodes) == (1, "uptime", "n[1-2]")
    store.add_audit(AuditRecord(at=6.0, who="frank", kind="job.submit", status=201))
    assert [r.id for r in store.audit(0, 10, AuditQuery(who="frank"))] == [2]
    assert [r.id for r in store.audit(0, 10)] == [2, 1]
