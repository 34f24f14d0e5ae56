"""One identity per node, live on a master serving TLS: a node joins once with a bootstrap
token and from then on presents a certificate of its own, which speaks for that node only
(its registration, the blobs it may fetch and put); an admin removes a node, and its
certificate is refused at once; an agent renews its certificate while its tasks run on."""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from websockets.exceptions import ConnectionClosed, ConnectionClosedError
from websockets.sync.client import ClientConnection, connect

from shoal import tls
from shoal.masters import POLICY_CLOSE, REMOVED_CLOSE
from shoal.model import JobSpec, NodeInfo, NodeStatus, Resources, Role, TaskState
from shoal.shell.protocol import CopyFile, CopyRequest, Ended, Selection
from shoal.testing.live import LiveCluster, live_cluster, wait_for
from shoal.testing.programs import COUNTER
from shoal.trust import master_context
from shoal.wire import Register, encode

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveCluster]:
    with live_cluster(tmp_path_factory.mktemp("identity"), agents=3, tls=True) as running:
        yield running


def identity(cluster: LiveCluster, node: str) -> tls.IdentityFiles:
    return tls.IdentityFiles(cluster.agent_dir(node) / "identity")


def as_node(cluster: LiveCluster, node: str) -> httpx.Client:
    """HTTP calls to the master over `node`'s own certificate, with no token."""
    assert cluster.ca is not None
    return httpx.Client(base_url=cluster.url, verify=tls.client_context(cluster.ca, identity(cluster, node)))


def bootstrap_token(cluster: LiveCluster, uses: int | None = None) -> str:
    with cluster.client() as admin:
        return admin.create_token("joiners", Role.USER, kind="bootstrap", uses=uses).token


def join(cluster: LiveCluster, name: str, token: str, csr: str | None = None) -> httpx.Response:
    assert cluster.ca is not None
    return httpx.post(
        f"{cluster.url}/v1/nodes/join",
        json={"name": name, "csr": csr or tls.node_request(name, tls.new_key()).decode()},
        headers={"Authorization": f"Bearer {token}"},
        verify=master_context(cluster.ca),
    )


def agents_url(cluster: LiveCluster) -> str:
    return cluster.url.replace("https://", "wss://") + "/v1/agent"


def registration(name: str) -> bytes:
    return encode(Register(node=NodeInfo(name=name, hostname="impostor", capacity=Resources(cpus=1, mem=64))))


def closed_with(ws: ClientConnection, code: int) -> str:
    """The reason the master closes `ws` with, once it is sent a registration; `code` checked."""
    with pytest.raises(ConnectionClosedError) as closed:
        while True:
            ws.recv(timeout=5)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == code
    return closed.value.rcvd.reason


def refusal(
    cluster: LiveCluster,
    node: str | None,
    register_as: str,
    headers: dict[str, str] = {},  # noqa: B006
    code: int = POLICY_CLOSE,
) -> str:
    """Open the agents' WebSocket (as `node`'s certificate, or with none), register as
    `register_as`: the reason the master closes it with (`code`)."""
    assert cluster.ca is not None
    context = tls.client_context(cluster.ca, identity(cluster, node) if node else None)
    with connect(agents_url(cluster), ssl=context, additional_headers=headers) as ws:
        with contextlib.suppress(ConnectionClosed):  # a master that refuses at once may have closed
            ws.send(registration(register_as))
        return closed_with(ws, code)


def test_an_agent_joins_once_and_runs_tasks_over_its_own_certificate(cluster: LiveCluster) -> None:
    files = identity(cluster, "node1")
    assert stat.S_IMODE(files.key.stat().st_mode) == 0o600
    assert tls.describe(files.cert.read_bytes()).subject.startswith("CN=node1,OU=node")
    with cluster.client() as admin:
        job = admin.submit(JobSpec(command="echo hi", count=3))
        assert admin.wait(job, timeout=20).state.value == "complete"
        # Restarted, it keeps its identity: no bootstrap token is spent again.
        serial = tls.describe(files.cert.read_bytes()).serial
        cluster.kill_agent("node1")
        cluster.start_agent("node1")
        cluster.wait_nodes_up(["node1"])
        assert tls.describe(files.cert.read_bytes()).serial == serial
    assert (cluster.root / "node1.log").read_text().count("joined the cluster") == 1


