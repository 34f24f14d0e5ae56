"""An agent's credentials without a master: which it needs for the masters it is given,
when it renews its certificate, a new pair put in place whole, even if cut short, and what
makes it exit: a setting to fix leaves its runs alone, only a removal stops them."""

from __future__ import annotations

import asyncio
import os
import threading
from pathlib import Path

import pytest
from websockets.sync.server import ServerConnection, serve

from shoal import tls
from shoal.agent import server as agent_server
from shoal.agent.identity import RENEW_AT, Credentials, NotAdmitted, NotAMember, _install, _pending, _settle
from shoal.config import AgentSettings
from shoal.errors import SpecError
from shoal.masters import POLICY_CLOSE, REMOVED_CLOSE, Masters


def credentials(tmp_path: Path, master: str, **settings: object) -> Credentials:
    agent = AgentSettings(master=master, state_dir=tmp_path, **settings)  # type: ignore[arg-type]
    return Credentials(agent, Masters(agent.master), "node1")


def test_each_kind_of_master_wants_its_own_credential(tmp_path: Path) -> None:
    with pytest.raises(SpecError) as no_ca:
        credentials(tmp_path, "https://m1:8470")
    assert no_ca.value.field == "ca" and "--ca" in no_ca.value.reason
    with pytest.raises(SpecError) as no_token:
        credentials(tmp_path, "http://m1:8470")
    assert no_token.value.field == "cluster_token"
    with pytest.raises(SpecError) as mixed:
        credentials(tmp_path, "https://m1:8470,http://m2:8470", ca=tmp_path / "ca.pem")
    assert mixed.value.field == "master"
    plain = credentials(tmp_path, "http://m1:8470", cluster_token="secret")
    assert plain.headers == {"Authorization": "Bearer secret"} and plain.context is None


def test_over_tls_the_cluster_token_is_never_sent(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_bytes(tls.create_authority().pem())
    over_tls = credentials(tmp_path, "https://m1:8470", ca=ca, cluster_token="secret")
    assert over_tls.headers == {}
    calls = over_tls.calls()
    request = calls._http.build_request("GET", "https://m1:8470/v1/masters")
    asyncio.run(calls.aclose())
    assert "authorization" not in request.headers


def test_a_certificate_is_renewed_two_thirds_of_the_way_through_its_life(tmp_path: Path) -> None:
    authority = tls.create_authority()
    key = tls.new_key()
    cert = tls.sign_node(authority, tls.node_request("node1", key), "node1", days=3)
    held = credentials(tmp_path, "https://m1:8470", ca=tmp_path / "ca.pem")
    _install(tls.IdentityFiles(tmp_path / "identity"), tls.key_pem(key).decode(), cert.pem.decode())
    written = (tmp_path / "identity" / "node.pem").stat().st_mtime
    assert held._renew_at() == pytest.approx(written + RENEW_AT * (cert.not_after - written))


def test_a_new_pair_cut_short_is_finished_or_dropped(tmp_path: Path) -> None:
    files = tls.IdentityFiles(tmp_path)
    _install(files, "key 1", "cert 1")
    assert (files.key.read_text(), files.cert.read_text()) == ("key 1", "cert 1")
    assert os.stat(files.key).st_mode & 0o777 == 0o600
    # Stopped after the key was renamed, before the certificate was: the swap is finished.
    _pending(files.cert).write_text("cert 2")
    files.key.write_text("key 2")
    _settle(files)
    assert (files.key.read_text(), files.cert.read_text()) == ("key 2", "cert 2")
    # Stopped while writing the pair: the half written is dropped, the old pair kept.
    _pending(files.key).write_text("key 3")
    _settle(files)
    assert (files.key.read_text(), files.cert.read_text()) == ("key 2", "cert 2")
    assert not _pending(files.key).exists()


def test_what_the_agent_cannot_fix_by_trying_again_is_said_and_not_a_removal(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    authority = tls.create_authority()
    ca.write_bytes(authority.pem())
    with pytest.raises(SpecError) as long:
        agent = AgentSettings(master="https://m1:8470", state_dir=tmp_path, ca=ca)
        Credentials(agent, Masters(agent.master), "n" * 65)
    assert long.value.field == "name" and "64 characters" in long.value.reason
    unjoined = credentials(tmp_path, "https://m1:8470", ca=ca)
    with pytest.raises(NotAdmitted, match="--bootstrap-token"):
        asyncio.run(unjoined.ready())
    key = tls.new_key()
    other = tls.sign_node(authority, tls.node_request("node2", key), "node2")
    _install(tls.IdentityFiles(tmp_path / "identity"), tls.key_pem(key).decode(), other.pem.decode())
    with pytest.raises(NotAdmitted, match="'node2''s, and this node is named 'node1'"):
        asyncio.run(credentials(tmp_path, "https://m1:8470", ca=ca).ready())


class ClosingMaster:
    """A master's agent endpoint that accepts each WebSocket, reads the registration and
    closes it with `code`."""

    def __init__(self, code: int) -> None:
        self._code = code
        self._server = serve(self._close, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self._server.socket.getsockname()[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def _close(self, ws: ServerConnection) -> None:
        ws.recv(timeout=5)
        ws.close(self._code, "why")

    def close(self) -> None:
        self._server.shutdown()


@pytest.mark.parametrize(
    ("code", "error", "stops_runs"), [(REMOVED_CLOSE, NotAMember, True), (POLICY_CLOSE, NotAdmitted, False)]
)
def test_only_a_removal_stops_the_runs(
    code: int, error: type[Exception], stops_runs: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stopped: list[Path] = []
    monkeypatch.setattr(agent_server, "stop_runs", lambda state_dir: stopped.append(state_dir) or 0)
    master = ClosingMaster(code)
    try:
        settings = AgentSettings(
            master=master.url, state_dir=tmp_path, cluster_token="secret", limits=False, cpus=1, mem=64
        )
        with pytest.raises(error, match="why"):
            asyncio.run(agent_server.Agent(settings).run())
    finally:
        master.close()
    assert stopped == ([tmp_path] if stops_runs else [])
