"""The parallel shell over SSH, for machines with no agent: ClusterShell's Task does the work.

ClusterShell runs ssh with a fanout, connect and command timeouts, and calls back per
line and per node end. Those callbacks become the same events the agents' path streams
(`Output`, `Ended`), so the display, `-b` gathering and exit codes behave alike. An
unreachable host ends with ssh's own 255, as under clush. The task runs in a thread of
its own, so the caller can stop it (Ctrl-C) while reading events.
"""

from __future__ import annotations

import queue
import shlex
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

from ClusterShell.Event import EventHandler
from ClusterShell.NodeSet import NodeSet
from ClusterShell.Task import Task, task_self
from ClusterShell.Worker.Worker import StreamWorker

from shoal.shell.protocol import Ended, ExecRequest, Output

DEFAULT_FANOUT = 64  # clush's default: ssh processes at once

_Event = Output | Ended | None  # None: the task is over


@dataclass(frozen=True, slots=True)
class SshOptions:
    options: str = ""  # extra ssh options, as clush -o takes them
    user: str | None = None


def ssh_task(ssh: SshOptions, fanout: int) -> Task:
    """This thread's ClusterShell task, set to reach nodes as `ssh` says."""
    task: Task = task_self()
    task.set_info("fanout", fanout)
    if ssh.options:
        task.set_info("ssh_options", ssh.options)
    if ssh.user:
        task.set_info("ssh_user", ssh.user)
    return task


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
    task = ssh_task(ssh, request.fanout or DEFAULT_FANOUT)
    started.put(task)
    try:
        task.set_info("connect_timeout", request.connect_timeout)
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
