"""Secrets on disk are the owner's alone from their first byte: a token or client file is
mode 0600 whatever the umask, and a file that was wider before never shows the new secret,
not even to a reader who opened it earlier."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from shoal.cli.daemons import _token_file
from shoal.clientfile import ClientConfig, save_client_config
from shoal.files import write_secret

OLD = "not a secret\n"


@pytest.fixture(params=[0o000, 0o022, 0o077], ids=["umask000", "umask022", "umask077"])
def umask(request: pytest.FixtureRequest) -> Iterator[int]:
    before = os.umask(request.param)
    yield request.param
    os.umask(before)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _client_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[[], tuple[Path, str]]:
    path = tmp_path / "conf" / "client.toml"
    monkeypatch.setenv("SHOAL_CONFIG", str(path))

    def write() -> tuple[Path, str]:
        return save_client_config(ClientConfig(url="http://m:1", token="shoal_t0ken")), "shoal_t0ken"

    return write


def _plain_secret(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[[], tuple[Path, str]]:
    path = tmp_path / "conf" / "secret"

    def write() -> tuple[Path, str]:
        write_secret(path, "shoal_s3cret\n")
        return path, "shoal_s3cret"

    return write


WRITERS = {"client file": _client_file, "write_secret": _plain_secret}


@pytest.mark.parametrize("writer", WRITERS.values(), ids=WRITERS.keys())
def test_a_new_secret_file_is_0600(tmp_path: Path, monkeypatch, umask: int, writer) -> None:
    (tmp_path / "conf").mkdir()
    path, secret = writer(tmp_path, monkeypatch)()
    assert _mode(path) == 0o600
    assert secret in path.read_text()
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no temporary left behind


@pytest.mark.parametrize("writer", WRITERS.values(), ids=WRITERS.keys())
def test_a_wider_file_is_replaced_never_widened_to_the_secret(
    tmp_path: Path, monkeypatch, umask: int, writer
) -> None:
    write = writer(tmp_path, monkeypatch)
    (tmp_path / "conf").mkdir()
    path = tmp_path / "conf" / ("client.toml" if writer is _client_file else "secret")
    path.write_text(OLD)
    path.chmod(0o644)
    with path.open() as earlier_reader:
        written, secret = write()
        assert written == path
        assert _mode(path) == 0o600
        assert secret in path.read_text()
        assert earlier_reader.read() == OLD  # the 0644 file never held the secret
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]


def test_dev_token_files_are_0600_from_the_start(tmp_path: Path, umask: int) -> None:
    path = tmp_path / "admin.token"
    token = _token_file(path)
    assert token.startswith("shoal_") and path.read_text() == token + "\n"
    assert _mode(path) == 0o600
    assert _token_file(path) == token  # kept, not remade
    assert [p.name for p in tmp_path.iterdir()] == ["admin.token"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "secret"
    path.write_text(OLD)

    def broken(*_: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", broken)
    with pytest.raises(OSError, match="disk full"):
        write_secret(path, "shoal_s3cret\n")
    assert path.read_text() == OLD
    assert [p.name for p in tmp_path.iterdir()] == ["secret"]
