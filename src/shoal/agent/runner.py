"""Running tasks as processes: sandboxes, process groups, exit watching, logs.

Each run gets a sandbox directory holding its `stdout` and `stderr` files, its own cgroups
(cpu quota, memory limit) where the machine allows, and runs as the leader of its own
session (so of its own process group), so a kill reaches everything it started. A small sh
wrapper writes the exit status into the sandbox: an agent restarted while the run went on
can still learn how it ended, though it is no longer the parent.
Exits are watched through pidfds, for children and adopted processes alike.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import psutil

from shoal.agent.cgroups import Cgroups
from shoal.wire import RunSpec

# Runs argv in the working directory given first, then records its status where a restarted
# agent can find it. It first joins the run's cgroups, so everything the command starts is
# inside them, and last writes the exit status with a builtin (no second process; it is read
# only once the wrapper has exited).
_WRAPPER = (
    'for g in $SHOAL_CGROUP_DIRS; do echo $$ > "$g/cgroup.procs"; done; '
    'cd -- "$1" || exit 127; shift; '
    '"$@"; rc=$?; printf %s "$rc" > "$SHOAL_SANDBOX/.exit"; exit $rc'
)
_OUTPUT = os.O_WRONLY | os.O_CREAT | os.O_APPEND
_BASE_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "TZ", "USER", "LOGNAME")

ExitCallback = Callable[[str, int | None], None]


class Runner:
    """Starts, watches and signals the processes of one agent's runs."""

    def __init__(self, sandboxes: Path, on_exit: ExitCallback, cgroups: Cgroups | None) -> None:
        self.sandboxes = sandboxes
        self._on_exit = on_exit
        self.cgroups = cgroups
        self._watched: dict[str, int] = {}  # run id -> pidfd

    def sandbox(self, run_id: str) -> Path:
        return self.sandboxes / run_id

    def checkpoint_dir(self, run_id: str) -> Path:
        """Where a run keeps the state it saves when stopped (checkpoint mode)."""
        return self.sandbox(run_id) / "checkpoint"

    def spawn(self, spec: RunSpec) -> tuple[int, float]:
        """Start `spec`; returns (pid, process start time). Raises OSError if it cannot."""
        if spec.workdir is not None and not os.path.isdir(spec.workdir):
            raise FileNotFoundError(f"working directory {spec.workdir} does not exist on this node")
        box = self.sandbox(spec.run_id)
        box.mkdir(parents=True, exist_ok=True)
        env = {k: os.environ[k] for k in _BASE_ENV if k in os.environ}
        env.update(spec.env)
        env["SHOAL_SANDBOX"] = str(box)
        if spec.checkpoint:
            self.checkpoint_dir(spec.run_id).mkdir(exist_ok=True)
            env["SHOAL_CHECKPOINT_DIR"] = str(self.checkpoint_dir(spec.run_id))
        if self.cgroups is not None:
            env["SHOAL_CGROUP_DIRS"] = " ".join(map(str, self.cgroups.create(spec.run_id, spec.resources)))
        # posix_spawn, not subprocess: a spawn costs a fraction of the CPU, and the child
        # opens its own output files. It leads a session of its own (so a process group).
        pid = os.posix_spawn(
            "/bin/sh",
            ["/bin/sh", "-c", _WRAPPER, "shoal-run", str(spec.workdir or box), *spec.argv],
            env,
            file_actions=[
                (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                (os.POSIX_SPAWN_OPEN, 1, str(box / "stdout"), _OUTPUT, 0o644),
                (os.POSIX_SPAWN_OPEN, 2, str(box / "stderr"), _OUTPUT, 0o644),
            ],
            setsid=True,
        )
        start = start_time(pid) or 0.0
        self.watch(spec.run_id, pid)
        return pid, start

    def adopt(self, run_id: str, pid: int, pid_start: float | None) -> bool:
        """Watch a run left by an earlier agent; False if its process is already gone."""
        if pid_start is None or start_time(pid) != pid_start:
            return False
        self.watch(run_id, pid)
        return True

    def watch(self, run_id: str, pid: int) -> None:
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            self._exited(run_id, pid)
            return
        self._watched[run_id] = fd
        asyncio.get_running_loop().add_reader(fd, self._readable, run_id, pid)

    def _readable(self, run_id: str, pid: int) -> None:
        fd = self._watched.pop(run_id)
        asyncio.get_running_loop().remove_reader(fd)
        os.close(fd)
        self._exited(run_id, pid)

    def _exited(self, run_id: str, pid: int) -> None:
        code = self._reap(run_id, pid)
        if self.cgroups is not None:
            self.cgroups.remove(run_id)
        self._on_exit(run_id, code)

    def _reap(self, run_id: str, pid: int) -> int | None:
        try:
            _, status = os.waitpid(pid, 0)
            return os.waitstatus_to_exitcode(status)
        except ChildProcessError:
            return self.recorded_exit(run_id)  # adopted: not our child

    def recorded_exit(self, run_id: str) -> int | None:
        try:
            return int((self.sandbox(run_id) / ".exit").read_text())
        except (OSError, ValueError):
            return None

    def prune(self, keep: set[str], older_than: float) -> int:
        """Delete the sandboxes of runs not in `keep` untouched since `older_than` (epoch s)."""
        removed = 0
        for box in self.sandboxes.glob("*"):
            try:
                if box.name in keep or box.stat().st_mtime >= older_than:
                    continue
                shutil.rmtree(box)
                removed += 1
            except OSError:
                continue  # gone meanwhile, or busy: the next pass sees it again
        return removed

    def signal(self, pid: int, sig: int) -> None:
        try:
            os.killpg(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def read_log(self, run_id: str, stream: str, offset: int, limit: int) -> bytes:
        """Up to `limit` bytes of a run's output from `offset`; FileNotFoundError if none."""
        with open(self.sandbox(run_id) / stream, "rb") as f:
            f.seek(offset)
            return f.read(limit)

    def close(self) -> None:
        loop = asyncio.get_running_loop()
        for fd in self._watched.values():
            loop.remove_reader(fd)
            os.close(fd)
        self._watched.clear()


def start_time(pid: int) -> float | None:
    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


def alive(pid: int) -> bool:
    """Whether `pid` is a live process (a zombie is not)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False
