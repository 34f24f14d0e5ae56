"""The master's side of the parallel shell: commands out over the agents' open links,
answers back as one stream of events.

No handshake per node: the agents' WebSockets are already open, so a command reaches 128
nodes as 128 frames. A node must confirm the start within the connect timeout, and end
within the command timeout (the agent enforces it; the master keeps a backstop in case the
agent itself went quiet). Nodes that fail in any way end with a reason and never hold up
the others. Output is passed on as the caller reads it, and acknowledged to the agents
only then, so a slow reader slows the commands instead of filling the master's memory. If
the caller goes away, whatever still runs is cancelled.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import time
from collections import defaultdict, deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from shoal.master.blob_access import BlobAccess
from shoal.shell.gather import outcome
from shoal.shell.groups import Chosen
from shoal.shell.protocol import (
    AuditRecord,
    CopyRequest,
    Ended,
    ExecRequest,
    Fetched,
    FetchRequest,
    Output,
    Targets,
    pack,
)
from shoal.wire import (
    CopyFiles,
    ExecAck,
    ExecCancel,
    ExecEnd,
    ExecOutput,
    ExecStart,
    ExecStarted,
    FetchFile,
    FileFetched,
    encode,
)

_ACK_AFTER = 0.1  # seconds an agent waits before confirming a start: quick commands need no confirmation
_BACKSTOP = 5.0  # seconds past the command timeout before the master stops waiting on an agent

Reply = ExecStarted | ExecOutput | FileFetched | ExecEnd
SendTo = Callable[[str, bytes], bool]  # node, frame -> whether a link took it
Answer = Output | Fetched | Ended


@dataclass(frozen=True, slots=True)
class Order:
    """What every node is asked to do (the frame, made for an id) and how long it may take."""

    frame: Callable[[int], ExecStart | CopyFiles | FetchFile]
    connect_timeout: float
    command_timeout: float | None
    fanout: int | None

    @classmethod
    def of(cls, request: ExecRequest | CopyRequest | FetchRequest) -> Order:
        def frame(exec_id: int) -> ExecStart | CopyFiles | FetchFile:
            match request:
                case ExecRequest():
                    return ExecStart(
                        exec_id=exec_id,
                        argv=request.argv,
                        timeout=request.command_timeout,
                        ack_after=min(_ACK_AFTER, request.connect_timeout / 4),
                    )
                case CopyRequest():
                    return CopyFiles(
                        exec_id=exec_id, dest=request.dest, files=request.files, into=request.into
                    )
                case FetchRequest():
                    return FetchFile(exec_id=exec_id, path=request.path)

        return cls(frame, request.connect_timeout, request.command_timeout, request.fanout)


@dataclass(slots=True)
class _Running:
    began: float
    deadline: float
    started: bool = False


class ShellRelay:
    def __init__(self, send: SendTo, access: BlobAccess) -> None:
        self._send = send
        self._access = access  # told which nodes hold which orders, for the blobs they move
        self._ids = itertools.count(1)
        self._inboxes: dict[int, asyncio.Queue[tuple[str, Reply | None]]] = {}

    def on_reply(self, node: str, frame: Reply) -> None:
        if (inbox := self._inboxes.get(frame.exec_id)) is not None:
            inbox.put_nowait((node, frame))

    def on_gone(self, node: str) -> None:
        """An agent's link dropped: its commands will not answer."""
        for inbox in self._inboxes.values():
            inbox.put_nowait((node, None))

    async def stream(
        self, order: Order, chosen: Chosen, record: AuditRecord, keep: Callable[[AuditRecord], None]
    ) -> AsyncIterator[bytes]:
        """The packed events of carrying out `order` on `chosen`; `record` is completed with
        every node's result and handed to `keep` when the stream ends, however it ends."""
        ended: list[Ended] = []
        try:
            yield pack(Targets(nodes=chosen.targets, down=list(chosen.down)))
            skipped = [Ended(node=node, failure="down", message=why) for node, why in chosen.down.items()]
            ended.extend(skipped)
            if skipped:
                yield b"".join(map(pack, skipped))
            async for batch in self.run(order, chosen.targets):
                ended.extend(e for e in batch if isinstance(e, Ended))
                yield b"".join(map(pack, batch))
        finally:
            record.ended_at = time.time()
            record.results = outcome(chosen.targets, ended)
            keep(record)

    async def run(self, order: Order, nodes: list[str]) -> AsyncIterator[list[Answer]]:
        """Carry out `order` on `nodes`; yields the events of each wake-up as one batch."""
        exec_id = next(self._ids)
        inbox: asyncio.Queue[tuple[str, Reply | None]] = asyncio.Queue()
        self._inboxes[exec_id] = inbox
        clock = asyncio.get_running_loop().time
        frame = order.frame(exec_id)
        start = encode(frame)
        waiting = deque(nodes)
        running: dict[str, _Running] = {}
        sent: list[str] = []
        fanout = order.fanout or len(nodes)
        try:
            while waiting or running:
                batch: list[Answer] = []
                while waiting and len(running) < fanout:
                    node = waiting.popleft()
                    self._access.ordered(node, frame)  # before the frame: the agent may call at once
                    sent.append(node)
                    if self._send(node, start):
                        running[node] = _Running(clock(), clock() + order.connect_timeout)
                    else:
                        batch.append(Ended(node=node, failure="lost", message="its agent is not connected"))
                if running:
                    wait = min(r.deadline for r in running.values()) - clock()
                    timeout = max(wait, 0.0) if wait < math.inf else None
                    try:
                        first = await asyncio.wait_for(inbox.get(), timeout)
                    except TimeoutError:
                        batch.extend(self._expire(exec_id, running, clock()))
                    else:
                        for node, reply in _drain(first, inbox):
                            batch.extend(self._answer(order, running, node, reply, clock()))
                if batch:
                    yield batch
                    # The reader took the batch: let each node's agent read on.
                    for node, consumed in _output_bytes(batch).items():
                        self._send(node, encode(ExecAck(exec_id=exec_id, consumed=consumed)))
        finally:
            del self._inboxes[exec_id]
            for node in sent:
                self._access.finished(node, frame)
            cancel = encode(ExecCancel(exec_id=exec_id))
            for node in running:
                self._send(node, cancel)

    def _answer(
        self, order: Order, running: dict[str, _Running], node: str, reply: Reply | None, now: float
    ) -> list[Answer]:
        if (run := running.get(node)) is None:
            return []  # late news of a node already given up on
        match reply:
            case None:
                del running[node]
                gone = "its agent disconnected"
                return [Ended(node=node, duration=now - run.began, failure="lost", message=gone)]
            case ExecStarted():
                run.started = True
                limit = order.command_timeout
                run.deadline = math.inf if limit is None else now + limit + _BACKSTOP
                return []
            case ExecOutput(stream=stream, data=data):
                return [Output(node=node, stream=stream, data=data)]
            case FileFetched():
                return [Fetched(node=node, **reply.model_dump(exclude={"kind", "exec_id"}))]
            case ExecEnd():
                del running[node]
                failure = "command-timeout" if reply.timed_out else "error" if reply.error else ""
                return [
                    Ended(
                        node=node,
                        code=None if reply.timed_out else reply.code,
                        duration=now - run.began,
                        failure=failure,
                        message=reply.error,
                    )
                ]
        return []

    def _expire(self, exec_id: int, running: dict[str, _Running], now: float) -> list[Ended]:
        ended = []
        cancel = encode(ExecCancel(exec_id=exec_id))
        for node, run in list(running.items()):
            if run.deadline <= now:
                del running[node]
                self._send(node, cancel)
                failure = "command-timeout" if run.started else "connect-timeout"
                ended.append(Ended(node=node, duration=now - run.began, failure=failure))
        return ended


def _output_bytes(batch: list[Answer]) -> dict[str, int]:
    sizes: dict[str, int] = defaultdict(int)
    for event in batch:
        if isinstance(event, Output):
            sizes[event.node] += len(event.data)
    return sizes


def _drain(
    first: tuple[str, Reply | None], inbox: asyncio.Queue[tuple[str, Reply | None]]
) -> list[tuple[str, Reply | None]]:
    items = [first]
    while not inbox.empty():
        items.append(inbox.get_nowait())
    return items
