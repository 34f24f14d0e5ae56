"""The agent's side of the parallel shell: run a command now, stream what it prints.

These are not tasks: no sandbox, no cgroup, nothing saved to the table. A command runs in
the agent's environment plus `SHOAL_NODE` (the node's name), in the agent's working
directory (`shoal agent` starts from its home directory, as an SSH login would), as
the leader of its own session with its output on pipes, which the event loop reads as they
fill; its end is reported once it has exited and both pipes are closed, so no output is
left behind. Output is flow-controlled: past `WINDOW` bytes the reader has not taken yet,
the agent stops reading the pipes (the command then blocks writing) until the master says
the reader caught up. If the master's connection drops, the commands it asked for are
stopped: no one is left to hear their answer.

With the agent's `shell_user` set, commands run as that user instead (setpriv, as tasks do),
from its home directory with its HOME, USER, LOGNAME and a login's PATH, and only a few of
the agent's variables (its environment may hold the cluster token). `allow_root` does not bind them:
only admins may run them, and every run is audited, as clush over SSH as root would be.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass, field

from shoal.agent.runner import BASE_ENV
from shoal.agent.users import UserRefused, Users, lookup
from shoal.wire import ExecEnd, ExecOutput, ExecStart, ExecStarted

_READ = 65536
WINDOW = 4 << 20  # bytes of output sent and not yet taken by the reader before reading pauses
_KILL_AFTER = 1.0  # seconds between SIGTERM and SIGKILL when a command is cancelled

Send = Callable[[ExecStarted | ExecOutput | ExecEnd], None]


@dataclass(slots=True)
class _Command:
    exec_id: int
    pid: int
    pipes: dict[int, str] = field(default_factory=dict)  # open fd -> stream name
    code: int | None = None
    timed_out: bool = False
    timers: list[asyncio.TimerHandle] = field(default_factory=list)
    unacked: int = 0  # output bytes the master has not yet passed on to the reader
    paused: bool = False


# Run as the shell user: from its home (or / if it has none here), as after a login.
_FROM_HOME = 'cd -- "$HOME" 2>/dev/null || cd /; exec "$@"'


class ShellRunner:
    def __init__(self, send: Send, node: str, users: Users, user: str | None) -> None:
        self._send = send
        self._node = node
        self._env = {**os.environ, "SHOAL_NODE": node}
        self._users = users
        self._user = user  # the shell user (None: the agent's own)
        self._running: dict[int, _Command] = {}

    def _command_line(self, argv: list[str]) -> tuple[list[str], dict[str, str]]:
        """What to spawn for `argv`, and its environment: as the shell user, when there is one."""
        if self._user is None:
            return argv, self._env
        who = lookup(self._user)
        self._users.may_become(who)
        if not who.switches:
            return argv, self._env
        env = {k: os.environ[k] for k in BASE_ENV if k in os.environ} | who.env() | {"SHOAL_NODE": self._node}
        return [*self._users.become(who), "/bin/sh", "-c", _FROM_HOME, "shoal-exec", *argv], env

    def start(self, frame: ExecStart) -> None:
        if frame.exec_id in self._running:
            return  # a repeated request: the first one is already running
        try:
            argv, env = self._command_line(frame.argv)
        except UserRefused as e:
            self._send(ExecEnd(exec_id=frame.exec_id, code=126, error=f"cannot run as {self._user}: {e}"))
            return
        out, out_w = os.pipe()
        err, err_w = os.pipe()
        streams = [
            (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
            (os.POSIX_SPAWN_DUP2, out_w, 1),
            (os.POSIX_SPAWN_DUP2, err_w, 2),
        ]
        try:
            # posix_spawn, not Popen: a third of the CPU an agent spends per command.
            pid = os.posix_spawnp(argv[0], argv, env, file_actions=streams, setsid=True)
        except OSError as e:
            os.close(out)
            os.close(err)
            self._send(ExecEnd(exec_id=frame.exec_id, code=127, error=f"cannot run {frame.argv[0]}: {e}"))
            return
        finally:
            os.close(out_w)
            os.close(err_w)
        loop = asyncio.get_running_loop()
        command = self._running[frame.exec_id] = _Command(frame.exec_id, pid, {out: "stdout", err: "stderr"})
        for fd in command.pipes:
            os.set_blocking(fd, False)
            loop.add_reader(fd, self._read, command, fd)
        pidfd = os.pidfd_open(pid)
        loop.add_reader(pidfd, self._exited, command, pidfd)
        if frame.timeout is not None:
            command.timers.append(loop.call_later(frame.timeout, self._time_out, command))
        # A command that ends sooner needs no separate word that it started: its end says so.
        command.timers.append(
            loop.call_later(frame.ack_after, self._send, ExecStarted(exec_id=frame.exec_id))
        )

    def cancel(self, exec_id: int) -> None:
        if (command := self._running.get(exec_id)) is None:
            return
        _kill(command, signal.SIGTERM)
        loop = asyncio.get_running_loop()
        command.timers.append(loop.call_later(_KILL_AFTER, _kill, command, signal.SIGKILL))

    def acknowledge(self, exec_id: int, consumed: int) -> None:
        """The reader took `consumed` more bytes: read on if the window has room again."""
        if (command := self._running.get(exec_id)) is None:
            return
        command.unacked = max(0, command.unacked - consumed)
        if command.paused and command.unacked < WINDOW:
            command.paused = False
            loop = asyncio.get_running_loop()
            for fd in command.pipes:
                loop.add_reader(fd, self._read, command, fd)

    def cancel_all(self) -> None:
        for exec_id in list(self._running):
            self.cancel(exec_id)

    def _time_out(self, command: _Command) -> None:
        command.timed_out = True
        _kill(command, signal.SIGKILL)

    def _read(self, command: _Command, fd: int) -> None:
        try:
            data = os.read(fd, _READ)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data:
            self._send(ExecOutput(exec_id=command.exec_id, stream=command.pipes[fd], data=data))  # type: ignore[arg-type]
            command.unacked += len(data)
            if command.unacked >= WINDOW and not command.paused:
                # A slow reader: stop reading, and the command blocks on its full pipe.
                command.paused = True
                for pipe in command.pipes:
                    asyncio.get_running_loop().remove_reader(pipe)
            return
        asyncio.get_running_loop().remove_reader(fd)
        del command.pipes[fd]
        os.close(fd)
        self._end_if_done(command)

    def _exited(self, command: _Command, pidfd: int) -> None:
        asyncio.get_running_loop().remove_reader(pidfd)
        os.close(pidfd)
        _, status = os.waitpid(command.pid, 0)
        code = os.waitstatus_to_exitcode(status)
        command.code = code if code >= 0 else 128 - code  # a shell's convention for signals
        self._end_if_done(command)

    def _end_if_done(self, command: _Command) -> None:
        if command.code is None or command.pipes:
            return
        for timer in command.timers:
            timer.cancel()
        del self._running[command.exec_id]
        self._send(ExecEnd(exec_id=command.exec_id, code=command.code, timed_out=command.timed_out))


def _kill(command: _Command, sig: int) -> None:
    if command.code is None:
        try:
            os.killpg(command.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
