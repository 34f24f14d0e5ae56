"""The master's Prometheus metrics at `GET /metrics`, and the API's own latency.

Who may scrape: a metrics token (`shoal token create NAME --metrics`, which opens this and
nothing else: a scrape configuration's credential reads no job, spec or log), or an admin or
reader API token. A user token sees only its own jobs and is refused (403); no token, 401.

What a scrape costs is what it reads: the gauges are computed from the ledger when asked
(`MasterCollector`), nothing is kept up to date between scrapes, and no series is per node,
task or job, so the answer stays a few kilobytes whatever the cluster's size:

- `shoal_master_leader`: 1 on the master that serves (alone or elected), 0 on a follower,
  which answers the rest of this list only once it leads.
- `shoal_tasks_pending{queue,reason}`: every configured queue and every `PENDING_REASONS`
  word (zeros included, so each series lives on); `shoal_tasks_running{queue}` and
  `shoal_tasks_assigned{queue}` (placed, not started yet).
- `shoal_nodes{state}`: up, down, drained (up, taking no new work); removed nodes are not
  counted.
- `shoal_node_heartbeat_lag_seconds`: how long ago each up node was last heard, as one
  gauge histogram (how many nodes are within each bound now), and its `_max`. A series a
  node would cost every scrape 10,000 lines at 10,000 nodes, and the store behind
  Prometheus as many series; the question it answers, whether nodes go quiet and how many,
  the distribution and its worst answer (`shoal nodes` names them).
- Counted since this master took over (`shoal.master.instruments`): task transitions by
  the state entered, offers made and declined, migrations begun by reason and mode, and
  histograms of scheduling cycles (time, placements) and store writes.
- `shoal_api_request_seconds{method,route,status}`: each HTTP call until its answer's head
  is sent (a stream's life is not its latency), by route template (`/v1/jobs/{job_id}`;
  "unmatched" when none), method and status class (2xx ... 5xx); and the process's own
  (`process_*`: CPU, memory, open files).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from operator import attrgetter
from typing import Annotated

import numpy as np
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import Response
from prometheus_client import CollectorRegistry, Histogram, ProcessCollector
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeHistogramMetricFamily,
    GaugeMetricFamily,
    Metric,
)
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from shoal.core.placement import NO_NODES
from shoal.errors import Forbidden
from shoal.master.deps import bearer, caller_of
from shoal.master.instruments import MIGRATION_REASONS
from shoal.master.server import Master
from shoal.master.state import MasterState
from shoal.model import Migrate, NodeStatus, Role, TaskState
from shoal.views import ErrorBody

# Why pending tasks wait, as a label: a few fixed words for the scheduler's reasons (see
# `pending_reason`); "queued": no cycle has judged them yet (just submitted, or the rest of a
# large array beyond what one cycle looks at).
PENDING_REASONS = (
    "queued",
    "no_nodes",
    "restart_delay",
    "queue_limit",
    "strict_order",
    "preemption",
    "gang",
    "resources",
    "placement_rules",
    "constraints",
    "stale_plan",
    "other",
)
NODE_STATES = ("up", "down", "drained")
LAG_BOUNDS = (0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 20.0, 30.0, 60.0)  # seconds
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_REASONS_KEPT = 4096  # reason texts remembered with their word, at most
_NODE_FIELDS = attrgetter("removed", "status", "drained", "last_seen")  # one call a node, 10,000 a scrape


def pending_reason(why: str) -> str:
    """The word for the scheduler's reason a job's pending tasks wait. A reason names the
    first thing that failed on each node: any node short of room makes it "resources" (room
    will come), else the job's own rules about where it may go and with whom."""
    if not why:
        return "queued"
    if why == NO_NODES:
        return "no_nodes"
    for prefix, word in _BY_PREFIX:
        if why.startswith(prefix):
            return word
    if "max share" in why:
        return "queue_limit"
    if "stale plan" in why or why.startswith("node is not schedulable"):
        return "stale_plan"
    if "lack free " in why or "lacks free " in why:
        return "resources"
    if any(rule in why for rule in _RULES):
        return "placement_rules"
    if any(failed in why for failed in _CONSTRAINTS):
        return "constraints"
    return "other"