def test_a_certificate_registers_only_its_own_node(cluster: LiveCluster) -> None:
    reason = refusal(cluster, "node2", register_as="node3")
    assert "node2" in reason and "node3" in reason
    assert "refused a registration as node3" in (cluster.root / "master.log").read_text()
    with cluster.client() as admin:
        node3 = next(n for n in admin.nodes() if n.name == "node3")
    assert node3.status is NodeStatus.UP and node3.connected  # untouched


def test_the_cluster_token_opens_nothing_on_a_tls_master(cluster: LiveCluster) -> None:
    reason = refusal(cluster, None, "node3", {"Authorization": f"Bearer {cluster.cluster_token}"})
    assert "certificate is required" in reason
    some_blob = "0" * 64
    response = httpx.get(
        f"{cluster.url}/v1/blobs/{some_blob}",
        headers={"Authorization": f"Bearer {cluster.cluster_token}"},
        verify=master_context(str(cluster.ca)),
    )
    assert response.status_code == 401
    masters = httpx.get(
        f"{cluster.url}/v1/masters",
        headers={"Authorization": f"Bearer {cluster.cluster_token}"},
        verify=master_context(str(cluster.ca)),
    )
    assert masters.status_code == 401
    assert not (cluster.root / "master" / "cluster.token").exists()  # a TLS master has none


def test_a_node_finds_the_masters_over_its_certificate(cluster: LiveCluster) -> None:
    with as_node(cluster, "node3") as node3:
        masters = node3.get("/v1/masters")
    assert masters.status_code == 200 and [m["url"] for m in masters.json()] == [cluster.url]


