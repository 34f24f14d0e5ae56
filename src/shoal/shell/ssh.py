"""The parallel shell over SSH, for machines with no agent: ClusterShell's Task does the work.

ClusterShell runs ssh with a fanout, connect and command timeouts, and calls back per
line and per node end. Those callbacks become the same events the agents' path streams
(`Output`, `Ended`), so the display, `-b` gathering and exit codes behave alike. An
unreachable host ends with ssh's own 255, as under clush. The task runs in a thread of
its own, so the caller can stop it (Ctrl-C) while reading events.

Connections are kept open between runs (ssh's ControlMaster, for `REUSE_FOR` seconds, as
Ansible does by default): the first run to a host pays the SSH handshake, the next ones
ride the open connection. `reuse=False` turns that off.
"""

from __future__ import annotations

import os
import queue
import shlex
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ClusterShell.Event import EventHandler
from ClusterShell.NodeSet import NodeSet
from ClusterShell.Task import Task, task_self
from ClusterShell.Worker.Worker import StreamWorker

from shoal.shell.protocol import Ended, ExecRequest, Output

DEFAULT_FANOUT = 64  # clush's default: ssh processes at once

_Event = Output | Ended | None  # None: the task is over


REUSE_FOR = 60  # seconds an idle shared connection stays open


@dataclass(frozen=True, slots=True)
class SshOptions:
    options: str = ""  # extra ssh options, as clush -o takes them
    user: str | None = None
    reuse: bool = True

    def command_line(self) -> str:
        """The options ssh gets: the caller's, then connection sharing unless turned off."""
        if not self.reuse:
            return self.options
        sockets = Path(tempfile.gettempdir()) / f"shoal-ssh-{os.getuid()}"
        sockets.mkdir(mode=0o700, exist_ok=True)
        sharing = f"-oControlMaster=auto -oControlPath={sockets}/%C -oControlPersist={REUSE_FOR}"
        return f"{self.options} {sharing}".strip()


class _Relay(EventHandler):  # type: ignore[misc]
    def __init__(self, events: queue.Queue[_Event]) -> None:
        super().__init__()
        self._events = events
        self._began: dict[str, float] = {}

    def ev_pickup(self, worker: StreamWorker, node: str) -> None:
        self._began[node] = _now()

    def ev_read(self, worker: StreamWorker, node: str, sname: str, msg: bytes) -> None:
        stream = "stderr" if sname == worker.SNAME_STDERR else "stdout"
        self._events.put(Output(node=node, stream=stream, data=bytes(msg) + b"\n"))

    def ev_hup(self, worker: StreamWorker, node: str, rc: int) -> None:
        self._events.put(Ended(node=node, code=rc, duration=_now() - self._began.get(node, _now())))

    def ev_close(self, worker: StreamWorker, timedout: bool) -> None:
        if timedout:
            for node in worker.iter_keys_timeout():
                began = self._began.get(node, _now())
                self._events.put(Ended(node=node, failure="command-timeout", duration=_now() - began))


_now = time.monotonic


def run(nodes: list[str], request: ExecRequest, ssh: SshOptions) -> Iterator[Output | Ended]:
    """Run `request` on `nodes` over SSH; events as they come. Closing the iterator early
    (an interrupt while reading it) aborts the task, which kills the ssh processes."""
    if not nodes:
        return
    events: queue.Queue[_Event] = queue.Queue()
    started: queue.Queue[Task] = queue.Queue()
    thread = threading.Thread(target=_run, args=(nodes, request, ssh, events, started), daemon=True)
    thread.start()
    task = started.get()
    try:
        while (event := events.get()) is not None:
            yield event
    finally:
        if thread.is_alive():
            task.abort(kill=True)
            thread.join(timeout=5)


def _run(
    nodes: list[str],
    request: ExecRequest,
    ssh: SshOptions,
    events: queue.Queue[_Event],
    started: queue.Queue[Task],
) -> None:
    """The thread's body: one ClusterShell task, bound to this thread."""
    task = task_self()
    started.put(task)
    try:
        task.set_info("fanout", request.fanout or DEFAULT_FANOUT)
        task.set_info("connect_timeout", request.connect_timeout)
        if options := ssh.command_line():
            task.set_info("ssh_options", options)
        if ssh.user:
            task.set_info("ssh_user", ssh.user)
        command = request.command if isinstance(request.command, str) else shlex.join(request.command)
        relay = _Relay(events)
        task.shell(
            command,
            nodes=NodeSet.fromlist(nodes),
            handler=relay,
            stderr=True,
            timeout=request.command_timeout,
        )
        task.resume()
    finally:
        events.put(None)
