"""The framework SDK: a `Scheduler` you subclass and a driver that runs it against a master.

    class Sweep(Scheduler):
        def resource_offers(self, driver, offers):
            for offer in offers:
                driver.launch([offer.id], [TaskLaunch(name="t1", command="true")])

    Driver(Sweep(), name="sweep").run()

The shape is Mesos's Python scheduler API: callbacks on the scheduler (`registered`,
`resource_offers`, `offer_rescinded`, `status_update`, `node_lost`, `error`), calls on the
driver (`launch`, `decline`, `suppress`, `revive`, `kill`, `acknowledge`, `reconcile`,
`stop`). `Driver` is blocking: `run` reads the event stream and calls the scheduler on its
own thread. `AsyncDriver` is the asyncio flavour: the same calls as coroutines, callbacks
that may be coroutines. An exception a callback raises is logged, and the driver goes on.

A driver may be given several masters (`url="http://m1:8470,http://m2:8470"`): it subscribes
at the leader, following a follower's redirect, and its calls go there as a client's do
(`shoal.masters`). It re-subscribes (as the same framework) whenever its stream is lost,
with backoff, at the next master or at the leader one names, so a master restart or
failover costs the framework nothing: its tasks keep running, and status updates it had
not acknowledged are delivered again. Updates are acknowledged once
`status_update` returns (batched: one call for a burst), unless
`implicit_acknowledgements=False`.
"""

from __future__ import annotations

import abc
import asyncio
import inspect
import logging
import threading
import time
from collections.abc import AsyncIterator, Iterable, Iterator
from typing import Any

import httpx

from shoal.api_errors import api_error
from shoal.calls import AsyncCalls
from shoal.client import ApiError, Client, Unreachable
from shoal.clientfile import load_client_config
from shoal.framework import protocol as p
from shoal.masters import FAILOVER, Masters

log = logging.getLogger("shoal.framework")
_BACKOFF = (0.1, 5.0)  # first and largest wait between re-subscriptions, seconds
_ACK_DELAY = 0.02  # seconds implicit acknowledgements wait to go out together
_LOST = (httpx.TransportError, httpx.StreamError, Unreachable)  # a stream cut, or closed by stop()
_SUBSCRIBE = "/v1/frameworks/subscribe"
_LISTENING = httpx.Timeout(30.0, read=30.0)  # the master sends heartbeats well within a read


class Scheduler:
    """Override what your framework needs; by default offers are declined (never hoarded)."""

    def registered(self, driver: Any, framework_id: str) -> None:
        """Subscribed (again, after a lost stream: the same id)."""

    def resource_offers(self, driver: Any, offers: list[p.OfferInfo]) -> None:
        driver.decline([o.id for o in offers])

    def offer_rescinded(self, driver: Any, offer_id: str) -> None:
        """An offer may no longer be used."""

    def status_update(self, driver: Any, status: p.TaskStatus) -> None:
        """A task changed state (or a reconciliation answered)."""

    def node_lost(self, driver: Any, node: str) -> None:
        """A node was lost; its tasks' LOST updates follow."""

    def error(self, driver: Any, message: str) -> None:
        """The master ended the framework; the driver stops."""


class _Session:
    """What both drivers share: the subscription, the call bodies, the event dispatch."""

    def __init__(
        self,
        name: str,
        role: str,
        failover_timeout: float,
        framework_id: str | None,
        implicit_acknowledgements: bool,
    ) -> None:
        self.name = name
        self.role = role
        self.failover_timeout = failover_timeout
        self.framework_id = framework_id
        self.implicit_acknowledgements = implicit_acknowledgements
        self.stopped = False

    def subscribe_body(self) -> dict[str, Any]:
        return p.Subscribe(
            name=self.name,
            role=self.role,
            failover_timeout=self.failover_timeout,
            framework_id=self.framework_id,
        ).model_dump(mode="json")

    def call_path(self) -> str:
        if self.framework_id is None:
            raise RuntimeError(
                "the framework is not subscribed yet: call from a callback, or after registered"
            )
        return f"/v1/frameworks/{self.framework_id}/call"

    def callbacks(self, event: p.Event) -> tuple[str, tuple[Any, ...]] | None:
        """The scheduler method an event calls, and its arguments."""
        match event:
            case p.Subscribed(framework_id=framework_id):
                self.framework_id = framework_id
                return "registered", (framework_id,)
            case p.Offers(offers=offers):
                return "resource_offers", (offers,)
            case p.Rescind(offer_id=offer_id):
                return "offer_rescinded", (offer_id,)
            case p.Update(status=status):
                return "status_update", (status,)
            case p.Failure(node=node):
                return "node_lost", (node,)
            case p.Error(message=message):
                if self.stopped:
                    return None  # the end it asked for
                self.stopped = True
                return "error", (message,)
        return None  # heartbeats

    def must_acknowledge(self, event: p.Event) -> p.TaskStatus | None:
        if self.implicit_acknowledgements and isinstance(event, p.Update) and event.status.uuid:
            return event.status
        return None


