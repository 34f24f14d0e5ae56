"""Nodes' identities in the store, SQLite and etcd alike: kept, renewed, forgotten; a
deposed master's store writes none; and `Identities` holds a node to its own serials."""

from __future__ import annotations

import dataclasses
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from shoal import tls
from shoal.errors import NotFound, SpecError
from shoal.master.identities import SERIALS_KEPT, Identities
from shoal.master.store import Deposed, NodeIdentity, Store
from shoal.master.store.etcd import EtcdStore
from shoal.master.store.gateway import Gateway, absent, put_op
from shoal.master.store.sqlite import SqliteStore
from shoal.testing.etcd import EtcdCluster


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    if shutil.which("etcd") is None:
        pytest.skip("etcd is not installed (make test does)")
    with EtcdCluster(1, tmp_path_factory.mktemp("etcd")) as etcd:
        gateway = Gateway(etcd.endpoints)
        yield gateway
        gateway.close()


def etcd_store(gateway: Gateway, fence: int | None = None) -> EtcdStore:
    prefix = f"/t/{secrets.token_hex(4)}/"
    leader_key = f"{prefix}leader".encode()
    taken = gateway.txn([absent(leader_key)], [put_op(leader_key, b"me")]).revision
    return EtcdStore(gateway, prefix, fence=taken if fence is None else fence, leader_key=leader_key)


@pytest.fixture(params=["sqlite", "etcd"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    if request.param == "sqlite":
        return SqliteStore(tmp_path / "shoal.db")
    return etcd_store(request.getfixturevalue("gateway"))


def test_an_identity_is_kept_replaced_and_forgotten(store: Store) -> None:
    assert store.identity("node1") is None and store.delete_identity("node1") is False
    joined = NodeIdentity("node1", {"0A": 200.0}, issued=100.0)
    store.put_identity(joined)
    assert store.identity("node1") == joined
    renewed = dataclasses.replace(joined, serials={"0A": 200.0, "0B": 300.0}, renewed=150.0)
    store.put_identity(renewed)
    assert store.identity("node1") == renewed and store.identity("node2") is None
    assert store.delete_identity("node1") is True and store.identity("node1") is None


def test_a_store_that_only_reads_keeps_no_identity(gateway: Gateway) -> None:
    with pytest.raises(Deposed):
        etcd_store(gateway, fence=0).put_identity(NodeIdentity("node1", {}, issued=1.0))


def test_identities_hold_a_node_to_its_own_current_serials(tmp_path: Path) -> None:
    files = tls.TlsFiles(tmp_path / "tls")
    tls.init_master_files(files, ["localhost"])
    identities = Identities(SqliteStore(tmp_path / "shoal.db"), files, days=1)
    request = tls.node_request("node1", tls.new_key())
    first = identities.sign("node1", request)
    identities.check_free("node1")
    identities.record_join("node1", first, now=0.0)
    with pytest.raises(SpecError) as taken:
        identities.check_free("node1")
    assert taken.value.status == 409 and "shoal node remove node1" in taken.value.reason
    with pytest.raises(SpecError) as garbled:
        identities.sign("node1", b"not a request")
    assert garbled.value.field == "csr"
    node1 = tls.Peer("node1", tls.NODE_UNIT, first.serial)
    assert identities.admits(node1, now=1.0)
    assert not identities.admits(tls.Peer("node2", tls.NODE_UNIT, first.serial), now=1.0)
    assert not identities.admits(tls.Peer("node1", tls.MASTER_UNIT, first.serial), now=1.0)
    assert not identities.admits(node1, now=first.not_after)  # expired
    second = identities.sign("node1", request)
    identities.record_renewal("node1", second, now=1.0)
    assert identities.admits(node1, now=1.0)  # the old one still good
    assert identities.admits(tls.Peer("node1", tls.NODE_UNIT, second.serial), now=1.0)
    assert identities.remove("node1")
    assert not identities.admits(node1, now=1.0)
    with pytest.raises(NotFound):
        identities.record_renewal("node1", second, now=1.0)


def test_a_node_renewing_in_a_loop_keeps_only_its_newest_certificates(tmp_path: Path) -> None:
    """Its record is read at each of its calls: a node that renews again and again must not
    grow it without bound. The newest certificates stay good, the oldest are let go."""
    files = tls.TlsFiles(tmp_path / "tls")
    tls.init_master_files(files, ["localhost"])
    store = SqliteStore(tmp_path / "shoal.db")
    identities = Identities(store, files, days=1)
    request = tls.node_request("node1", tls.new_key())
    identities.record_join("node1", identities.sign("node1", request), now=0.0)
    renewed = []
    for i in range(3 * SERIALS_KEPT):
        renewed.append(identities.sign("node1", request))
        identities.record_renewal("node1", renewed[-1], now=float(i))
    held = store.identity("node1")
    assert held is not None and len(held.serials) == SERIALS_KEPT
    good = [identities.admits(tls.Peer("node1", tls.NODE_UNIT, c.serial), now=100.0) for c in renewed]
    assert good == [False] * (2 * SERIALS_KEPT) + [True] * SERIALS_KEPT