_BY_PREFIX = (
    ("waiting for its restart delay", "restart_delay"),
    ("behind job ", "strict_order"),
    ("preempting ", "preemption"),
    ("waiting for preempted", "preemption"),
    ("gang:", "gang"),
)
_RULES = (" hold port ", " holds port ", " node runs ", " nodes run ", " most tasks")
_CONSTRAINTS = (" fail ", " fails ", "outside the node set", " is down", " are down")


class MasterCollector:
    """The ledger's gauges and the master's counters, computed when Prometheus asks."""

    def __init__(self, master: Callable[[], Master | None], clock: Callable[[], float] = time.time) -> None:
        self.master = master
        self.clock = clock
        self._words: dict[str, str] = {}  # reason text -> its word, between scrapes

    def collect(self) -> Iterator[Metric]:
        master = self.master()
        leading = master is not None and master.serving()
        yield GaugeMetricFamily(
            "shoal_master_leader", "1 while this master serves (alone, or as leader), else 0.", int(leading)
        )
        if master is None or not leading:
            return
        yield from self._tasks(master.state, master.instruments.placed)
        yield from _nodes(master.state, self.clock())
        yield from _counted(master)

    def _tasks(self, state: MasterState, placed: Mapping[tuple[str, TaskState], int]) -> Iterator[Metric]:
        ledger = state.ledger
        jobs, words = ledger.jobs, self._words
        if len(words) > _REASONS_KEPT:
            words.clear()
        pending: Counter[tuple[str, str]] = Counter()
        for job_id, ids in ledger.pending.items():
            why = state.why_waiting(job_id)
            if (word := words.get(why)) is None:
                word = words[why] = pending_reason(why)
            pending[(jobs[job_id].spec.queue, word)] += len(ids)
        queues = dict.fromkeys(state.policy.queues)
        queues.update(dict.fromkeys(queue for queue, _ in (*pending, *placed)))
        waiting_tasks = GaugeMetricFamily(
            "shoal_tasks_pending", "Tasks waiting to be placed, by queue and why.", labels=("queue", "reason")
        )
        running = GaugeMetricFamily("shoal_tasks_running", "Tasks running, by queue.", labels=("queue",))
        assigned = GaugeMetricFamily(
            "shoal_tasks_assigned", "Tasks placed on a node and not started yet, by queue.", labels=("queue",)
        )
        for queue in queues:
            for word in PENDING_REASONS:
                waiting_tasks.add_metric((queue, word), pending[(queue, word)])
            running.add_metric((queue,), placed.get((queue, TaskState.RUNNING), 0))
            assigned.add_metric((queue,), placed.get((queue, TaskState.ASSIGNED), 0))
        yield from (waiting_tasks, running, assigned)


def _nodes(state: MasterState, now: float) -> Iterator[Metric]:
    counts = dict.fromkeys(NODE_STATES, 0)
    heard: list[float] = []
    for removed, status, drained, last_seen in map(_NODE_FIELDS, state.ledger.nodes.values()):
        if removed is not None:
            continue
        if status is NodeStatus.DOWN:
            counts["down"] += 1
            continue
        counts["drained" if drained else "up"] += 1
        heard.append(last_seen)
    nodes = GaugeMetricFamily(
        "shoal_nodes", "Nodes by state (drained: up, taking no new work).", labels=("state",)
    )
    for name, count in counts.items():
        nodes.add_metric((name,), count)
    yield nodes
    lags = np.sort(np.maximum(now - np.array(heard, dtype=float), 0.0))
    within = np.searchsorted(lags, LAG_BOUNDS, side="right").tolist()
    yield GaugeHistogramMetricFamily(
        "shoal_node_heartbeat_lag_seconds",
        "Up nodes by how long ago each was last heard, now.",
        buckets=[*((f"{b:g}", n) for b, n in zip(LAG_BOUNDS, within, strict=True)), ("+Inf", len(lags))],
        gsum_value=float(lags.sum()),
    )
    yield GaugeMetricFamily(
        "shoal_node_heartbeat_lag_max_seconds",
        "How long ago the up node heard from least recently was last heard.",
        float(lags[-1]) if len(lags) else 0.0,
    )


