"""Running tasks as processes: sandboxes, process groups, exit watching, logs.

Each run gets a sandbox directory holding its `stdout` and `stderr` files, its own cgroups
(cpu quota, memory limit) where the machine allows, and runs as the leader of its own
session (so of its own process group), so a kill reaches everything it started. A small sh
wrapper records the exit status where the agent keeps them: an agent restarted while the
run went on can still learn how it ended, though it is no longer the parent.
Exits are watched through pidfds, for children and adopted processes alike. What a run used
in all is read when it ends, before its cgroups go (`usage.spent`).

A run goes as the user its task names (`users.py`): its sandbox, logs included, belongs to
that user alone (mode 0700), and its command runs with the user's uid, gid and groups. The
wrapper stays the agent's (root): a process of the user could neither join the run's
root-owned cgroups nor be trusted with its exit record, and joining them from the wrapper
before the command starts leaves nothing it forks outside them, which moving the process in
from the agent after the start would not. So only the command changes user, by setpriv.
The wrapper sees none of the run's variables and does not enter its working directory: the
command's first process, already the user's, does both (`Users.shell`).
The agent never writes into a sandbox once it is the user's: what it puts there (output
files, restored state) is in place before the sandbox is handed over.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import resource
import shutil
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil

from shoal.agent.cgroups import Cgroups
from shoal.agent.usage import Spent, spent
from shoal.agent.users import ROOT_ENV, Identity, Users
from shoal.wire import RunSpec

# Runs argv in the run's sandbox given second, then records its status in the file given
# first, where a restarted agent can find it. It first joins the run's cgroups, as many
# directories as the third argument says, so everything the command starts is inside them,
# and last writes the exit status with a builtin (no second process; it is read only once
# the wrapper has exited). Root's: all it is given are the agent's arguments and `ROOT_ENV`,
# and the only directory it enters is the sandbox, the agent's own making (the user is then
# in it although a directory on the way may be closed to them).
_WRAPPER = (
    'record=$1; cd -- "$2" || exit 127; n=$3; shift 3; '
    'while [ "$n" -gt 0 ]; do echo $$ > "$1/cgroup.procs"; n=$((n - 1)); shift; done; '
    '"$@"; rc=$?; printf %s "$rc" > "$record"; exit $rc'
)
# The command's first process, as its user, enters the job's working directory, if it has
# one (else it stays in the sandbox): with the user's rights alone, so none the user could
# not reach is ever theirs.
_ENTER = (
    '[ -z "$1" ] || cd -- "$1" || { echo "shoal: cannot enter the working directory $1" >&2; exit 127; }; '
    'shift; exec "$@"'
)
# O_NOFOLLOW: never through a link a run's user may have left in its sandbox.
_OUTPUT = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC
_PRIVATE = 0o600
BASE_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "TZ", "USER", "LOGNAME")

ExitCallback = Callable[[str, int | None, Spent], None]
log = logging.getLogger("shoal.agent")


def run_env(spec: RunSpec, who: Identity, box: Path) -> dict[str, str]:
    """What a run's processes (and its command checks) see, and no process of root's: a few
    of the agent's variables, the user's own when it runs as another, the job's, and where
    its sandbox is."""
    env = {k: os.environ[k] for k in BASE_ENV if k in os.environ}
    if who.switches:
        env.update(who.env())
    env.update(spec.env)
    env["SHOAL_SANDBOX"] = str(box)
    if spec.checkpoint:
        env["SHOAL_CHECKPOINT_DIR"] = str(box / "checkpoint")
    return env


class Runner:
    """Starts, watches and signals the processes of one agent's runs, whose sandboxes and
    exit records it keeps under `directory`."""

    def __init__(self, directory: Path, on_exit: ExitCallback, cgroups: Cgroups | None, users: Users) -> None:
        self.sandboxes = directory / "sandboxes"
        self.exits = directory / "exits"  # the agent's alone: the users' processes cannot touch them
        for path, mode in ((self.sandboxes, 0o711), (self.exits, 0o700)):
            path.mkdir(parents=True, exist_ok=True)
            path.chmod(mode)  # the users reach their own sandboxes, and list none
        if os.geteuid() == 0 and (closed := _closed_to_others(self.sandboxes)) is not None:
            log.warning(
                "%s lets no other user through: tasks run as other users cannot reach their "
                "sandboxes by SHOAL_SANDBOX (give the agent a --state-dir such as /var/lib/shoal)",
                closed,
            )
        self._on_exit = on_exit
        self.cgroups = cgroups
        self.users = users
        self._watched: dict[str, int] = {}  # run id -> pidfd

    def sandbox(self, run_id: str) -> Path:
        return self.sandboxes / run_id

    def checkpoint_dir(self, run_id: str) -> Path:
        """Where a run keeps the state it saves when stopped (checkpoint mode)."""
        return self.sandbox(run_id) / "checkpoint"

    def prepare(self, spec: RunSpec) -> Identity:
        """Check that `spec` may run here, and make its sandbox, the agent's until `spawn`
        hands it over; who it runs as. Raises OSError (UserRefused: the user may not)."""
        who = self.users.of_run(spec.user)
        self.sandbox(spec.run_id).mkdir(mode=0o700, exist_ok=True)
        if spec.checkpoint:
            state = self.checkpoint_dir(spec.run_id)
            state.mkdir(mode=0o700, exist_ok=True)
            os.lchown(state, who.uid, who.gid)  # its saved state is unpacked by its user
        return who

    def spawn(self, spec: RunSpec) -> tuple[int, float]:
        """Start `spec`; returns (pid, process start time). Raises OSError if it cannot."""
        if (where := _nul_in(spec)) is not None:
            # posix_spawn would raise ValueError, which no caller expects: the agent would stop.
            raise OSError(f"{where} holds a NUL byte, which no process can be given")
        # Looked at here only for a run as the agent's own user: for another, the agent would
        # see what the user may not, and the user's process says it (exit 127) instead.
        if not self.users.of_run(spec.user).switches and spec.workdir and not os.path.isdir(spec.workdir):
            raise FileNotFoundError(f"working directory {spec.workdir} does not exist on this node")
        who = self.prepare(spec)
        box = self.sandbox(spec.run_id)
        cgroups = [] if self.cgroups is None else self.cgroups.create(spec.run_id, spec.resources)
        groups = [str(group) for group in cgroups]
        workdir = spec.workdir or ""
        command = self.users.shell(who, run_env(spec, who, box), _ENTER, "shoal-cd", workdir, *spec.argv)
        # The output files are opened here, before the sandbox is the user's, so no link the
        # user could put in their place is ever followed.
        with _output(box / "stdout") as out, _output(box / "stderr") as err:
            if who.switches:
                _hand_over(box, who)
            record = str(self.exits / spec.run_id)
            # posix_spawn, not subprocess: a spawn costs a fraction of the CPU. It leads a
            # session of its own (so a process group).
            pid = os.posix_spawn(
                "/bin/sh",
                [
                    "/bin/sh",
                    "-c",
                    _WRAPPER,
                    "shoal-run",
                    record,
                    str(box),
                    str(len(groups)),
                    *groups,
                    *command,
                ],
                ROOT_ENV,
                file_actions=[
                    (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                    (os.POSIX_SPAWN_DUP2, out, 1),
                    (os.POSIX_SPAWN_DUP2, err, 2),
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
        code, rusage = self._reap(run_id, pid)
        used = spent(self.cgroups, run_id, rusage)
        if self.cgroups is not None:
            self.cgroups.remove(run_id)
        self._on_exit(run_id, code, used)

    def _reap(self, run_id: str, pid: int) -> tuple[int | None, resource.struct_rusage | None]:
        """The run's exit code, and what its process and those it waited for used (None when
        it was adopted: then it is not the agent's child, and only its exit record tells)."""
        try:
            _, status, rusage = os.wait4(pid, 0)
            return os.waitstatus_to_exitcode(status), rusage
        except ChildProcessError:
            return self.recorded_exit(run_id), None

    def recorded_exit(self, run_id: str) -> int | None:
        try:
            return int((self.exits / run_id).read_text())
        except (OSError, ValueError):
            return None

    def prune(self, keep: set[str], older_than: float) -> int:
        """Delete the sandboxes (and exit records) of runs not in `keep` untouched since
        `older_than` (epoch s)."""
        removed = 0
        for box in self.sandboxes.glob("*"):
            try:
                if box.name in keep or box.lstat().st_mtime >= older_than:
                    continue
                shutil.rmtree(box)  # follows no link a run left in it
                (self.exits / box.name).unlink(missing_ok=True)
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
        """Up to `limit` bytes of a run's output from `offset`; FileNotFoundError if none.

        The sandbox is its user's: the agent reads only a plain file of that user there, not
        a link, a pipe or someone else's file put in the log's place."""
        box = self.sandbox(run_id)
        path = box / stream
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as e:
            raise FileNotFoundError(f"{path}: {e.strerror}") from None
        with open(fd, "rb") as f:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode) or info.st_uid != box.lstat().st_uid:
                raise FileNotFoundError(f"{path} is not a log of its run")
            f.seek(offset)
            return f.read(limit)

    def close(self) -> None:
        loop = asyncio.get_running_loop()
        for fd in self._watched.values():
            loop.remove_reader(fd)
            os.close(fd)
        self._watched.clear()


