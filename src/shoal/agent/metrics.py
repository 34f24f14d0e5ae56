"""The agent's Prometheus metrics at `GET /metrics`, on a listener of its own.

An agent serves nothing else over HTTP (it dials the master), so this is a small server that
exists only when `metrics_port` is set, as Nomad's telemetry is off until asked for. It binds
`metrics_address`, loopback unless told otherwise: turning metrics on opens nothing to the
network by itself, and a Prometheus on another host is named deliberately (`0.0.0.0`, or
the node's own address), as node_exporter's listen address is. Every call must bring
`metrics_token` as a bearer token (401 without it, before anything else is looked at): the
same secret may be a metrics token the master made, so one credential scrapes the whole
cluster. It is plain HTTP: on a network the token crosses, keep the listener on a private
one.

What it says is read from what the agent keeps anyway, never measured for a scrape: the
table of runs, and the last measurement of the heartbeat loop (at most a heartbeat old).
Series per task are fine here: a node runs a bounded number of tasks.

- `shoal_agent_info{node}`: 1, naming the node (to join the rest on `instance`).
- `shoal_agent_tasks_running`.
- per running task, `{task,job}`: `shoal_agent_task_cpu_seconds_total` (since its run
  started), `shoal_agent_task_memory_bytes` (resident now, to the MiB), and what it asked
  for: `shoal_agent_task_cpus`, `shoal_agent_task_memory_limit_bytes`.
- the node: `shoal_agent_node_cpu_utilization` (0 to 1: the machine's, or with
  `utilization = "tasks"` its tasks' over the cpus offered), `shoal_agent_node_memory_used_bytes`,
  `shoal_agent_node_load1`, and what it offers: `shoal_agent_node_cpus`,
  `shoal_agent_node_memory_bytes`; and the process's own (`process_*`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import socket
from collections.abc import Iterator
from typing import TYPE_CHECKING

import uvicorn
from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from starlette.types import Receive, Scope, Send

from shoal.config import AgentSettings
from shoal.model import TaskState

if TYPE_CHECKING:
    from shoal.agent.server import Agent

log = logging.getLogger("shoal.agent")
_MIB = 1024 * 1024
_TASK = ("task", "job")
_STOP_WAIT = 2.0  # seconds the listener may take to close


class AgentCollector:
    """The agent's runs and node, as they were last measured."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent

    def collect(self) -> Iterator[Metric]:
        state, usage = self.agent.state, self.agent.usage
        node = state.node
        info = GaugeMetricFamily("shoal_agent_info", "The node this agent runs.", labels=("node",))
        info.add_metric((node.name,), 1)
        yield info
        running = [e for e in state.runs.values() if e.state is TaskState.RUNNING]
        yield GaugeMetricFamily("shoal_agent_tasks_running", "Tasks running on this node.", len(running))
        cpu = CounterMetricFamily(
            "shoal_agent_task_cpu_seconds", "CPU time the task's run has used.", labels=_TASK, created=None
        )
        memory = GaugeMetricFamily(
            "shoal_agent_task_memory_bytes", "Memory the task holds now.", labels=_TASK
        )
        cpus = GaugeMetricFamily("shoal_agent_task_cpus", "Cpus the task asked for.", labels=_TASK)
        limit = GaugeMetricFamily(
            "shoal_agent_task_memory_limit_bytes", "Memory the task asked for (its limit).", labels=_TASK
        )
        runs = usage.runs if usage is not None else {}
        for entry in running:
            spec = entry.spec
            labels = (spec.task_id, spec.task_id.partition(".")[0])
            cpus.add_metric(labels, spec.resources.cpus)
            limit.add_metric(labels, spec.resources.mem * _MIB)
            if (used := runs.get(spec.run_id)) is not None:
                cpu.add_metric(labels, used.cpu_seconds)
                memory.add_metric(labels, used.rss * _MIB)
        yield from (cpu, memory, cpus, limit)
        yield from _node(self.agent)