def test_a_node_fetches_only_the_blobs_sent_to_it(cluster: LiveCluster, tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("for node3 only")
    with cluster.client() as admin:
        blob = admin.upload(secret)
        request = CopyRequest(
            select=Selection(nodes=["node3"]),
            dest=str(tmp_path / "copied"),
            files=[CopyFile(path="secret", blob=blob, size=secret.stat().st_size)],
        )
        ended = [e for e in admin.copy(request) if isinstance(e, Ended)]
    assert [(e.node, e.code) for e in ended] == [("node3", 0)]  # node3 fetched it, over its certificate
    with as_node(cluster, "node2") as node2, as_node(cluster, "node3") as node3:
        refused = node2.get(f"/v1/blobs/{blob}")
        assert refused.status_code == 403 and "node2" in refused.json()["error"]
        assert node2.head(f"/v1/blobs/{blob}").status_code == 403  # not even whether it is there
        assert node3.get(f"/v1/blobs/{blob}").status_code == 403  # the order has ended
        put = node2.put(f"/v1/blobs/{'ab' * 32}", content=b"unasked")
        assert put.status_code == 403 and "asked for no file" in put.json()["error"]


def test_a_moved_task_takes_its_saved_state_along_over_node_certificates(cluster: LiveCluster) -> None:
    with cluster.client() as admin:
        job = admin.submit(JobSpec(command=COUNTER, migrate="checkpoint"))
        task_id = f"{job}.0"
        wait_for(lambda: len(admin.logs(task_id).split()) >= 5, what="some counting")
        first = admin.task(task_id).node
        assert first is not None
        admin.drain(first)
        try:
            moved = wait_for(
                lambda: (t := admin.task(task_id)).attempt == 1 and t.state is TaskState.RUNNING and t,
                timeout=20,
                what="the counter running again",
            )
        finally:
            admin.undrain(first)
        # The first node put its saved state and the next fetched it, each over its own
        # certificate, and each let do only that.
        assert moved.node != first
        before = [int(n) for n in admin.logs(task_id, attempt=0).split()]
        wait_for(lambda: admin.logs(task_id, attempt=1).split(), what="counting again")
        assert int(admin.logs(task_id, attempt=1).split()[0]) == before[-1] + 1
        admin.kill(job)
        admin.wait(job, timeout=15)
    assert "did not upload" not in (cluster.root / "master.log").read_text()


def test_joins_are_refused_past_a_tokens_uses_and_for_a_name_that_has_an_identity(
    cluster: LiveCluster,
) -> None:
    token = bootstrap_token(cluster, uses=1)
    # Without a good token the master does nothing for the caller: 401 before the request is read.
    for anonymous in ("shoal_nothing", "shoal_" + "0" * 43):
        assert join(cluster, "node1", anonymous, csr="not a request").status_code == 401
    taken = join(cluster, "node1", token)
    assert taken.status_code == 409
    assert "node1 already has an identity; `shoal node remove node1` first" in taken.json()["error"]
    bad = join(cluster, "-node", token)
    assert bad.status_code == 422 and bad.json()["fields"][0]["field"] == "name"
    garbled = httpx.post(
        f"{cluster.url}/v1/nodes/join",
        json={"name": "node8", "csr": "not a request"},
        headers={"Authorization": f"Bearer {token}"},
        verify=master_context(str(cluster.ca)),
    )
    assert garbled.status_code == 422 and garbled.json()["fields"][0]["field"] == "csr"
    csr = tls.node_request("node8", tls.new_key()).decode()
    long = join(cluster, "n" * 65, token, csr)  # a node name may be longer; a certificate's may not
    assert long.status_code == 422 and long.json()["fields"][0]["field"] == "name"
    p384 = tls.node_request("node8", ec.generate_private_key(ec.SECP384R1())).decode()
    other_curve = join(cluster, "node8", token, csr=p384)
    assert other_curve.status_code == 422 and "P-256" in other_curve.json()["error"]
    first = join(cluster, "node9", token)  # the refusals above spent no use
    assert first.status_code == 201 and "BEGIN CERTIFICATE" in first.json()["certificate"]
    again = join(cluster, "node10", token)
    assert again.status_code == 401 and "used up" in again.json()["error"]
    removed = cluster.cli("node", "remove", "node9")  # it joined and never registered
    assert removed.returncode == 0 and "node9 removed: its certificate is refused" in removed.stdout


def test_renewal_needs_the_nodes_own_certificate(cluster: LiveCluster) -> None:
    csr = tls.node_request("node3", tls.new_key()).decode()
    with as_node(cluster, "node2") as node2:
        other = node2.post("/v1/nodes/node3/renew", json={"csr": csr})
    assert other.status_code == 403 and "node2's only" in other.json()["error"]
    without = httpx.post(
        f"{cluster.url}/v1/nodes/node3/renew", json={"csr": csr}, verify=master_context(str(cluster.ca))
    )
    assert without.status_code == 401


def test_a_removed_node_is_refused_at_once_and_may_join_again(cluster: LiveCluster) -> None:
    with cluster.client() as admin:
        spec = JobSpec(
            command="exec sleep 60", count=2, max_per_node=1, nodes="node[2-3]", restart={"attempts": 1}
        )
        job = admin.submit(spec)
        wait_for(
            lambda: all(t.state is TaskState.RUNNING for t in admin.job(job).tasks), what="tasks running"
        )
        on_node2 = next(t.id for t in admin.job(job).tasks if t.node == "node2")
    removed = cluster.cli("node", "remove", "node2", "--json")
    assert removed.returncode == 0, removed.stderr
    answer = json.loads(removed.stdout)
    assert answer["identity"] is True and answer["tasks"] == [on_node2]
    at = time.monotonic()
    with as_node(cluster, "node2") as node2:
        wait_for(lambda: node2.get(f"/v1/blobs/{'0' * 64}").status_code == 403, 1.0, "node2 refused")
    assert time.monotonic() - at < 1.0
    assert "removed or expired" in refusal(cluster, "node2", "node2", code=REMOVED_CLOSE)
    with as_node(cluster, "node2") as node2:
        assert node2.get("/v1/masters").status_code == 403
    cluster.agents["node2"].wait(10)  # put out: it stopped its runs and left
    assert "not a member of the cluster" in (cluster.root / "node2.log").read_text()
    with cluster.client() as admin:
        assert "node2" not in {n.name for n in admin.nodes()}  # no longer listed
        assert admin.task(on_node2).history[-1].message == "node2 was removed from the cluster"
    again = cluster.cli("node", "remove", "node2")  # once is enough: there is no node2 now
    assert again.returncode == 2 and "no node node2" in again.stderr
    # It joins again: a new identity, with a new bootstrap token; listed again, it takes
    # back the task that waited for it (one a node, on node[2-3]).
    for path in identity(cluster, "node2").root.iterdir():
        path.unlink()
    del cluster.agents["node2"]
    cluster.start_agent("node2")
    cluster.wait_nodes_up(["node2"])
    with cluster.client() as admin:
        wait_for(lambda: admin.task(on_node2).state is TaskState.RUNNING, what="the task back on node2")
        assert admin.task(on_node2).node == "node2" and admin.task(on_node2).attempt == 1
        admin.kill(job)


def test_a_node_removed_before_it_registers_is_not_registered(cluster: LiveCluster, tmp_path: Path) -> None:
    key = tls.new_key()
    joined = join(cluster, "node12", bootstrap_token(cluster), csr=tls.node_request("node12", key).decode())
    assert joined.status_code == 201
    files = tls.IdentityFiles(tmp_path)
    files.key.write_bytes(tls.key_pem(key))
    files.cert.write_text(joined.json()["certificate"])
    assert cluster.ca is not None
    with connect(agents_url(cluster), ssl=tls.client_context(cluster.ca, files)) as ws:
        with cluster.client() as admin:
            assert admin.remove_node("node12").identity is True  # connected, not registered
        ws.send(registration("node12"))
        assert "removed" in closed_with(ws, REMOVED_CLOSE)
    with cluster.client() as admin:
        assert "node12" not in {n.name for n in admin.nodes()}


@pytest.fixture(scope="module")
def short_lived(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveCluster]:
    # Certificates of about 22 s: renewed after about 14, and the renewed one outlives a
    # restart of the master even on a busy machine.
    days = "0.00025"
    with live_cluster(
        tmp_path_factory.mktemp("renewal"), agents=1, tls=True, master_settings={"node_cert_days": days}
    ) as running:
        yield running


def test_an_agent_renews_its_certificate_while_its_task_runs_on(
    short_lived: LiveCluster, tmp_path: Path
) -> None:
    cluster = short_lived
    files = identity(cluster, "node1")
    first = tls.describe(files.cert.read_bytes())
    pid_file = tmp_path / "pid"
    with cluster.client() as admin:
        job = admin.submit(JobSpec(command=f"echo $$ > {pid_file}; exec sleep 120"))
        wait_for(lambda: pid_file.exists() and pid_file.read_text().strip(), what="the task started")
        pid = int(pid_file.read_text())
        wait_for(lambda: tls.describe(files.cert.read_bytes()).serial != first.serial, 25, "a renewal")
        renewed = tls.describe(files.cert.read_bytes())
        assert renewed.not_after > first.not_after
        with sqlite3.connect(cluster.root / "master" / "shoal.db") as db:
            (doc,) = db.execute("SELECT doc FROM identities WHERE name = 'node1'").fetchone()
        assert set(json.loads(doc)["serials"]) == {first.serial, renewed.serial}
        # The next connection presents the renewed certificate.
        cluster.restart_master()
        cluster.wait_nodes_up(["node1"])
        restarted = (cluster.root / "master.log").read_text().rsplit("DNS for .shoal", 1)[1]
        assert f"agent node1 connects with certificate {renewed.serial}" in restarted
        task = admin.job(job).tasks[0]
        assert task.state is TaskState.RUNNING and task.attempt == 0
    os.kill(pid, 0)  # the same process all along
    assert int(pid_file.read_text()) == pid
