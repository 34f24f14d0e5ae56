"""The agent's I/O shell: the WebSocket to the master, processes, the table on disk, a clock.

It turns I/O into events for `AgentState` and the commands that come back into I/O. It
dials the master and keeps redialling with a capped backoff; tasks keep running while the
master is away (unless the master asked the agent to fence itself, and a master may be
alive and not hearing it: see agent/state.py), and a restarted agent re-adopts them from
its saved table. Given several masters, it dials one after another until the leader takes
it: a follower closes the connection at once (code 4307) naming the leader, which is
dialled straight away; a master that stops answering heartbeats is hung up on. Dials that
show no master can be counting this node's silence (refused, or a follower with no leader)
are told to the state machine (`Unled`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import random
import signal
import tarfile
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any

import websockets
from pydantic import TypeAdapter

from shoal.agent.cgroups import Cgroups
from shoal.agent.discovery import discover, facing
from shoal.agent.files import FileMover
from shoal.agent.health import HealthChecks
from shoal.agent.identity import Credentials, NotAdmitted, NotAMember
from shoal.agent.runner import Runner, alive, start_time
from shoal.agent.shell import ShellRunner
from shoal.agent.state import (
    AgentState,
    Command,
    Connected,
    Event,
    Exited,
    FromMaster,
    Health,
    Recovered,
    RunEntry,
    SaveTable,
    SendToMaster,
    Signal,
    Spawn,
    Spawned,
    SpawnFailed,
    Tick,
    Unled,
)
from shoal.agent.usage import Meter, Spent
from shoal.agent.users import Users
from shoal.checks import CheckResult
from shoal.config import AgentSettings
from shoal.errors import ShoalError
from shoal.masters import (
    MAX_HOPS,
    NOT_LEADER_CLOSE,
    POLICY_CLOSE,
    REMOVED_CLOSE,
    TRY_AGAIN_CLOSE,
    Masters,
    Unreachable,
    check_url,
)
from shoal.model import Usage
from shoal.wire import (
    CopyFiles,
    ExecAck,
    ExecCancel,
    ExecStart,
    FetchFile,
    Heartbeat,
    LogChunk,
    LogRequest,
    Register,
    RunReports,
    RunSpec,
    decode,
    encode,
)

if TYPE_CHECKING:
    from shoal.agent.metrics import MetricsListener

log = logging.getLogger("shoal.agent")
_TABLE = TypeAdapter(list[RunEntry])
_MAX_FRAME = 16 * 1024 * 1024
_OUTBOX = 10_000
_PRUNE_EVERY = 60.0  # seconds between sweeps of old sandboxes
_OPEN_TIMEOUT = 1.5  # seconds a dial may take: a frozen master's port still accepts
_QUIET_FOR = 5.0  # seconds a master that went quiet is not dialled when a follower names it
_REDIAL_CAP = 3.0  # seconds between redials of the master, at most


class _Leaderless(ShoalError):
    """A follower closed the connection naming no leader: an election is under way."""


class Agent:
    def __init__(self, settings: AgentSettings) -> None:
        self.settings = settings
        self.masters = Masters(settings.master)
        # Master URL -> since when it has shown no leader can be counting this node's silence.
        self._absent: dict[str, float] = {}
        self._hung_up = False  # whether this side ended the session, the master gone quiet
        self._quiet: dict[str, float] = {}  # master URL -> when it last went quiet on this agent
        self.state_dir = settings.state_dir
        self.state_dir.mkdir(parents=True, exist_ok=True)
        info = discover(
            settings.name,
            self.state_dir,
            settings.labels,
            settings.cpus,
            settings.mem,
            settings.port_range,
            settings.resources,
            settings.address or facing(self.masters.current),
        )
        self.state = AgentState(info, self._load_table())
        cgroups = Cgroups.detect(info.name) if settings.limits else None
        users = Users(settings.task_user, settings.allow_root)
        self.runner = Runner(self.state_dir, self._on_exit, cgroups, users)
        self.shell = ShellRunner(
            lambda frame: self._send(encode(frame)), info.name, users, settings.shell_user
        )
        self.credentials = Credentials(settings, self.masters, info.name)
        self.files = FileMover(lambda frame: self._send(encode(frame)), self.credentials.calls)
        self.health = HealthChecks(
            self.runner.sandbox,
            lambda run, check, status, output: self.dispatch(
                Health(run, check, CheckResult(status, output, time.time()), time.time())
            ),
            users,
        )
        self.usage: Usage | None = None  # the last measurement of the node and its runs
        self._outbox: asyncio.Queue[bytes] | None = None
        self._unsaved: tuple[RunEntry, ...] | None = None
        self._unsent: list[Register | Heartbeat | RunReports] = []
        self._background: set[asyncio.Future[None]] = set()
        self._flush_pending = False

    @property
    def _table_path(self) -> Path:
        return self.state_dir / "runs.json"

    def _load_table(self) -> list[RunEntry]:
        try:
            return _TABLE.validate_json(self._table_path.read_bytes())
        except FileNotFoundError:
            return []

    # --- events in, commands out --------------------------------------------------------

    def dispatch(self, *events: Event) -> None:
        for command in self.state.handle(*events):
            self._execute(command)

    def _execute(self, command: Command) -> None:
        match command:
            case SaveTable(entries=entries):
                self._unsaved = entries
                self._flush_soon()
            case SendToMaster(frame=frame):
                self._unsent.append(frame)
                self._flush_soon()
            case Spawn(spec=spec) if spec.restore:
                self._later(self._restore_then_spawn(spec))
            case Spawn(spec=spec):
                self._spawn(spec)
            case Signal(pid=pid, signal=sig):
                self.runner.signal(pid, sig)

    def _flush_soon(self) -> None:
        if not self._flush_pending:
            self._flush_pending = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        """Save the table, then send what the events of this loop turn produced.

        Batching per turn turns a burst of task starts and exits into one write of the table
        and one frame of reports; saving first keeps the rule that nothing is reported
        before a restarted agent could find it on disk."""
        self._flush_pending = False
        if self._unsaved is not None:
            tmp = self._table_path.with_suffix(".tmp")
            # The agent's alone: it holds every run's command and environment, whoever runs it.
            with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as f:
                os.fchmod(f.fileno(), 0o600)  # made by an earlier agent with a wider mode
                f.write(_TABLE.dump_json(list(self._unsaved)))
            os.replace(tmp, self._table_path)
            self._unsaved = None
        frames, self._unsent = self._unsent, []
        reports = [r for f in frames if isinstance(f, RunReports) for r in f.reports]
        for frame in frames:
            if not isinstance(frame, RunReports):
                self._send(encode(frame))
        if reports:
            self._send(encode(RunReports(reports=reports)))

    def _send(self, data: bytes) -> None:
        # While disconnected frames are dropped: reports are repeated until acknowledged.
        if self._outbox is not None and self._outbox.qsize() < _OUTBOX:
            self._outbox.put_nowait(data)

    def _spawn(self, spec: RunSpec) -> None:
        try:
            pid, start = self.runner.spawn(spec)
        except OSError as e:
            self.dispatch(SpawnFailed(spec.run_id, str(e), time.time()))
        else:
            self.dispatch(Spawned(spec.run_id, pid, start, time.time()))
            self.health.watch(spec)  # a new run: its checks start critical

    async def _restore_then_spawn(self, spec: RunSpec) -> None:
        """A run that moves with its state: unpack the state it saved, then start it."""
        import httpx  # loaded by the transfer itself; an agent starts without it

        assert spec.restore is not None
        try:
            self.runner.prepare(spec)
        except OSError as e:  # it may not run here: no use fetching its state
            self.dispatch(SpawnFailed(spec.run_id, str(e), time.time()))
            return
        try:
            limit = spec.resources.disk or self.settings.restore_limit  # MiB
            await self.files.restore(spec.restore, self.runner.checkpoint_dir(spec.run_id), limit)
        except (OSError, ValueError, httpx.HTTPError, tarfile.TarError, Unreachable) as e:
            self.dispatch(
                SpawnFailed(spec.run_id, f"its saved state could not be restored: {e}", time.time())
            )
            return
        self._spawn(spec)

    def _on_exit(self, run_id: str, code: int | None, used: Spent) -> None:
        self.health.stop(run_id)
        entry = self.state.runs.get(run_id)
        if entry is not None and entry.spec.checkpoint and entry.kill_requested and entry.pid is not None:
            self._later(self._save_then_report(run_id, code, entry.pid, entry.spec.kill_grace, used))
        else:
            self.dispatch(Exited(run_id, code, time.time(), None, used.cpu_seconds, used.peak_mem))

    async def _save_then_report(
        self, run_id: str, code: int | None, group: int, grace: float, used: Spent
    ) -> None:
        """A run stopped to move: once every process of it has ended (the command may still be
        writing its state after the wrapper shell is gone), its saved state goes to the master,
        then its end is told."""
        import httpx  # loaded by the transfer itself; an agent starts without it

        await _group_ended(group, grace + 1.0)
        directory = self.runner.checkpoint_dir(run_id)
        blob = None
        if directory.is_dir() and any(directory.iterdir()):
            try:
                owner = self.runner.sandbox(run_id).lstat().st_uid  # its run's user
                blob = await self.files.save(directory, owner, self.state_dir)
            except (OSError, httpx.HTTPError, Unreachable) as e:
                log.warning(
                    "run %s: its saved state could not be kept (%s); it restarts without it", run_id, e
                )
        self.dispatch(Exited(run_id, code, time.time(), blob, used.cpu_seconds, used.peak_mem))

    def _later(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _adopt(self) -> None:
        """Watch again the runs a previous agent process left running; settle the rest."""
        alive = frozenset(
            e.spec.run_id
            for e in self.state.running()
            if self.runner.adopt(e.spec.run_id, e.pid, e.pid_start)
        )
        exits = {
            e.spec.run_id: self.runner.recorded_exit(e.spec.run_id)
            for e in self.state.running()
            if e.spec.run_id not in alive
        }
        if alive:
            log.info("re-adopted runs %s", ", ".join(sorted(alive)))
        self.dispatch(Recovered(alive, exits, time.time()))
        for entry in self.state.running():
            # From the verdicts it had: a passing endpoint stays in the answers meanwhile.
            self.health.watch(entry.spec, entry.checks)

    # --- loops ----------------------------------------------------------------------------

    async def run(self) -> None:
        metrics = _metrics_listener(self)
        self._adopt()
        ticker = asyncio.create_task(self._tick_loop())
        renewer = None
        try:
            await self.credentials.ready()
            renewer = asyncio.create_task(self.credentials.keep_renewed())
            await self._connect_loop()
        except NotAMember:
            # Removed from the cluster: its tasks are lost to the master, which runs them elsewhere.
            stopped = await asyncio.to_thread(stop_runs, self.state_dir)
            log.error("this node is not a member of the cluster; %d runs stopped", stopped)
            raise
        except NotAdmitted:
            # A setting or a step to take: the runs go on, for an agent set up right to take over.
            log.error("this agent cannot take part as it is set up; its runs are left as they are")
            raise
        finally:
            if renewer is not None:
                renewer.cancel()
            ticker.cancel()
            if metrics is not None:
                await metrics.close()
            self.runner.close()
            await self.files.close()
            await self.health.close()

    async def _tick_loop(self) -> None:
        meter = Meter(self.runner.cgroups, self.settings.utilization, self.state.node.capacity.cpus)
        pruned = time.time()
        while True:
            await asyncio.sleep(self.settings.heartbeat_interval)
            now = time.time()
            runs = {e.spec.run_id: e.pid for e in self.state.running() if e.pid is not None}
            self.usage = meter.measure(runs)
            self.dispatch(Tick(now, self.usage))
            if now - pruned >= _PRUNE_EVERY:
                pruned = now
                self.runner.prune(set(self.state.runs), now - self.settings.keep_sandboxes)

    async def _connect_loop(self) -> None:
        headers = self.credentials.headers
        # Redial at least every two heartbeats: a restarted master waits a heartbeat timeout
        # (several heartbeats) for its agents before it calls their nodes down.
        cap = min(_REDIAL_CAP, 2 * self.settings.heartbeat_interval)
        backoff, hops = 0.1, 0
        named_by: str | None = None  # the follower that named the leader dialled now
        while True:
            url = self.masters.current
            if self._went_quiet(url) and not all(self._went_quiet(u) for u in self.masters.urls):
                self.masters.failed(url)  # a dial to it would only time out: the others first
                continue
            # What came of the dial: None, a session; a URL, the leader a follower named; "", a failure.
            unled = False  # whether it showed no leader can be counting this node's silence
            try:
                leader = await self._dial(url, headers)
            except (ConnectionRefusedError, _Leaderless) as e:
                log.debug("no leader at %s: %s", url, e)
                leader, unled = "", True
            except websockets.InvalidStatus as e:
                if e.response.status_code in (401, 403):
                    raise NotAdmitted(self.credentials.refused(url)) from e
                log.warning("the master at %s answered %s; trying again", url, e.response.status_code)
                leader = ""
            except websockets.InvalidHandshake as e:  # e.g. a master frozen mid-handshake
                log.warning("the master at %s did not complete the handshake (%s); trying again", url, e)
                leader = ""
            except (TimeoutError, OSError, websockets.ConnectionClosed) as e:
                log.debug("connection to %s failed: %s", url, e)
                if isinstance(e, TimeoutError):
                    self._quiet[url] = time.monotonic()
                leader = ""
            if leader and leader in self._absent:
                # A follower names a leader found absent (its lease has not run out yet): no
                # leader for now; the other masters are tried, as in an election.
                leader, unled = "", True
            elif leader and self._went_quiet(leader):
                # ... or one that just went quiet (frozen, or cut off): while its lease runs
                # out, the others are tried rather than it (a dial to it only times out).
                leader = ""
            if unled:
                self._unled(url)
                if named_by is not None:  # it named a leader that is not there: no leader
                    self._unled(named_by)
            elif leader is None:
                self._absent.clear()  # a session: its master heard this node
                self._quiet.pop(url, None)
            else:
                self._absent.pop(url, None)  # this master may be alive, and counting
            if leader and hops < MAX_HOPS:  # a follower named the leader: dial it at once
                hops, named_by = hops + 1, url
                self.masters.learned(leader)
                continue
            named_by = None
            if leader is None:  # a session ran and ended: the same master again, soon
                backoff = 0.1
            else:
                self.masters.failed(url)
            hops = 0
            await asyncio.sleep(backoff * (0.5 + random.random()))
            backoff = min(backoff * 2, cap)

    def _went_quiet(self, url: str) -> bool:
        """Whether the master at `url` went quiet on this agent lately (a hang-up, a dial
        timed out): frozen or cut off, it is tried last until its lease has run out."""
        return time.monotonic() - self._quiet.get(url, -math.inf) < _QUIET_FOR

    def _unled(self, url: str) -> None:
        """`url` showed no leader can be counting this node's silence; once every master has,
        the state machine may count it from the first of them (`Unled`)."""
        self._absent.setdefault(url, time.time())
        if set(self.masters.urls) <= self._absent.keys():
            self.dispatch(Unled(min(self._absent.values())))
            self._absent.clear()

    async def _dial(self, url: str, headers: dict[str, str]) -> str | None:
        """A connection to the master at `url`, and the session it carries until it ends or
        is lost: None then; the leader's URL when `url` is a follower that names it. Raises
        when the dial fails, or a follower knows no leader yet."""
        self.credentials.check_unexpired()
        try:
            async with websockets.connect(
                _ws_url(url),
                additional_headers=headers,
                ssl=self.credentials.context,
                max_size=_MAX_FRAME,
                ping_interval=5,
                ping_timeout=10,
                open_timeout=_OPEN_TIMEOUT,
            ) as ws:
                log.info("connected to %s as %s", url, self.state.node.name)
                self._hung_up = False
                await self._session(ws)
        except websockets.ConnectionClosed as e:
            if self._hung_up:
                raise TimeoutError(f"{url} stopped answering") from e
            if e.rcvd is not None and e.rcvd.code == TRY_AGAIN_CLOSE:
                raise TimeoutError(f"{url}: {e.rcvd.reason}") from e  # cut off from etcd: the next
            if e.rcvd is not None and e.rcvd.code == REMOVED_CLOSE:
                raise NotAMember(f"the master at {url} put this node out: {e.rcvd.reason}") from e
            if e.rcvd is not None and e.rcvd.code == POLICY_CLOSE:
                raise NotAdmitted(f"the master at {url} refused this connection: {e.rcvd.reason}") from e
            if e.rcvd is None or e.rcvd.code != NOT_LEADER_CLOSE:
                log.info("lost the master at %s: %s", url, e)
                return None
            if not e.rcvd.reason:
                raise _Leaderless(f"{url} knows no leader: an election is under way") from e
            try:
                leader = check_url(e.rcvd.reason)
            except ValueError as bad:
                log.warning("the master at %s names a leader that is no URL: %s", url, bad)
                raise e from None
            log.info("%s follows %s", url, leader)
            return leader
        return None

    async def _watch_master(self, ws: websockets.ClientConnection) -> None:
        """Hang up on a master that stopped answering heartbeats (frozen, or cut off with
        the connection still open), so the next dial finds whoever leads now. With one
        master there is no one else to find: its connection is left to its own keepalive."""
        while len(self.masters.urls) > 1:
            await asyncio.sleep(self.settings.heartbeat_interval)
            if self.state.gone_quiet(time.time(), self.settings.heartbeat_interval):
                log.warning("the master has not answered for a while; dialling another")
                self._hung_up = True
                self._quiet[self.masters.current] = time.monotonic()
                ws.transport.abort()  # not close(): that waits on the silent master's answer
                return

    async def _session(self, ws: websockets.ClientConnection) -> None:
        self._outbox = asyncio.Queue()
        writer = asyncio.create_task(self._write(ws, self._outbox))
        watchdog = asyncio.create_task(self._watch_master(ws))
        # Frames made while disconnected are not for this master: the registration goes
        # first, and carries every run (a heartbeat before it would be refused).
        self._unsent.clear()
        try:
            self.dispatch(Connected(time.time()))
            async for data in ws:
                if isinstance(data, str):
                    continue
                frame = decode(data)
                if isinstance(frame, LogRequest):
                    self._send(encode(self._read_log(frame)))
                elif isinstance(frame, ExecStart):
                    self.shell.start(frame)
                elif isinstance(frame, CopyFiles | FetchFile):
                    self.files.handle(frame)
                elif isinstance(frame, ExecAck):
                    self.shell.acknowledge(frame.exec_id, frame.consumed)
                elif isinstance(frame, ExecCancel):
                    self.shell.cancel(frame.exec_id)
                    self.files.cancel(frame.exec_id)
                else:
                    self.dispatch(FromMaster(frame, time.time()))  # type: ignore[arg-type]
        finally:
            self._outbox = None
            writer.cancel()
            watchdog.cancel()
            self.shell.cancel_all()
            self.files.cancel_all()

    @staticmethod
    async def _write(ws: websockets.ClientConnection, outbox: asyncio.Queue[bytes]) -> None:
        while True:
            await ws.send(await outbox.get())

    def _read_log(self, req: LogRequest) -> LogChunk:
        try:
            data = self.runner.read_log(req.run_id, req.stream, req.offset, req.limit)
        except FileNotFoundError:
            return LogChunk(
                request=req.request, offset=req.offset, error=f"no output of run {req.run_id} here"
            )
        return LogChunk(request=req.request, data=data, offset=req.offset)


def _metrics_listener(agent: Agent) -> MetricsListener | None:
    """The agent's metrics listener, serving, when `metrics_port` asks for one; only then is
    the HTTP server loaded."""
    if agent.settings.metrics_port is None:
        return None
    from shoal.agent.metrics import MetricsListener

    listener = MetricsListener(agent, agent.settings)
    listener.start()
    return listener


async def _group_ended(group: int, timeout: float) -> None:
    """Wait until no process of a process group is left (or `timeout` seconds)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(group, 0)
        except (ProcessLookupError, PermissionError):
            return
        await asyncio.sleep(0.02)


def _ws_url(master: str) -> str:
    base = master.rstrip("/")
    for http, ws in (("https://", "wss://"), ("http://", "ws://")):
        if base.startswith(http):
            base = ws + base[len(http) :]
    return base + "/v1/agent"


def stop_runs(state_dir: Path, grace: float = 3.0) -> int:
    """Kill the process groups of every run an agent's table holds; returns how many.

    For tearing a node down for good (`shoal dev` on exit): a stopped agent otherwise
    leaves its runs going, for the next agent process to re-adopt.
    """
    try:
        entries = _TABLE.validate_json((state_dir / "runs.json").read_bytes())
    except FileNotFoundError:
        return 0
    pids = [e.pid for e in entries if e.pid is not None and start_time(e.pid) == e.pid_start]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, sig)
        deadline = time.monotonic() + grace
        while any(alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.05)
    return len(pids)
