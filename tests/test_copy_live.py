"""`shoal copy` and `--rcopy` through real agents on loopback."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from shoal.client import ApiError
from shoal.model import Role
from shoal.shell.protocol import CopyFile, CopyRequest, Ended, Selection
from shoal.testing.live import LiveCluster, live_cluster


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    with live_cluster(tmp_path_factory.mktemp("copy"), agents=3) as c:
        yield c


def test_push_a_file_to_every_node_keeping_mode_and_mtime(cluster: LiveCluster, tmp_path: Path) -> None:
    source = tmp_path / "tool.sh"
    source.write_bytes(os.urandom(3 * (1 << 20) + 17))  # several chunks, not a round size
    source.chmod(0o751)
    os.utime(source, (1_600_000_000, 1_600_000_000))
    dest = tmp_path / "pushed"
    result = cluster.cli("copy", "-w", "node[1-3]", str(source), f"{dest}/")
    assert result.returncode == 0, result.stderr
    copied = dest / "tool.sh"
    assert copied.read_bytes() == source.read_bytes()
    assert (copied.stat().st_mode & 0o7777, copied.stat().st_mtime) == (0o751, 1_600_000_000)
    renamed = cluster.cli("copy", "-w", "node1", str(source), str(tmp_path / "renamed.sh"))
    assert renamed.returncode == 0 and (tmp_path / "renamed.sh").read_bytes() == source.read_bytes()


def test_push_a_directory_tree(cluster: LiveCluster, tmp_path: Path) -> None:
    tree = tmp_path / "conf"
    (tree / "sub").mkdir(parents=True)
    (tree / "a.txt").write_text("a")
    (tree / "sub" / "b.txt").write_text("b")
    dest = tmp_path / "etc"
    result = cluster.cli("copy", "--json", "-a", str(tree), str(dest))
    assert result.returncode == 0, result.stderr
    assert (dest / "conf" / "a.txt").read_text() == "a"
    assert (dest / "conf" / "sub" / "b.txt").read_text() == "b"
    assert [(r["node"], r["code"]) for r in json.loads(result.stdout)] == [
        ("node1", 0),
        ("node2", 0),
        ("node3", 0),
    ]


def test_pull_a_file_from_each_node(cluster: LiveCluster, tmp_path: Path) -> None:
    # The agents share this machine's disk, so each node's file is the same one.
    shared = tmp_path / "shared.txt"
    shared.write_text("same everywhere\n")
    shared.chmod(0o640)
    into = tmp_path / "pulled"
    result = cluster.cli("copy", "--rcopy", "-w", "node[1-3]", str(shared), str(into))
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in into.iterdir()) == ["node1", "node2", "node3"]
    for pulled in into.iterdir():
        assert pulled.read_text() == "same everywhere\n"
        assert pulled.stat().st_mode & 0o7777 == 0o640


def test_a_missing_file_fails_on_its_node_only(cluster: LiveCluster, tmp_path: Path) -> None:
    result = cluster.cli("copy", "--rcopy", "-w", "node[1-2]", str(tmp_path / "nope"), str(tmp_path / "out"))
    assert result.returncode == 1
    assert "node[1-2]: failed" in result.stderr and "No such file" in result.stderr


def test_corrupt_uploads_are_refused_and_unknown_blobs_not_copied(
    cluster: LiveCluster, tmp_path: Path
) -> None:
    with cluster.client() as admin:
        wrong = hashlib.sha256(b"other").hexdigest()
        response = admin._calls.send("PUT", f"/v1/blobs/{wrong}", content=b"these bytes")
        assert response.status_code == 422 and "sha256" in response.json()["error"]
        assert admin._calls.send("HEAD", f"/v1/blobs/{wrong}").status_code == 404
        request = CopyRequest(
            select=Selection(all=True), dest=str(tmp_path), files=[CopyFile(path="x", blob=wrong, size=5)]
        )
        with pytest.raises(ApiError) as missing:
            list(admin.copy(request))
        assert missing.value.status == 409
        user = admin.create_token("dave", Role.USER).token
    with cluster.client(user) as dave:
        assert dave._calls.send("PUT", f"/v1/blobs/{wrong}", content=b"other").status_code == 403
        with pytest.raises(ApiError) as refused:
            list(dave.copy(request))
        assert refused.value.status == 403


def test_paths_may_not_climb_out_of_the_destination(cluster: LiveCluster, tmp_path: Path) -> None:
    with cluster.client() as admin:
        blob = admin.upload(Path(__file__))
        body = {
            "select": {"all": True},
            "dest": str(tmp_path),
            "files": [{"path": "../escape", "blob": blob, "size": 1}],
        }
        response = admin._calls.send("POST", "/v1/copy", json=body)
    assert response.status_code == 422
    assert response.json()["fields"][0]["field"] == "files.0.path"
    assert not (tmp_path.parent / "escape").exists()


def test_copy_is_audited(cluster: LiveCluster, tmp_path: Path) -> None:
    source = tmp_path / "f"
    source.write_text("x")
    with cluster.client() as admin:
        blob = admin.upload(source)
        request = CopyRequest(
            select=Selection(nodes=["node1"]),
            dest=str(tmp_path / "g"),
            files=[CopyFile(path="f", blob=blob, size=1)],
        )
        ended = [e for e in admin.copy(request) if isinstance(e, Ended)]
        assert [(e.node, e.code) for e in ended] == [("node1", 0)]
        assert (tmp_path / "g").read_text() == "x"  # one file, a new path: copied as that path
        record = admin.audit(limit=1)[0]
    assert record.command == f"copy f -> {tmp_path / 'g'}" and record.results == {"0": "node1"}