def _launch_body(
    offer_ids: Iterable[str], tasks: Iterable[p.TaskLaunch | dict], refuse_seconds: float
) -> dict:
    return p.Accept(
        offer_ids=list(offer_ids),
        tasks=[t if isinstance(t, p.TaskLaunch) else p.TaskLaunch(**t) for t in tasks],
        refuse_seconds=refuse_seconds,
    ).model_dump(mode="json")


def _backoff(delay: float) -> float:
    return min(delay * 2, _BACKOFF[1])


def _again(error: Exception) -> bool:
    """Whether subscribing again may help: not after a refusal (a bad role, a framework
    that ended), which a driver raises; yes after a lost master, or a master's 5xx (one
    that lost its leadership in the middle of the call answers 503)."""
    return not isinstance(error, ApiError) or error.status >= 500


def _repeatable(body: dict[str, Any]) -> bool:
    """Whether a subscription may be sent again when a connection broke mid-call: taking up
    a framework by its id twice is taking it up once; a first subscription (no id yet) twice
    would make two frameworks."""
    return bool(body.get("framework_id"))


class _Driver(abc.ABC):
    """What both drivers are made of: the scheduler, the session, where the master is."""

    def __init__(
        self,
        scheduler: Scheduler,
        name: str,
        *,
        role: str = "default",
        url: str | None = None,
        token: str | None = None,
        ca: str | None = None,
        failover_timeout: float = 60.0,
        framework_id: str | None = None,
        implicit_acknowledgements: bool = True,
    ) -> None:
        config = load_client_config()
        self.scheduler = scheduler
        self._session = _Session(name, role, failover_timeout, framework_id, implicit_acknowledgements)
        self._masters = Masters(url or config.url)
        self._open(token or config.token, ca or config.ca or None)

    @abc.abstractmethod
    def _open(self, token: str, ca: str | None) -> None:
        """Make the HTTP clients this flavour talks to the masters with, trusting the
        cluster CA in the file `ca` (else the client file's) for https masters."""

    @property
    def url(self) -> str:
        """The master the driver talks to now: the leader, once one is known."""
        return self._masters.current

    @property
    def framework_id(self) -> str | None:
        return self._session.framework_id


