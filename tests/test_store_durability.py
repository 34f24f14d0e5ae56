"""An acknowledged change is on disk before the master answers: the store syncs every
commit (synchronous=FULL in WAL mode) unless told not to (`fsync = false`)."""

from __future__ import annotations

from pathlib import Path

import pytest

from shoal.config import MasterSettings
from shoal.master.opening import open_master
from shoal.master.store.sqlite import SqliteStore

FULL, NORMAL = 2, 1


def _pragma(store: SqliteStore, name: str) -> object:
    return store._db.execute(f"PRAGMA {name}").fetchone()[0]


@pytest.mark.parametrize(("fsync", "synchronous"), [(True, FULL), (False, NORMAL)])
def test_the_store_syncs_every_commit_when_told_to(tmp_path: Path, fsync: bool, synchronous: int) -> None:
    store = SqliteStore(tmp_path / "shoal.db", fsync=fsync)
    try:
        assert _pragma(store, "journal_mode") == "wal"
        assert _pragma(store, "synchronous") == synchronous
    finally:
        store.close()


def test_the_store_syncs_by_default(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "shoal.db")
    try:
        assert _pragma(store, "synchronous") == FULL
    finally:
        store.close()


@pytest.mark.parametrize(("env", "synchronous"), [(None, FULL), ("false", NORMAL), ("true", FULL)])
def test_the_master_passes_its_fsync_setting_to_the_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, env: str | None, synchronous: int
) -> None:
    if env is None:
        monkeypatch.delenv("SHOAL_FSYNC", raising=False)
    else:
        monkeypatch.setenv("SHOAL_FSYNC", env)
    master = open_master(MasterSettings(state_dir=tmp_path))
    assert isinstance(master.store, SqliteStore)
    try:
        assert _pragma(master.store, "synchronous") == synchronous
    finally:
        master.store.close()
