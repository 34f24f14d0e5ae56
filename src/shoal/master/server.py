"""The master's I/O shell: the store, the agents' WebSockets, the clock.

`Master.dispatch` is the one door into the ledger: it hands events to `MasterState` and
carries out the commands in the order they come back (persist first, so nothing is
acknowledged or launched before it is stored). Everything runs on one event loop, so the
state machine never sees two callers at once.

One of several masters serves only while `may_act()` (its lease surely holds): dispatch
refuses otherwise (`NotLeading`: nothing done), a write the store refuses makes it `deposed`
(`Deposed`: the outcome may be unknown), and `stand_down()` lets go of everything it holds
open. What does not go through dispatch (audit records and tokens, written to the fenced
store; blobs; the parallel shell's relay and log reads, which only pass frames to and from
agents) is reached only through the API's gate, which lets calls in only while the master
serves, and ends with the links that `stand_down` closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import itertools
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field

from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketDisconnected

from shoal.core.scheduler import Policy
from shoal.errors import ShoalError
from shoal.framework import protocol as fp
from shoal.master.auth import Tokens
from shoal.master.blob_access import BlobAccess
from shoal.master.blobs import BlobStore
from shoal.master.broadcast import Broadcast
from shoal.master.events import (
    AgentGone,
    CloseStream,
    Disconnect,
    Event,
    FromAgent,
    OffersMade,
    Persist,
    Principal,
    Reply,
    Request,
    Send,
    StreamClosed,
    SubscribeFramework,
    Tick,
    ToFramework,
)
from shoal.master.frameworks import FrameworkPolicy
from shoal.master.identities import Identities
from shoal.master.instruments import Instruments
from shoal.master.ledger import Retention
from shoal.master.moves import Rebalancing
from shoal.master.registry import RegistryPolicy
from shoal.master.shell import ShellRelay
from shoal.master.state import MasterState
from shoal.master.store import Deposed, Store
from shoal.masters import POLICY_CLOSE, REMOVED_CLOSE
from shoal.model import TaskRecord, run_id
from shoal.services import Endpoint
from shoal.tls import Peer
from shoal.views import NodeView
from shoal.wire import (
    ExecEnd,
    ExecOutput,
    ExecStarted,
    FileFetched,
    Heartbeat,
    LogChunk,
    LogRequest,
    Register,
    RunReport,
    RunReports,
    decode,
    encode,
)

log = logging.getLogger("shoal.master")
_OUTBOX = 10_000
_LOG_TIMEOUT = 5.0
_SWEEP_EVERY = 60.0  # seconds between sweeps of old blobs
ANY_SERVICE = ""  # what a blocking query on the list of services waits on
_STREAM_BOUND = 10_000  # events a framework may leave unread before its stream is closed
_REPORTS_A_TURN = 1_000  # an agent's reports dispatched in one turn of the loop, at most


def tune_collector() -> None:
    """Fit Python's garbage collector to a ledger of many long-lived records.

    The ledger keeps hundreds of thousands of task records alive; with the default
    thresholds every burst of allocations (a 100,000-task array, a scheduling cycle) sets
    off full rescans of all of them, which doubled the time an array's submission held the
    event loop. What is loaded at start is frozen out of collection, and collections run
    after 20,000 new objects rather than 700. Not many more: a young generation of 100,000
    took up to 77 ms to collect, a pause that at a thousand calls a second queued as many
    calls and, in bench/api_load.py, tripled the p99 of the calls a flood did not slow."""
    gc.freeze()
    gc.set_threshold(20_000, 50, 100)


class Unavailable(ShoalError):
    """What was asked for lives on a node that is not connected now."""


class NotLeading(ShoalError):
    """This master does not lead (any more) and did nothing of the call: it may go to
    another master as it is."""


class _Link:
    """The master's end of one agent's WebSocket, with a bounded outbox."""

    def __init__(self, ws: WebSocket) -> None:
        self.ws = ws
        self.outbox: asyncio.Queue[bytes] = asyncio.Queue(_OUTBOX)
        self.writer = asyncio.create_task(self._write())
        self.closed = False

    def send(self, data: bytes) -> None:
        if self.closed:
            return  # what it misses, its next registration reconciles
        try:
            self.outbox.put_nowait(data)
        except asyncio.QueueFull:
            # A stuck agent: drop it; it re-registers and reconciliation repairs the rest.
            log.warning("outbox full; dropping an agent connection")
            self.close()

    def close(self, reason: str = "") -> None:
        """Close the connection; with a `reason`, as the close that puts the node out of
        the cluster (REMOVED_CLOSE), saying why. Once: a burst of frames to a stuck agent
        must not close it again for each."""
        if self.closed:
            return
        self.closed = True
        self.writer.cancel()
        asyncio.ensure_future(self._close(reason))

    async def _close(self, reason: str) -> None:
        if reason:
            await refuse(self.ws, reason, REMOVED_CLOSE)
            return
        with contextlib.suppress(WebSocketDisconnect, RuntimeError):  # gone already
            await self.ws.close()

    async def _write(self) -> None:
        while True:
            await self.ws.send_bytes(await self.outbox.get())


async def refuse(ws: WebSocket, reason: str, code: int = POLICY_CLOSE) -> None:
    """Close `ws` with `code` (by default a policy violation: this connection is refused),
    saying why in the 123 bytes a close frame has."""
    with contextlib.suppress(WebSocketDisconnect, RuntimeError):  # gone already
        await ws.close(code=code, reason=reason.encode()[:123].decode(errors="ignore"))


@dataclass(slots=True)
class _Parked:
    """The blocking queries waiting on one service: woken together by its next change."""

    changed: asyncio.Event = field(default_factory=asyncio.Event)
    waiting: int = 0


@dataclass(frozen=True, slots=True)
class LogSlice:
    data: bytes
    done: bool


class Master:
    def __init__(
        self,
        store: Store,
        tokens: Tokens,
        blobs: BlobStore,
        policy: Policy,
        heartbeat_timeout: float,
        tick: float,
        framework_policy: FrameworkPolicy | None = None,
        rebalancing: Rebalancing | None = None,
        retention: Retention | None = None,
        registry: RegistryPolicy | None = None,
        masters: Iterable[Endpoint] = (),
        fence_agents: bool = False,
        may_act: Callable[[], bool] = lambda: True,
        identities: Identities | None = None,
    ) -> None:
        snap = store.load()
        self.store = store
        self.blobs = blobs
        self.tokens = tokens
        # Nodes known by their certificates (a master serving TLS); None: by the cluster token.
        self.identities = identities
        self.blob_access = BlobAccess(blobs.keep)
        self.tick = tick
        self.state = MasterState(
            heartbeat_timeout,
            policy=policy,
            snapshot=snap,
            framework_policy=framework_policy,
            rebalancing=rebalancing,
            retention=retention,
            now=time.time(),
            registry=registry,
            masters=masters,
            fence_agents=fence_agents,
        )
        self.instruments = Instruments(self.state)  # what the metrics count (GET /metrics)
        # With several masters: whether this one may still act as leader (its lease), and
        # whether it has stopped for good. A lone master always may.
        self.may_act = may_act
        self.deposed = False
        self.links: dict[str, _Link] = {}
        self._ids = itertools.count(1)
        # (node, request) -> its answer: only the node asked may answer.
        self._log_waiters: dict[tuple[str, int], asyncio.Future[LogChunk]] = {}
        self._batch: list[Event] = []
        self._replies: dict[int, asyncio.Future[Reply]] = {}
        self.shell = ShellRelay(self._send_to, self.blob_access)
        self.streams: dict[int, asyncio.Queue[bytes | None]] = {}
        self.broadcast = Broadcast()  # GET /v1/stream
        self.broadcast.learn(self.state.ledger)
        self._offer_timer: asyncio.TimerHandle | None = None
        # Blocking queries waiting on a service ("": on any), woken only by its changes.
        self._service_changes: dict[str, _Parked] = {}

    # --- the door into the ledger ---------------------------------------------------------

    def dispatch(self, *events: Event) -> dict[int, Reply]:
        if self.deposed or not self.may_act():
            self.deposed = True
            raise NotLeading("this master no longer leads; the call goes to the leader (`shoal masters`)")
        replies: dict[int, Reply] = {}
        for command in self.instruments.handle(*events):  # self.state.handle, counted
            match command:
                case Persist():
                    try:
                        with self.instruments.writing():
                            self.store.apply(command)
                    except Deposed:
                        # The ledger in memory is now ahead of the store: nothing of it may
                        # act again. The shell throws this master away and the next leader
                        # (maybe this process, afresh) rebuilds from the store.
                        self.deposed = True
                        raise
                    self.broadcast.changed(command, self.state.ledger)
                case Send(node=node, frame=frame):
                    if (link := self.links.get(node)) is not None and not link.closed:
                        link.send(encode(frame))
                case Reply():
                    replies[command.request] = command
                case Disconnect(node=node, reason=reason):
                    if (link := self.links.pop(node, None)) is not None:
                        link.close(reason)
                        self.shell.on_gone(node)  # its session's end will not say so: it is unlinked
                case ToFramework(connection=connection, event=event):
                    line = self.state.frameworks.encode(event)
                    self._to_stream(connection, line)
                    if isinstance(event, OffersMade | fp.Rescind):
                        self.broadcast.offered(line)
                case CloseStream(connection=connection):
                    self._to_stream(connection, None)
        if changed := self.state.registry.take_changed():
            self.broadcast.services_changed(changed)
            for name in (*changed, ANY_SERVICE):
                if (parked := self._service_changes.pop(name, None)) is not None:
                    parked.changed.set()
        self.broadcast.wake()
        loop = asyncio.get_running_loop()
        if self.state.wants_cycle:
            loop.call_soon(lambda: self.soon(Tick(time.time())))
        if (due := self.state.offers_due) is not None and self._offer_timer is None:
            self._offer_timer = loop.call_later(max(0.0, due - time.time()), self._offer_tick)
        return replies

    def _offer_tick(self) -> None:
        self._offer_timer = None
        self.soon(Tick(time.time()))

    def soon(self, event: Event) -> None:
        """Dispatch `event` with the others that arrive in this turn of the loop: a burst of
        agent reports or of submissions costs one scheduling cycle and one transaction."""
        self._batch.append(event)
        if len(self._batch) == 1:
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        events, self._batch = self._batch, []
        requests = [e for e in events if isinstance(e, Request) and e.request in self._replies]
        waiters = [self._replies.pop(e.request) for e in requests]
        try:
            replies = self.dispatch(*events)
        except Exception as e:  # every caller of this batch hears of it
            for waiter in waiters:
                waiter.set_exception(e)
            if isinstance(e, Deposed | NotLeading):
                return  # not a bug: the shell stands this master down
            raise
        for waiter, event in zip(waiters, requests, strict=True):
            waiter.set_result(replies[event.request])

    async def request(self, make: Callable[[int, float], Request]) -> object:
        """Dispatch one request event with this turn's others; its answer, or its error."""
        event = make(next(self._ids), time.time())
        waiter: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        self._replies[event.request] = waiter
        self.soon(event)
        reply = await waiter
        if reply.error is not None:
            raise reply.error
        return reply.value

    async def tick_loop(self) -> None:
        swept = time.time()
        while not self.deposed:
            await asyncio.sleep(self.tick)
            now = time.time()
            with contextlib.suppress(Deposed, NotLeading):  # the shell stands this master down
                self.dispatch(Tick(now))
            if now - swept > _SWEEP_EVERY:
                swept = now
                self.blobs.sweep(now)

    def serving(self) -> bool:
        """Whether this master may take calls: it leads (or stands alone) and has not stopped."""
        return not self.deposed and self.may_act()

    def stand_down(self) -> None:
        """Stop for good (another master leads, or this one is stopping): agents and
        frameworks are let go, to find the leader; calls waiting on the ledger fail."""
        self.deposed = True
        if self._offer_timer is not None:
            self._offer_timer.cancel()
        for name, link in self.links.items():
            link.close()
            self.shell.on_gone(name)  # parallel commands under way end, their nodes lost
        self.links.clear()
        for connection in list(self.streams):
            self._to_stream(connection, None)
        self.broadcast.close()
        # Calls still waiting were never dispatched: nothing of them was done.
        gone = NotLeading("this master stopped leading before it took the call; it goes to the leader")
        for waiter in [*self._replies.values(), *self._log_waiters.values()]:
            if not waiter.done():
                waiter.set_exception(gone)
        self._replies.clear()
        for parked in self._service_changes.values():
            parked.changed.set()  # blocking queries wake, find the master deposed, and end

    # --- agents ---------------------------------------------------------------------------

    def _send_to(self, node: str, data: bytes) -> bool:
        if (link := self.links.get(node)) is None:
            return False
        link.send(data)
        return True

    def node_views(self) -> list[NodeView]:
        state = self.state
        placed = Counter(state.ledger.tasks[t].node for t in state.ledger.active)
        return [
            NodeView(**node.model_dump(), allocated=state.ledger.allocated(name), tasks=placed[name])
            for name, node in sorted(state.ledger.nodes.items())
            if node.removed is None  # listed again once it joins again
        ]

    async def agent_session(self, ws: WebSocket, peer: Peer | None = None) -> None:
        """Serve one agent connection; the first frame must be its registration. `peer`:
        the node its certificate names, the only one it may speak for (None: any, as the
        cluster token's holder may)."""
        bound = None if peer is None else peer.name
        await ws.accept()
        try:
            first = decode(await ws.receive_bytes())
        except WebSocketDisconnect:
            return  # gone before it registered (an agent hanging up on a slow master)
        except (ValueError, KeyError, TypeError) as e:
            log.warning("agent connection without a valid registration: %s", e)
            await refuse(ws, f"the first frame is not a registration this master reads: {e}")
            return
        if not isinstance(first, Register):
            await refuse(ws, "the first frame must be a registration")
            return
        name = first.node.name
        if bound is not None and name != bound:
            why = f"the certificate is {bound}'s: it may not register as {name}"
            log.warning("refused a registration as %s: %s", name, why)
            await refuse(ws, why)
            return
        # Admitted when it connected; removed since (while this master waited for its first
        # frame), it would be registered with no identity and no way to be put out again.
        if peer is not None and not self._admits(peer):
            log.warning("refused a registration as %s: it was removed after it connected", name)
            await refuse(ws, f"{name} was removed from the cluster", REMOVED_CLOSE)
            return
        if (old := self.links.pop(name, None)) is not None:
            old.close()
            self.shell.on_gone(name)  # what the old connection was doing, the new one knows nothing of
        link = self.links[name] = _Link(ws)
        if bound is not None:
            first = self.blob_access.vouched(self.state.ledger, name, first, time.time())
        try:
            self.dispatch(FromAgent(name, first, time.time()))
            log.info("agent %s registered", name)
            await self._serve(name, ws, bound is not None)
        except (Deposed, NotLeading):
            link.close()  # the agent redials, and finds the leader
        finally:
            if self.links.get(name) is link:
                del self.links[name]
                with contextlib.suppress(Deposed, NotLeading):
                    self.dispatch(AgentGone(name, time.time()))
                self.shell.on_gone(name)
            link.writer.cancel()

    def _admits(self, peer: Peer) -> bool:
        return self.identities is not None and self.identities.admits(peer, time.time())

    async def _serve(self, name: str, ws: WebSocket, bound: bool) -> None:
        while True:
            try:
                frame = decode(await ws.receive_bytes())
            except (WebSocketDisconnect, WebSocketDisconnected):
                return  # the agent hung up, or this master did (its node down, its outbox stuck)
            except (ValueError, KeyError, TypeError) as e:
                log.warning("agent %s sent a bad frame (%s); closing its connection", name, e)
                with contextlib.suppress(RuntimeError):  # closed already: a newer connection took over
                    await ws.close(code=1003)
                return
            if isinstance(frame, Register) and frame.node.name != name:
                why = f"this connection registered as {name}: it may not register as {frame.node.name}"
                log.warning("agent %s: %s; closing its connection", name, why)
                await refuse(ws, why)
                return
            if bound:  # what a node known by its certificate says of blobs, it must have held
                frame = self.blob_access.vouched(self.state.ledger, name, frame, time.time())
            if isinstance(frame, LogChunk):
                waiter = self._log_waiters.pop((name, frame.request), None)
                if waiter is not None and not waiter.done():
                    waiter.set_result(frame)
            elif isinstance(frame, ExecStarted | ExecOutput | FileFetched | ExecEnd):
                self.shell.on_reply(name, frame)
            elif isinstance(frame, RunReports):
                await self._take_reports(name, frame.reports)
            elif isinstance(frame, Register | Heartbeat):
                self.soon(FromAgent(name, frame, time.time()))

    async def _take_reports(self, name: str, reports: list[RunReport]) -> None:
        """Dispatch an agent's reports a slice a turn of the loop: a frame of a hundred
        thousand would hold the loop for seconds, and every other node's heartbeats with it."""
        for first in range(0, len(reports), _REPORTS_A_TURN):
            part = RunReports(reports=reports[first : first + _REPORTS_A_TURN])
            self.soon(FromAgent(name, part, time.time()))
            if first + _REPORTS_A_TURN < len(reports):
                await asyncio.sleep(0)

    # --- frameworks -----------------------------------------------------------------------

    async def subscribe(self, principal: Principal, body: fp.Subscribe) -> AsyncIterator[bytes]:
        """Subscribe a framework; its event stream, one JSON line an event (raises if refused)."""
        connection = next(self._ids)
        queue: asyncio.Queue[bytes | None] = asyncio.Queue()
        self.streams[connection] = queue
        try:
            await self.request(lambda req, now: SubscribeFramework(req, principal, body, connection, now))
        except BaseException:
            del self.streams[connection]
            raise
        return self._framework_events(connection, queue)

    async def _framework_events(
        self, connection: int, queue: asyncio.Queue[bytes | None]
    ) -> AsyncIterator[bytes]:
        heartbeat = fp.Heartbeat().model_dump_json().encode() + b"\n"
        interval = self.state.frameworks.policy.heartbeat
        try:
            while True:
                try:
                    line = await asyncio.wait_for(queue.get(), interval)
                except TimeoutError:
                    yield heartbeat
                    continue
                if line is None:
                    return
                yield line
        finally:
            self.streams.pop(connection, None)
            self.soon(StreamClosed(connection, time.time()))

    def _to_stream(self, connection: int, line: bytes | None) -> None:
        queue = self.streams.get(connection)
        if queue is None:
            return
        if line is not None and queue.qsize() >= _STREAM_BOUND:
            # A framework that does not read: close its stream; it re-subscribes, and what it
            # has not acknowledged is delivered again.
            log.warning("framework stream %d is not read; closing it", connection)
            while not queue.empty():
                queue.get_nowait()
            line = None
        queue.put_nowait(line)
        if line is None:
            self.streams.pop(connection, None)

    # --- the registry -------------------------------------------------------------------------

    async def service_changed(self, service: str, index: int, wait: float) -> None:
        """Return once `service` ("": any service) has changed past `index`, or after `wait`
        seconds. An index above the registry's (a client that knew a master before a
        restart) is answered at once."""
        if self.deposed:
            raise NotLeading("this master no longer leads; ask the leader")
        registry = self.state.registry
        current = registry.index if service == ANY_SERVICE else registry.index_of(service)
        if current > index or index > registry.index:
            return
        parked = self._service_changes.setdefault(service, _Parked())
        parked.waiting += 1
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(parked.changed.wait(), wait)
        finally:
            parked.waiting -= 1
            if not parked.waiting and self._service_changes.get(service) is parked:
                del self._service_changes[service]  # no entry outlives its last waiter
        if self.deposed:
            raise NotLeading("this master stopped leading; ask the leader")

    # --- logs -----------------------------------------------------------------------------

    async def read_log(self, task: TaskRecord, attempt: int, stream: str, offset: int) -> LogSlice:
        """Bytes of one attempt's output from `offset`, fetched from its node's agent."""
        node, done = _where(task, attempt)
        link = self.links.get(node or "")
        if link is None:
            if node is None:
                return LogSlice(b"", done)
            raise Unavailable(f"node {node} holds this output and is not connected; try again when it is up")
        request = next(self._ids)
        waiter: asyncio.Future[LogChunk] = asyncio.get_running_loop().create_future()
        key = (node or "", request)
        self._log_waiters[key] = waiter
        link.send(
            encode(LogRequest(request=request, run_id=run_id(task.id, attempt), stream=stream, offset=offset))
        )
        try:
            chunk = await asyncio.wait_for(waiter, _LOG_TIMEOUT)
        except TimeoutError:
            raise Unavailable(f"node {node} did not answer for the output in time; try again") from None
        finally:
            self._log_waiters.pop(key, None)
        if chunk.error:
            raise Unavailable(chunk.error)
        return LogSlice(chunk.data, done)

    async def follow_log(self, task_id: str, attempt: int, stream: str, offset: int) -> AsyncIterator[bytes]:
        """Output as it is written, until the attempt has ended and everything is read."""
        delay = 0.02
        while not self.deposed:  # a deposed master's ledger is stale: the reader asks the leader
            task = self.state.ledger.tasks[task_id]
            try:
                piece = await self.read_log(task, attempt, stream, offset)
            except Unavailable:
                if _where(task, attempt)[1]:
                    return
                piece = LogSlice(b"", False)
            if piece.data:
                offset += len(piece.data)
                delay = 0.02
                yield piece.data
                continue
            if piece.done:
                return
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.5)


def _where(task: TaskRecord, attempt: int) -> tuple[str | None, bool]:
    """The node of one attempt of `task`, and whether that attempt has ended.

    `done` is judged before the output is read, so an empty read after it means all of it.
    """
    if attempt == task.attempt:
        return task.node, task.state.terminal
    for past in task.history:
        if past.attempt == attempt:
            return past.node, True
    return None, True
