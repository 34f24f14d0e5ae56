"""TLS by default: a master serves HTTPS with the cluster's own authority, clients trust
that authority alone and say plainly when a master does not pass, a certificate reissued
in place is served without a restart, and the master knows a node by its certificate."""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from websockets.sync.client import connect

from shoal import tls
from shoal.calls import AsyncCalls
from shoal.client import Client
from shoal.config import MasterSettings
from shoal.master import serving
from shoal.masters import Masters
from shoal.testing.live import LiveCluster, free_port, live_cluster
from shoal.trust import UntrustedMaster


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveCluster]:
    with live_cluster(tmp_path_factory.mktemp("tls"), agents=1, tls=True) as running:
        yield running


@pytest.fixture(scope="module")
def other_ca(tmp_path_factory: pytest.TempPathFactory) -> Path:
    files = tls.TlsFiles(tmp_path_factory.mktemp("other"))
    tls.init_master_files(files, tls.master_names([]))
    return files.ca_cert


def test_a_client_that_trusts_the_cluster_ca_is_served(cluster: LiveCluster) -> None:
    assert cluster.url.startswith("https://")
    with cluster.client() as client:
        assert client.whoami().name == "admin"
        assert [m.url for m in client.masters()] == [cluster.url]  # what followers name, with https


def test_an_agent_joins_with_a_bootstrap_token_and_runs_a_task(cluster: LiveCluster) -> None:
    assert (cluster.agent_dir("node1") / "identity" / "node.pem").exists()  # its certificate
    ran = cluster.cli("run", "--", "echo", "over TLS")
    assert (ran.returncode, ran.stdout) == (0, "over TLS\n"), ran.stderr


def test_plain_http_to_a_tls_master_is_refused_and_said_so(cluster: LiveCluster) -> None:
    plain = cluster.url.replace("https://", "http://")
    logged = (cluster.root / "master.log").read_text()
    with pytest.raises(httpx.RemoteProtocolError):
        httpx.get(f"{plain}/v1/whoami")
    with (
        Client(plain, cluster.admin_token) as client,
        pytest.raises(UntrustedMaster, match="hung up on plain HTTP"),
    ):
        client.submit({"name": "x", "tasks": [{"command": ["true"]}]})
    assert (cluster.root / "master.log").read_text() == logged  # nothing alarming, per attempt


