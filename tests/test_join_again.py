"""A join asked again: when the answer to a node's join is lost, the agent asks again with
the same key and the master gives it the same certificate, spending no use of its
bootstrap token; another key for that name is still refused. The identity it needs is kept
by SQLite and etcd alike, records kept before it still load, and the agent keeps its key
until its certificate is in place."""

from __future__ import annotations

import asyncio
import json
import secrets
import shutil
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from shoal import tls
from shoal.agent.identity import Credentials
from shoal.calls import AsyncCalls
from shoal.config import AgentSettings
from shoal.master.auth import public_id
from shoal.master.identities import Identities
from shoal.master.store import NodeIdentity, Store
from shoal.master.store.etcd import EtcdStore
from shoal.master.store.gateway import Gateway, absent, put_op
from shoal.master.store.sqlite import SqliteStore
from shoal.masters import Masters
from shoal.model import Role
from shoal.testing.etcd import EtcdCluster
from shoal.testing.live import LiveCluster, live_cluster
from shoal.trust import master_context

pytestmark = pytest.mark.timeout(120)

# --- the store --------------------------------------------------------------------------

Raw = Callable[[str, str], None]  # writes an identity's document into a store as it is


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    if shutil.which("etcd") is None:
        pytest.skip("etcd is not installed (make test does)")
    with EtcdCluster(1, tmp_path_factory.mktemp("etcd")) as etcd:
        gateway = Gateway(etcd.endpoints)
        yield gateway
        gateway.close()


@pytest.fixture(params=["sqlite", "etcd"])
def kept(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Store, Raw]]:
    """A store, and a way to write an identity's document into it as it is: (name, doc)."""
    if request.param == "sqlite":
        store = SqliteStore(tmp_path / "shoal.db")

        def raw_sqlite(name: str, doc: str) -> None:
            store._db.execute("INSERT OR REPLACE INTO identities VALUES (?, ?)", (name, doc))

        yield store, raw_sqlite
        store.close()
        return
    gateway: Gateway = request.getfixturevalue("gateway")
    prefix = f"/t/{secrets.token_hex(4)}/"
    leader_key = f"{prefix}leader".encode()
    fence = gateway.txn([absent(leader_key)], [put_op(leader_key, b"me")]).revision

    def raw_etcd(name: str, doc: str) -> None:
        gateway.txn([], [put_op(f"{prefix}identities/{name}".encode(), doc.encode())])

    yield EtcdStore(gateway, prefix, fence=fence, leader_key=leader_key), raw_etcd


def test_what_a_join_is_answered_again_with_is_kept_and_older_records_still_load(
    kept: tuple[Store, Raw],
) -> None:
    store, raw = kept
    joined = NodeIdentity(
        "node1", {"0A": 200.0}, issued=100.0, key="ab" * 32, certificate="PEM", token="0123456789abcdef"
    )
    store.put_identity(joined)
    assert store.identity("node1") == joined
    # Kept before joins were answered again: no key, certificate or token.
    raw("node2", json.dumps({"name": "node2", "serials": {"0B": 300.0}, "issued": 1.0, "renewed": None}))
    assert store.identity("node2") == NodeIdentity("node2", {"0B": 300.0}, issued=1.0)
    # Kept by a later release, with a field this one does not know: read as far as it goes.
    raw("node3", json.dumps({"name": "node3", "serials": {}, "issued": 2.0, "spare": [1]}))
    assert store.identity("node3") == NodeIdentity("node3", {}, issued=2.0)


def test_a_join_is_answered_again_only_for_the_key_it_joined_with_while_good(tmp_path: Path) -> None:
    files = tls.TlsFiles(tmp_path / "tls")
    tls.init_master_files(files, ["localhost"])
    identities = Identities(SqliteStore(tmp_path / "shoal.db"), files, days=1)
    key = tls.new_key()
    request = tls.node_request("node1", key)
    assert identities.joined_before("node1", request, now=0.0) is None  # never joined
    cert = identities.sign("node1", request)
    identities.record_join("node1", cert, now=0.0, token="0123456789abcdef")
    # The same key asks again, in a request made afresh: the same certificate.
    again = identities.joined_before("node1", tls.node_request("node1", key), now=1.0)
    assert again is not None and again.certificate == cert and again.token == "0123456789abcdef"
    assert identities.joined_before("node1", tls.node_request("node1", tls.new_key()), now=1.0) is None
    assert identities.joined_before("node1", b"not a request", now=1.0) is None
    assert identities.joined_before("node1", request, now=cert.not_after) is None  # expired
    # Renewed, it may still be asked for while it lasts: the node's, and good.
    renewed = identities.sign("node1", tls.node_request("node1", tls.new_key()))
    identities.record_renewal("node1", renewed, now=2.0)
    assert identities.joined_before("node1", request, now=3.0) == again
    identities.remove("node1")
    assert identities.joined_before("node1", request, now=3.0) is None  # refused since


# --- live ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveCluster]:
    with live_cluster(tmp_path_factory.mktemp("join-again"), agents=0, tls=True) as running:
        yield running


def bootstrap_token(cluster: LiveCluster, uses: int | None = 1) -> str:
    with cluster.client() as admin:
        return admin.create_token("joiners", Role.USER, kind="bootstrap", uses=uses).token


