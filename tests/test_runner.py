"""The agent's process runner on this machine: sandboxes, exits, and their clean-up."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import time
from pathlib import Path

import pytest

from shoal.agent.runner import Runner
from shoal.agent.users import Users
from shoal.checks import HealthCheck
from shoal.model import Resources
from shoal.wire import RunSpec

AGENTS_OWN = Users(None, allow_root=True)  # runs as the agent's own user, root or not


def spec(run: str, *argv: str) -> RunSpec:
    return RunSpec(
        run_id=run, task_id=run.rpartition(".")[0], attempt=0, argv=list(argv), resources=Resources()
    )


def test_a_run_writes_its_output_and_its_exit_into_its_sandbox(tmp_path: Path) -> None:
    async def main() -> tuple[str, int | None]:
        done: asyncio.Future[tuple[str, int | None]] = asyncio.get_running_loop().create_future()
        runner = Runner(tmp_path, lambda run, code, spent: done.set_result((run, code)), None, AGENTS_OWN)
        runner.spawn(spec("1.0.0", "sh", "-c", "echo hello; echo oops >&2; exit 3"))
        return await asyncio.wait_for(done, 10)

    assert asyncio.run(main()) == ("1.0.0", 3)
    box = tmp_path / "sandboxes" / "1.0.0"
    assert (box / "stdout").read_text() == "hello\n" and (box / "stderr").read_text() == "oops\n"
    assert (tmp_path / "exits" / "1.0.0").read_text() == "3"
    assert box.stat().st_mode & 0o777 == 0o700 and (box / "stdout").stat().st_mode & 0o777 == 0o600


def test_prune_removes_old_sandboxes_of_finished_runs_only(tmp_path: Path) -> None:
    runner = Runner(tmp_path, lambda run, code, spent: None, None, AGENTS_OWN)
    old = time.time() - 3600
    for name in ("old.0.0", "live.0.0", "new.0.0"):
        runner.sandbox(name).mkdir()
        (runner.sandbox(name) / "stdout").write_text("x")
        (runner.exits / name).write_text("0")
    for name in ("old.0.0", "live.0.0"):
        os.utime(runner.sandbox(name), (old, old))
    assert runner.prune(keep={"live.0.0"}, older_than=time.time() - 60) == 1
    assert sorted(p.name for p in runner.sandboxes.iterdir()) == ["live.0.0", "new.0.0"]
    assert sorted(p.name for p in runner.exits.iterdir()) == ["live.0.0", "new.0.0"]


def test_a_run_starts_in_its_working_directory_and_a_missing_one_is_refused(tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()

    async def main() -> int | None:
        done: asyncio.Future[int | None] = asyncio.get_running_loop().create_future()
        runner = Runner(tmp_path / "agent", lambda run, code, spent: done.set_result(code), None, AGENTS_OWN)
        with pytest.raises(FileNotFoundError, match="does not exist on this node"):
            runner.spawn(dataclasses.replace(spec("1.0.0", "pwd"), workdir=str(tmp_path / "gone")))
        runner.spawn(dataclasses.replace(spec("2.0.0", "pwd"), workdir=str(work)))
        return await asyncio.wait_for(done, 10)

    assert asyncio.run(main()) == 0
    assert (tmp_path / "agent" / "sandboxes" / "2.0.0" / "stdout").read_text() == f"{work}\n"
    assert not (tmp_path / "agent" / "sandboxes" / "1.0.0").exists()


def test_a_run_holding_a_nul_byte_is_refused_before_anything_is_made(tmp_path: Path) -> None:
    """No process can be given a NUL byte: the run is refused with an OSError, the error an
    agent turns into a failed start, not the ValueError posix_spawn would raise."""
    runner = Runner(tmp_path, lambda run, code, spent: None, None, AGENTS_OWN)
    refused = {
        "its command": spec("1.0.0", "echo", "a\0b"),
        "its environment": dataclasses.replace(spec("2.0.0", "true"), env={"X": "a\0b"}),
        "its working directory": dataclasses.replace(spec("3.0.0", "true"), workdir="/tmp/\0"),
        "a check's command": dataclasses.replace(
            spec("4.0.0", "true"), checks={"c": HealthCheck(command="true\0", interval=60)}
        ),
    }
    for where, run in refused.items():
        with pytest.raises(OSError, match=f"^{where} holds a NUL byte"):
            runner.spawn(run)
        assert not runner.sandbox(run.run_id).exists()