def test_a_client_with_another_ca_is_refused_plainly(cluster: LiveCluster, other_ca: Path) -> None:
    with Client(cluster.url, cluster.admin_token, ca=other_ca) as client:
        with pytest.raises(UntrustedMaster, match=f"the cluster CA in {other_ca} did not issue"):
            client.whoami()

    async def whoami_async() -> None:  # as drivers and agents call
        calls = AsyncCalls(Masters(cluster.url), cluster.admin_token, 5.0, 5.0, other_ca)
        try:
            await calls.send("GET", "/v1/whoami")
        finally:
            await calls.aclose()

    with pytest.raises(UntrustedMaster, match="did not issue"):
        asyncio.run(whoami_async())
    done = subprocess.run(
        [sys.executable, "-m", "shoal", "nodes"],
        env=cluster.cli_env() | {"SHOAL_CA": str(other_ca)},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 3
    assert "did not issue" in done.stderr and str(other_ca) in " ".join(done.stderr.split())
    assert "Traceback" not in done.stderr
    unset = cluster.cli_env()
    del unset["SHOAL_CA"]
    done = subprocess.run(
        [sys.executable, "-m", "shoal", "nodes"], env=unset, capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 3 and "set `ca` in the client file" in " ".join(done.stderr.split())


def _serial(cluster: LiveCluster) -> str:
    context = tls.client_context(str(cluster.ca))
    with (
        socket.create_connection(("127.0.0.1", cluster.port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname="127.0.0.1") as conn,
    ):
        return str(conn.getpeercert()["serialNumber"])


def _whoami(conn: ssl.SSLSocket, token: str) -> bytes:
    """One call on an open connection; its status line."""
    conn.sendall(f"GET /v1/whoami HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\r\n".encode())
    answer = b""
    while b"\r\n\r\n" not in answer:
        answer += conn.recv(65536)
    head, _, body = answer.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")
    )
    while len(body) < length:
        body += conn.recv(65536)
    return head.split(b"\r\n")[0]


def test_a_certificate_reissued_in_place_is_served_without_a_restart(cluster: LiveCluster) -> None:
    before = _serial(cluster)
    context = tls.client_context(str(cluster.ca))
    with (
        socket.create_connection(("127.0.0.1", cluster.port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname="127.0.0.1") as open_conn,
    ):
        assert _whoami(open_conn, cluster.admin_token) == b"HTTP/1.1 200 OK"
        authority = tls.Authority.load(cluster.tls_files)
        tls.write_master_files(cluster.tls_files, authority, tls.master_names([]))
        deadline = time.monotonic() + 5
        while (after := _serial(cluster)) == before and time.monotonic() < deadline:
            time.sleep(0.1)
        assert after != before
        assert after == tls.describe(cluster.tls_files.cert.read_bytes()).serial
        assert open_conn.getpeercert()["serialNumber"] == before
        assert _whoami(open_conn, cluster.admin_token) == b"HTTP/1.1 200 OK"  # kept open
    with cluster.client() as client:
        assert client.whoami().name == "admin"
    assert cluster.master is not None and cluster.master.poll() is None  # never restarted


def test_a_master_without_its_certificate_refuses_to_start(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "shoal", "master", "--state-dir", str(tmp_path), "--port", str(free_port())],
        capture_output=True,
        text=True,
        timeout=30,
    )
    said = " ".join(done.stderr.split())
    assert done.returncode == 1
    assert f"shoal tls init --dir {tmp_path / 'tls'}" in said and "--insecure" in said


def test_tls_init_twice_keeps_the_authority(tmp_path: Path) -> None:
    def init(*flags: str) -> dict[str, Any]:
        done = subprocess.run(
            [sys.executable, "-m", "shoal", "tls", "init", "--dir", str(tmp_path), "--json", *flags],
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        )
        assert "PRIVATE KEY" not in done.stdout
        return json.loads(done.stdout)  # type: ignore[no-any-return]

    first = init("--name", "m1.example", "--address", "10.0.0.5")
    authority = (tmp_path / "ca.pem").read_bytes()
    assert (first["authority"], first["certificate"]) == ("made", "made")
    assert {"m1.example", "10.0.0.5", "127.0.0.1", "localhost"} <= set(first["names"])
    second = init()
    assert (second["authority"], second["certificate"]) == ("kept", "kept")
    assert (tmp_path / "ca.pem").read_bytes() == authority and second["serial"] == first["serial"]
    shown = subprocess.run(
        [sys.executable, "-m", "shoal", "tls", "show", "--dir", str(tmp_path), "--json"],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    listing = json.loads(shown.stdout)
    assert listing["master"]["serial"] == first["serial"] and listing["ca_key"] is True
    assert "PRIVATE KEY" not in shown.stdout


# --- the peer of a connection, in process ---------------------------------------------------


async def _peer_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Answers with `peer_of_scope`, over HTTP and over a WebSocket."""
    if scope["type"] == "lifespan":
        await receive()
        await send({"type": "lifespan.startup.complete"})
        await receive()
        await send({"type": "lifespan.shutdown.complete"})
        return
    peer = serving.peer_of_scope(scope)
    body = json.dumps(asdict(peer) if peer else None)
    if scope["type"] == "websocket":
        await receive()
        await send({"type": "websocket.accept"})
        await send({"type": "websocket.send", "text": body})
        await send({"type": "websocket.close"})
        return
    await send(
        {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]}
    )
    await send({"type": "http.response.body", "body": body.encode()})


@pytest.fixture
def peer_server(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[MasterSettings, tls.Authority]]:
    monkeypatch.setattr(serving, "RELOAD_EVERY", 0.05)
    settings = MasterSettings(state_dir=tmp_path, host="127.0.0.1", port=free_port())
    tls.init_master_files(settings.tls_files(), tls.master_names([]))
    server = serving.MasterServer(_peer_app, settings)
    thread = threading.Thread(target=asyncio.run, args=(server.serve(),))
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not server.server.started and time.monotonic() < deadline:
            time.sleep(0.02)
        yield settings, tls.Authority.load(settings.tls_files())
    finally:
        server.stop()
        thread.join(10)


def _node_identity(authority: tls.Authority, root: Path, name: str) -> tls.IdentityFiles:
    key = tls.new_key()
    signed = tls.sign_node(authority, tls.node_request("whatever-it-asks", key), name)
    identity = tls.IdentityFiles(root)
    root.mkdir()
    identity.key.write_bytes(tls.key_pem(key))
    identity.cert.write_bytes(signed.pem)
    return identity


def test_peer_of_scope_is_the_node_a_connection_is_certified_for(
    peer_server: tuple[MasterSettings, tls.Authority], tmp_path: Path
) -> None:
    settings, authority = peer_server
    ca = settings.tls_files().ca_cert
    identity = _node_identity(authority, tmp_path / "identity", "node7")
    serial = tls.describe(identity.cert.read_bytes()).serial
    url = f"https://127.0.0.1:{settings.port}"
    with httpx.Client(verify=tls.client_context(ca, identity)) as node:
        assert node.get(f"{url}/").json() == {"name": "node7", "unit": tls.NODE_UNIT, "serial": serial}
    with httpx.Client(verify=tls.client_context(ca)) as anyone:
        assert anyone.get(f"{url}/").json() is None
    wss = f"wss://127.0.0.1:{settings.port}/v1/agent"
    with connect(wss, ssl=tls.client_context(ca, identity)) as ws:
        assert json.loads(ws.recv(timeout=5))["name"] == "node7"
    with connect(wss, ssl=tls.client_context(ca)) as ws:
        assert json.loads(ws.recv(timeout=5)) is None
    deadline = time.monotonic() + 5
    while serving._peers and time.monotonic() < deadline:  # noqa: SLF001 - none left behind
        time.sleep(0.05)
    assert serving._peers == {}  # noqa: SLF001


def test_a_new_pair_the_authority_did_not_issue_is_logged_and_the_old_one_served(
    peer_server: tuple[MasterSettings, tls.Authority], other_ca: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings, _ = peer_server
    files = settings.tls_files()
    served = tls.describe(files.cert.read_bytes()).serial
    stranger = tls.TlsFiles(other_ca.parent)
    files.cert.write_bytes(stranger.cert.read_bytes())
    files.key.write_bytes(stranger.key.read_bytes())
    deadline = time.monotonic() + 5
    while "kept the master's certificate it had" not in caplog.text and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "the cluster CA did not issue it" in caplog.text
    with httpx.Client(verify=tls.client_context(files.ca_cert)) as client:
        assert client.get(f"https://127.0.0.1:{settings.port}/").status_code == 200
    context = tls.client_context(files.ca_cert)
    with (
        socket.create_connection(("127.0.0.1", settings.port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname="127.0.0.1") as conn,
    ):
        assert conn.getpeercert()["serialNumber"] == served


def test_a_node_certificate_is_made_for_a_short_name_and_a_p256_key_only() -> None:
    authority = tls.create_authority()
    with pytest.raises(tls.BadRequestForCertificate, match="made out to"):
        tls.sign_node(authority, tls.node_request("node1", tls.new_key()), "n" * 65)
    p384 = tls.node_request("node1", ec.generate_private_key(ec.SECP384R1()))
    with pytest.raises(tls.BadRequestForCertificate, match="P-256"):
        tls.sign_node(authority, p384, "node1")


def test_a_connection_without_a_certificate_clears_a_peer_left_at_its_address() -> None:
    class Plain(asyncio.BaseTransport):
        def get_extra_info(self, name: str, default: Any = None) -> Any:
            return default

    address = ("127.0.0.1", 40_000)
    serving._peers[address] = tls.Peer("node7", tls.NODE_UNIT, "01")  # noqa: SLF001
    serving._note_peer(address, Plain())  # noqa: SLF001
    assert serving.peer_of_scope({"client": list(address)}) is None