def join(cluster: LiveCluster, name: str, token: str, csr: bytes) -> httpx.Response:
    return httpx.post(
        f"{cluster.url}/v1/nodes/join",
        json={"name": name, "csr": csr.decode()},
        headers={"Authorization": f"Bearer {token}"},
        verify=master_context(str(cluster.ca)),
    )


def uses_left(cluster: LiveCluster, token: str) -> int | None:
    with cluster.client() as admin:
        return next(t.uses_left for t in admin.tokens() if t.id == public_id(token))


def stored(cluster: LiveCluster, name: str) -> dict[str, object]:
    with sqlite3.connect(cluster.root / "master" / "shoal.db") as db:
        (doc,) = db.execute("SELECT doc FROM identities WHERE name = ?", (name,)).fetchone()
    return json.loads(doc)  # type: ignore[no-any-return]


def test_a_join_asked_again_with_its_key_gets_the_same_certificate_and_spends_nothing(
    cluster: LiveCluster,
) -> None:
    token, key = bootstrap_token(cluster), tls.new_key()
    first = join(cluster, "node1", token, tls.node_request("node1", key))
    assert first.status_code == 201
    assert uses_left(cluster, token) == 0
    # The answer was lost: the same key asks again, with the token now used up.
    again = join(cluster, "node1", token, tls.node_request("node1", key))
    assert again.status_code == 201 and again.json() == first.json()
    assert uses_left(cluster, token) == 0
    assert list(stored(cluster, "node1")["serials"]) == [first.json()["serial"]]  # signed once
    # Another token that still has a use may ask too, and keeps its use.
    other = bootstrap_token(cluster)
    assert join(cluster, "node1", other, tls.node_request("node1", key)).json() == first.json()
    assert uses_left(cluster, other) == 1
    # Another key for the name is refused as before; a used-up token of another join asks nothing.
    taken = join(cluster, "node1", other, tls.node_request("node1", tls.new_key()))
    assert taken.status_code == 409
    assert "node1 already has an identity; `shoal node remove node1` first" in taken.json()["error"]
    spent = bootstrap_token(cluster)
    assert join(cluster, "node2", spent, tls.node_request("node2", tls.new_key())).status_code == 201
    refused = join(cluster, "node1", spent, tls.node_request("node1", key))
    assert refused.status_code == 401 and "used up" in refused.json()["error"]
    # Removed, its certificate is refused: the same key asks in vain, and joins afresh with a use.
    with cluster.client() as admin:
        admin.remove_node("node1")
    assert join(cluster, "node1", token, tls.node_request("node1", key)).status_code == 401
    anew = join(cluster, "node1", other, tls.node_request("node1", key))
    assert anew.status_code == 201 and anew.json()["serial"] != first.json()["serial"]
    assert uses_left(cluster, other) == 0


def test_an_agent_whose_join_answer_is_lost_asks_again_and_is_given_the_same_certificate(
    cluster: LiveCluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    token = bootstrap_token(cluster)
    lost: list[str] = []

    async def lose_the_first_join(response: httpx.Response) -> None:
        if response.request.url.path == "/v1/nodes/join" and not lost:
            lost.append(response.request.content.decode())
            raise httpx.ReadError("the connection dropped before the answer", request=response.request)

    made = Credentials.calls

    def calls(self: Credentials, bearer: str | None = None) -> AsyncCalls:
        made_calls = made(self, bearer)
        made_calls._http.event_hooks["response"].append(lose_the_first_join)
        return made_calls

    monkeypatch.setattr(Credentials, "calls", calls)
    settings = AgentSettings(
        master=cluster.url,
        state_dir=tmp_path,
        ca=cluster.ca,
        bootstrap_token=token,  # type: ignore[arg-type]
    )
    agent = Credentials(settings, Masters(settings.master), "node7")
    asyncio.run(agent.ready())
    assert lost, "the first answer was not lost"
    held = tls.describe((tmp_path / "identity" / "node.pem").read_bytes())
    # The master signed once: what the agent holds is what it answered the first time.
    assert list(stored(cluster, "node7")["serials"]) == [held.serial]
    assert uses_left(cluster, token) == 0
    assert not (tmp_path / "identity" / "joining.key").exists()  # in place: no longer needed
    assert cluster.ca is not None
    context = tls.client_context(cluster.ca, tls.IdentityFiles(tmp_path / "identity"))
    with httpx.Client(base_url=cluster.url, verify=context) as node7:
        assert node7.get("/v1/masters").status_code == 200  # it speaks for node7


def test_an_agent_keeps_the_key_it_joins_with_until_its_certificate_is_in_place(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_bytes(tls.create_authority().pem())
    settings = AgentSettings(master="https://m1:8470", state_dir=tmp_path, ca=ca)
    agent = Credentials(settings, Masters(settings.master), "node1")
    first = agent._joining_key()
    assert (tmp_path / "identity" / "joining.key").stat().st_mode & 0o777 == 0o600
    # Another agent started on the node's state (the first stopped while it asked) asks with it.
    again = Credentials(settings, Masters(settings.master), "node1")._joining_key()
    assert tls.key_pem(again) == tls.key_pem(first)