def _nul_in(spec: RunSpec) -> str | None:
    """What of `spec` holds a NUL byte (None: nothing): arguments, variables and paths are
    C strings, which end at the first."""
    if any("\0" in arg for arg in spec.argv):
        return "its command"
    if any("\0" in name or "\0" in value for name, value in spec.env.items()):
        return "its environment"
    if spec.workdir is not None and "\0" in spec.workdir:
        return "its working directory"
    if any(check.command is not None and "\0" in check.command for check in spec.checks.values()):
        return "a check's command"
    return None


def _closed_to_others(path: Path) -> Path | None:
    """The first directory on the way to `path` that other users may not pass through."""
    for directory in reversed(path.resolve().parents):
        if not directory.stat().st_mode & stat.S_IXOTH:
            return directory
    return None


@contextlib.contextmanager
def _output(path: Path) -> Iterator[int]:
    """An output file of a run, open for appending, made private to its owner."""
    fd = os.open(path, _OUTPUT, _PRIVATE)
    try:
        yield fd
    finally:
        os.close(fd)


def _hand_over(box: Path, who: Identity) -> None:
    """Give a sandbox, and what the agent made in it, to the user its run runs as; the
    sandbox itself last, so the user can change nothing in it before it is all theirs. Not
    what is in its state directory: the user's tar unpacked it, as the user, and root
    changes the owner of nothing the user shaped (a hard link there may be anyone's file)."""
    for name in ("stdout", "stderr", "checkpoint"):
        with contextlib.suppress(FileNotFoundError):  # a run that saves no state has no checkpoint
            os.chown(box / name, who.uid, who.gid, follow_symlinks=False)
    os.chown(box, who.uid, who.gid, follow_symlinks=False)


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