class Driver(_Driver):
    """The blocking driver. `run()` returns when the framework is stopped or ended."""

    def _open(self, token: str, ca: str | None) -> None:
        # The stream and the calls each have a client: calls come from the scheduler's
        # callbacks and from any other thread, one at a time (the lock), while the stream
        # reads. They share the masters: what one learns of the leader, the other uses.
        self._http = Client(self._masters, token, ca=ca)
        self._listen = Client(self._masters, token, ca=ca)
        self._lock = threading.Lock()
        self._stream: httpx.Response | None = None
        self._thread: threading.Thread | None = None
        self._acks: list[p.TaskStatus] = []
        self._acks_lock = threading.Lock()
        self._acks_timer: threading.Timer | None = None

    # --- running ------------------------------------------------------------------------

    def run(self) -> None:
        """Subscribe and serve the scheduler until `stop()` or the master ends the framework.
        A refused subscription raises `ApiError`; a lost stream is re-subscribed."""
        delay = _BACKOFF[0]
        try:
            while not self._session.stopped:
                try:
                    for event in self._events():
                        delay = _BACKOFF[0]
                        self._handle(event)
                        if self._session.stopped:
                            break
                except (*_LOST, ApiError) as e:
                    if not _again(e):
                        raise
                    if self._session.stopped:
                        break
                    log.warning("lost the master at %s (%s); subscribing again in %.1fs", self.url, e, delay)
                    time.sleep(delay)
                    delay = _backoff(delay)
        finally:
            self._listen.close()

    def start(self) -> Driver:
        """Run on a thread of its own; returns once subscribed."""
        registered = threading.Event()
        scheduler_registered = self.scheduler.registered

        def registered_then_go_on(driver: Any, framework_id: str) -> None:
            registered.set()
            scheduler_registered(driver, framework_id)

        self.scheduler.registered = registered_then_go_on  # type: ignore[method-assign]
        self._thread = threading.Thread(target=self.run, name=f"framework {self._session.name}", daemon=True)
        self._thread.start()
        while not registered.wait(0.05):
            if not self._thread.is_alive():
                raise RuntimeError("the driver stopped before it subscribed: see the log")
        return self

    def join(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def _events(self) -> Iterator[p.Event]:
        body = self._session.subscribe_body()
        try:
            with self._listen._stream(
                "POST", _SUBSCRIBE, _LISTENING, json=body, safe=_repeatable(body)
            ) as response:
                self._stream = response
                for line in response.iter_lines():
                    if line:
                        yield p.EVENT.validate_json(line)
        except ApiError as e:
            self._session.stopped = not _again(e)
            raise

    def _handle(self, event: p.Event) -> None:
        callback = self._session.callbacks(event)
        if callback is not None:
            name, args = callback
            try:
                getattr(self.scheduler, name)(self, *args)
            except Exception:
                # A scheduler's bug must not cost it its subscription: say so, go on.
                log.exception("the scheduler's %s raised", name)
        if (status := self._session.must_acknowledge(event)) is not None and not self._session.stopped:
            self._acknowledge_soon(status)

    def _acknowledge_soon(self, status: p.TaskStatus) -> None:
        """Acknowledge in batches: one call for what a burst of updates brought."""
        with self._acks_lock:
            self._acks.append(status)
            if self._acks_timer is None:
                self._acks_timer = threading.Timer(_ACK_DELAY, self._flush_acks)
                self._acks_timer.daemon = True
                self._acks_timer.start()

    def _flush_acks(self) -> None:
        with self._acks_lock:
            statuses, self._acks, self._acks_timer = self._acks, [], None
        if statuses and not self._session.stopped:
            try:
                self.acknowledge(*statuses)
            except (ApiError, Unreachable) as e:
                log.warning("acknowledging %d updates failed (%s); they will come again", len(statuses), e)

    # --- calls --------------------------------------------------------------------------

    def launch(
        self, offer_ids: Iterable[str], tasks: Iterable[p.TaskLaunch | dict], refuse_seconds: float = 0.0
    ) -> dict[str, int]:
        """Start `tasks` on offers of one node; returns each task's job id."""
        return p.Accepted.model_validate(self._call(_launch_body(offer_ids, tasks, refuse_seconds))).jobs

    def decline(self, offer_ids: Iterable[str], refuse_seconds: float = 5.0) -> None:
        """Give offers back; their resources are not offered to this framework again for
        `refuse_seconds` (unless more is free there by then)."""
        if ids := list(offer_ids):
            self._call(p.Decline(offer_ids=ids, refuse_seconds=refuse_seconds).model_dump())

    def suppress(self) -> None:
        self._call(p.Suppress().model_dump())

    def revive(self) -> None:
        self._call(p.Revive().model_dump())

    def kill(self, task: str) -> None:
        self._call(p.Kill(task=task).model_dump())

    def acknowledge(self, *statuses: p.TaskStatus) -> None:
        """The updates were handled: they are not delivered again."""
        if uuids := [s.uuid for s in statuses if s.uuid]:
            self._call(p.Acknowledge(uuids=uuids).model_dump())

    def reconcile(self, tasks: Iterable[str] = ()) -> None:
        """Ask for the latest state of `tasks` (none: all live ones); answers are updates."""
        self._call(p.Reconcile(tasks=list(tasks)).model_dump())

    def stop(self, failover: bool = False) -> None:
        """End the framework (its tasks are killed); with `failover`, only disconnect, so a
        new driver given this `framework_id` takes over its tasks within the failover timeout."""
        session = self._session
        if not failover and session.framework_id is not None and not session.stopped:
            self._call(p.Teardown().model_dump())
        elif not session.stopped:
            self._flush_acks()
        session.stopped = True
        if self._stream is not None:
            self._stream.close()

    def _call(self, body: dict[str, Any]) -> Any:
        with self._lock:
            return self._http._call("POST", self._session.call_path(), json=body)


class AsyncDriver(_Driver):
    """The asyncio driver: `await driver.run()`; callbacks may be coroutines."""

    def _open(self, token: str, ca: str | None) -> None:
        self._http = AsyncCalls(self._masters, token, 30.0, FAILOVER, ca)
        self._stream: httpx.Response | None = None
        self._acks: list[p.TaskStatus] = []

    async def run(self) -> None:
        delay = _BACKOFF[0]
        try:
            while not self._session.stopped:
                try:
                    async for event in self._events():
                        delay = _BACKOFF[0]
                        await self._handle(event)
                        if self._session.stopped:
                            break
                except (*_LOST, ApiError) as e:
                    if not _again(e):
                        raise
                    if self._session.stopped:
                        break
                    log.warning("lost the master at %s (%s); subscribing again in %.1fs", self.url, e, delay)
                    await asyncio.sleep(delay)
                    delay = _backoff(delay)
        finally:
            await self._http.aclose()

    async def _events(self) -> AsyncIterator[p.Event]:
        body = self._session.subscribe_body()
        response = await self._http.send(
            "POST", _SUBSCRIBE, stream=True, safe=_repeatable(body), json=body, timeout=_LISTENING
        )
        try:
            if response.is_error:
                await response.aread()
                error = api_error(response)
                self._session.stopped = not _again(error)
                raise error
            self._stream = response
            async for line in response.aiter_lines():
                if line:
                    yield p.EVENT.validate_json(line)
        finally:
            await response.aclose()

    async def _handle(self, event: p.Event) -> None:
        callback = self._session.callbacks(event)
        if callback is not None:
            name, args = callback
            try:
                result = getattr(self.scheduler, name)(self, *args)
                if inspect.isawaitable(result):
                    await result
            except Exception:
                log.exception("the scheduler's %s raised", name)
        if (status := self._session.must_acknowledge(event)) is not None and not self._session.stopped:
            self._acks.append(status)
            if len(self._acks) == 1:
                asyncio.get_running_loop().call_later(
                    _ACK_DELAY, lambda: asyncio.ensure_future(self._flush_acks())
                )

    async def _flush_acks(self) -> None:
        statuses, self._acks = self._acks, []
        if statuses and not self._session.stopped:
            try:
                await self.acknowledge(*statuses)
            except (ApiError, Unreachable) as e:
                log.warning("acknowledging %d updates failed (%s); they will come again", len(statuses), e)

    async def launch(
        self, offer_ids: Iterable[str], tasks: Iterable[p.TaskLaunch | dict], refuse_seconds: float = 0.0
    ) -> dict[str, int]:
        return p.Accepted.model_validate(
            await self._call(_launch_body(offer_ids, tasks, refuse_seconds))
        ).jobs

    async def decline(self, offer_ids: Iterable[str], refuse_seconds: float = 5.0) -> None:
        if ids := list(offer_ids):
            await self._call(p.Decline(offer_ids=ids, refuse_seconds=refuse_seconds).model_dump())

    async def suppress(self) -> None:
        await self._call(p.Suppress().model_dump())

    async def revive(self) -> None:
        await self._call(p.Revive().model_dump())

    async def kill(self, task: str) -> None:
        await self._call(p.Kill(task=task).model_dump())

    async def acknowledge(self, *statuses: p.TaskStatus) -> None:
        if uuids := [s.uuid for s in statuses if s.uuid]:
            await self._call(p.Acknowledge(uuids=uuids).model_dump())

    async def reconcile(self, tasks: Iterable[str] = ()) -> None:
        await self._call(p.Reconcile(tasks=list(tasks)).model_dump())

    async def stop(self, failover: bool = False) -> None:
        session = self._session
        if not failover and session.framework_id is not None and not session.stopped:
            await self._call(p.Teardown().model_dump())
        elif not session.stopped:
            await self._flush_acks()
        session.stopped = True
        if self._stream is not None:
            await self._stream.aclose()

    async def _call(self, body: dict[str, Any]) -> Any:
        response = await self._http.send("POST", self._session.call_path(), json=body)
        if response.is_error:
            raise api_error(response)
        return response.json()


__all__ = ["ApiError", "AsyncDriver", "Driver", "Scheduler"]