def _counted(master: Master) -> Iterator[Metric]:
    counted = master.instruments
    transitions = CounterMetricFamily(
        "shoal_task_transitions", "Tasks that entered each state.", labels=("state",), created=None
    )
    for task_state in TaskState:
        transitions.add_metric((task_state.value,), counted.transitions[task_state.value])
    yield transitions
    yield CounterMetricFamily("shoal_offers_made", "Resource offers made to frameworks.", counted.offers_made)
    yield CounterMetricFamily(
        "shoal_offers_declined", "Outstanding offers frameworks declined.", counted.offers_declined
    )
    moves = CounterMetricFamily(
        "shoal_migrations", "Task migrations begun, by why and the task's mode.", labels=("reason", "mode")
    )
    for reason in MIGRATION_REASONS:
        for mode in Migrate:
            moves.add_metric((reason, mode.value), counted.migrations[(reason, mode.value)])
    yield moves
    yield from counted.histograms()


# --- the route ------------------------------------------------------------------------------


async def scraper(request: Request) -> None:
    """A metrics token, or an admin's or a reader's API token (a user's sees only its own jobs)."""
    token = bearer(request.headers.get("authorization", ""))
    if token is not None and (name := request.app.state.tokens.scraper(token)) is not None:
        request.state.principal = name  # whom the audit trail names
        return
    caller = await caller_of(request)
    if caller.role is Role.USER:
        raise Forbidden("metrics need a metrics, reader or admin token: a user token sees only its own jobs")


router = APIRouter()


@router.get(
    "/metrics",
    response_class=Response,
    responses={
        200: {"content": {"text/plain": {}}, "description": "the Prometheus exposition format"},
        401: {"model": ErrorBody},
        403: {"model": ErrorBody},
    },
)
async def metrics(request: Request, _: Annotated[None, Depends(scraper)]) -> Response:
    """The master's metrics, for Prometheus (a metrics, reader or admin token)."""
    encode, content_type = choose_encoder(request.headers.get("accept", ""))
    return Response(encode(request.app.state.metrics), media_type=content_type)


# --- the API's latency ----------------------------------------------------------------------


class ApiLatency:
    """ASGI middleware: each HTTP call's time until its answer's head goes out, by method,
    route template and status class. Outermost, so calls refused before routing (429, a
    follower's 307) count too, under the route they asked for."""

    def __init__(self, app: ASGIApp, histogram: Histogram, routes: Callable[[], Iterable[BaseRoute]]) -> None:
        self.app = app
        self.histogram = histogram
        self.routes = routes
        self._children: dict[tuple[str, str, str], Histogram] = {}  # labels -> child, no lock to take

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        began = time.perf_counter()
        answered = False

        async def timed(message: Message) -> None:
            nonlocal answered
            if message["type"] == "http.response.start" and not answered:
                answered = True
                self._observe(scope, message["status"], time.perf_counter() - began)
            await send(message)

        try:
            await self.app(scope, receive, timed)
        finally:
            if not answered:  # failed, or gone, before any answer
                self._observe(scope, 500, time.perf_counter() - began)

    def _observe(self, scope: Scope, status: int, seconds: float) -> None:
        key = (scope["method"], self._template(scope), f"{status // 100}xx")
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = self.histogram.labels(*key)
        child.observe(seconds)

    def _template(self, scope: Scope) -> str:
        route = scope.get("route")
        if route is None:  # answered before routing: found as the router would
            route = next((r for r in self.routes() if r.matches(scope)[0] is Match.FULL), None)
        return getattr(route, "path", None) or "unmatched"


def instrument(app: FastAPI) -> None:
    """Serve GET /metrics, and time every call: to be called last in making the app, so the
    timing is outermost."""
    registry = CollectorRegistry()
    registry.register(MasterCollector(lambda: getattr(app.state, "master", None)))
    ProcessCollector(registry=registry)
    latency = Histogram(
        "shoal_api_request_seconds",
        "HTTP calls until the answer's head is sent, by method, route template and status class.",
        ("method", "route", "status"),
        buckets=_LATENCY_BUCKETS,
        registry=registry,
    )
    app.state.metrics = registry
    app.include_router(router)
    app.add_middleware(ApiLatency, histogram=latency, routes=lambda: app.router.routes)