def _node(agent: Agent) -> Iterator[Metric]:
    capacity, usage = agent.state.node.capacity, agent.usage
    yield GaugeMetricFamily("shoal_agent_node_cpus", "Cpus this node offers.", capacity.cpus)
    yield GaugeMetricFamily("shoal_agent_node_memory_bytes", "Memory this node offers.", capacity.mem * _MIB)
    if usage is None:  # nothing measured yet: no figure rather than a false zero
        return
    yield GaugeMetricFamily(
        "shoal_agent_node_cpu_utilization",
        "CPU use, 0 to 1: the machine's, or its tasks' over the cpus offered (utilization = tasks).",
        usage.cpu_percent / 100,
    )
    yield GaugeMetricFamily("shoal_agent_node_memory_used_bytes", "Memory in use.", usage.mem_used * _MIB)
    yield GaugeMetricFamily("shoal_agent_node_load1", "The 1-minute load average.", usage.load1)


class Scrapes:
    """The listener's ASGI app: GET (or HEAD) /metrics with the token, and nothing else."""

    def __init__(self, registry: CollectorRegistry, token: str) -> None:
        self.registry = registry
        self._digest = hashlib.sha256(token.encode()).digest()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return  # no lifespan, no WebSocket
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if not self._admits(headers.get("authorization", "")):
            why = "a valid metrics token is required: Authorization: Bearer <token>"
            await _answer(send, 401, _error(why), {"www-authenticate": "Bearer"})
        elif scope["path"] != "/metrics":
            await _answer(send, 404, _error(f"no {scope['path']} here: GET /metrics"))
        elif scope["method"] not in ("GET", "HEAD"):
            await _answer(
                send, 405, _error(f"{scope['method']} is not allowed: GET /metrics"), {"allow": "GET"}
            )
        else:
            encode, content_type = choose_encoder(headers.get("accept", ""))
            body = encode(self.registry)
            await _answer(
                send, 200, body if scope["method"] == "GET" else b"", {"content-type": content_type}
            )

    def _admits(self, authorization: str) -> bool:
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token:
            return False
        return hmac.compare_digest(hashlib.sha256(token.encode()).digest(), self._digest)


def _error(why: str) -> bytes:
    return json.dumps({"error": why, "fields": []}).encode()


async def _answer(send: Send, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
    fields = {"content-type": "application/json", **(headers or {}), "content-length": str(len(body))}
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(k.encode(), v.encode()) for k, v in fields.items()],
        }
    )
    await send({"type": "http.response.body", "body": body})


class _Server(uvicorn.Server):
    def capture_signals(self) -> contextlib.AbstractContextManager[None]:  # type: ignore[override]
        return contextlib.nullcontext()  # the agent's signals are the agent's to handle


class MetricsListener:
    """The agent's metrics listener: bound when made (a port in use stops the agent's start,
    saying so), served from `start` until `close`."""

    def __init__(self, agent: Agent, settings: AgentSettings) -> None:
        assert settings.metrics_port is not None and settings.metrics_token is not None
        registry = CollectorRegistry()
        registry.register(AgentCollector(agent))
        ProcessCollector(registry=registry)
        where = (settings.metrics_address, settings.metrics_port)
        try:
            self.socket = socket.create_server(where)
        except OSError as e:
            raise OSError(
                f"the metrics listener cannot bind {where[0]}:{where[1]} (metrics_port): {e}"
            ) from e
        app = Scrapes(registry, settings.metrics_token.get_secret_value())
        config = uvicorn.Config(
            app,
            lifespan="off",
            ws="none",
            log_config=None,
            log_level="warning",
            access_log=False,
            proxy_headers=False,
            server_header=False,
            limit_concurrency=32,
        )
        self.server = _Server(config)
        self._serving: asyncio.Task[None] | None = None
        log.info("metrics at http://%s:%d/metrics", *where)

    def start(self) -> None:
        self._serving = asyncio.create_task(self.server.serve(sockets=[self.socket]))

    async def close(self) -> None:
        self.server.should_exit = True
        if self._serving is not None:
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(self._serving, _STOP_WAIT)
        self.socket.close()
