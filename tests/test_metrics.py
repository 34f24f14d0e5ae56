"""The master's and the agent's metrics from their own state machines, event by event: the
values a scrape gives back, who may scrape, and the metrics page naming each of them."""

from __future__ import annotations

import asyncio
import re
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
from fastapi import FastAPI
from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.exposition import generate_latest
from pydantic import ValidationError

from shoal.agent.metrics import AgentCollector, Scrapes
from shoal.agent.state import AgentState, RunEntry
from shoal.config import AgentSettings
from shoal.core.placement import NO_NODES
from shoal.core.scheduler import Policy, QueuePolicy
from shoal.framework import protocol as fp
from shoal.master.events import (
    Drain,
    FrameworkCall,
    FromAgent,
    KillJob,
    Principal,
    Reply,
    Submit,
    SubscribeFramework,
    Tick,
)
from shoal.master.ha import FollowerGate
from shoal.master.instruments import Instruments, migration_reason
from shoal.master.metrics import PENDING_REASONS, ApiLatency, MasterCollector, instrument, pending_reason
from shoal.master.state import MasterState
from shoal.master.store import Snapshot
from shoal.model import JobSpec, Resources, RunUsage, TaskState, Usage
from shoal.testing.sim import sim_node
from shoal.wire import Heartbeat, Register, RunReport, RunReports, RunSpec


class Shell:
    """A master's state machine driven through its instruments, as the shell drives it; and
    a scrape of it at a given time."""

    def __init__(self, nodes: int = 1, cpus: float = 2, policy: Policy | None = None) -> None:
        self.state = MasterState(heartbeat_timeout=10.0, policy=policy)
        self.instruments = Instruments(self.state)
        self.requests = 0
        for i in range(1, nodes + 1):
            self.handle(FromAgent(f"n{i}", Register(node=sim_node(f"n{i}", cpus=cpus)), 0.0))

    def handle(self, *events) -> list:
        return self.instruments.handle(*events)

    def request(self, make) -> object:
        self.requests += 1
        [reply] = [c for c in self.handle(make(self.requests)) if isinstance(c, Reply)]
        assert reply.error is None, reply.error
        return reply.value

    def submit(self, now: float = 0.0, **spec) -> int:
        return self.request(lambda r: Submit(r, "alice", JobSpec(**{"command": "true", **spec}), now))

    def report(self, node: str, task_id: str, state: TaskState, now: float = 1.0) -> None:
        attempt = self.state.ledger.tasks[task_id].attempt
        run = RunReport(run_id=f"{task_id}.{attempt}", task_id=task_id, attempt=attempt, state=state)
        self.handle(FromAgent(node, RunReports(reports=[run]), now))

    def scrape(self, now: float = 1.0) -> CollectorRegistry:
        master = SimpleNamespace(state=self.state, instruments=self.instruments, serving=lambda: True)
        registry = CollectorRegistry()
        registry.register(MasterCollector(lambda: master, clock=lambda: now))
        return registry


def value(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


# --- the master's gauges ----------------------------------------------------------------------


def test_pending_tasks_are_counted_by_queue_and_why_and_running_ones_by_queue() -> None:
    policy = Policy(queues={"default": QueuePolicy(), "batch": QueuePolicy(backfill="none")})
    shell = Shell(nodes=1, cpus=2, policy=policy)
    full = shell.submit(count=2, resources={"cpus": 1})
    shell.report("n1", f"{full}.0", TaskState.RUNNING)  # the other stays assigned
    shell.submit(count=3, resources={"cpus": 1})  # no room left
    shell.submit(constraints=["name == elsewhere"], resources={"cpus": 1})
    shell.submit(queue="batch", count=2, resources={"cpus": 1})
    shell.submit(queue="batch", resources={"cpus": 0.5})  # behind the one before: strict order
    scraped = shell.scrape()
    assert value(scraped, "shoal_tasks_pending", queue="default", reason="resources") == 3
    assert value(scraped, "shoal_tasks_pending", queue="default", reason="constraints") == 1
    assert value(scraped, "shoal_tasks_pending", queue="batch", reason="resources") == 2
    assert value(scraped, "shoal_tasks_pending", queue="batch", reason="strict_order") == 1
    assert value(scraped, "shoal_tasks_running", queue="default") == 1
    assert value(scraped, "shoal_tasks_assigned", queue="default") == 1
    assert value(scraped, "shoal_tasks_running", queue="batch") == 0  # every queue, zeros too
    pending = [s for m in scraped.collect() if m.name == "shoal_tasks_pending" for s in m.samples]
    assert len(pending) == 2 * len(PENDING_REASONS)
    assert sum(s.value for s in pending) == len(shell.state.ledger.tasks) - 2


@pytest.mark.parametrize(
    ("why", "word"),
    [
        ("", "queued"),
        (NO_NODES, "no_nodes"),
        ("waiting for its restart delay", "restart_delay"),
        ("queue batch is at its max share (50%)", "queue_limit"),
        ("behind job 3: queue batch keeps strict order", "strict_order"),
        ("preempting 2 tasks to make room", "preemption"),
        ("waiting for preempted tasks to stop", "preemption"),
        ("gang: 2 of 4 tasks fit now; 2 nodes lack free cpus", "gang"),
        ("3 nodes fail rack == r1, 2 nodes lack free memory", "resources"),
        (
            "1 node lacks free gpus (counting the room held for job 4); n2 is held for it from 30s on",
            "resources",
        ),
        ("2 nodes hold port dns", "placement_rules"),
        ("1 node runs job web, 1 node fails arch == arm", "placement_rules"),
        ("3 nodes hold the job's most tasks", "placement_rules"),
        ("3 nodes fail rack == r1", "constraints"),
        ("2 nodes are outside the node set, 1 node is down", "constraints"),
        ("node no longer has room (stale plan)", "stale_plan"),
        ("no node takes it this cycle", "other"),
    ],
)
def test_each_reason_is_one_of_a_few_words(why: str, word: str) -> None:
    assert pending_reason(why) == word and word in PENDING_REASONS


def test_nodes_by_state_and_how_long_ago_each_up_node_was_heard() -> None:
    shell = Shell(nodes=3)
    shell.handle(FromAgent("n1", Heartbeat(usage=Usage()), 9.0))
    shell.handle(FromAgent("n3", Heartbeat(usage=Usage()), 10.5))
    shell.handle(Tick(10.5))  # n2, last heard at 0, is past the 10 s timeout: down
    shell.request(lambda r: Drain(r, "n3", True, 10.5))
    scraped = shell.scrape(now=12.0)
    assert [value(scraped, "shoal_nodes", state=s) for s in ("up", "down", "drained")] == [1, 1, 1]
    # n1 heard 3 s ago, n3 1.5 s ago: one within 2 s, both within 3 s.
    lag = "shoal_node_heartbeat_lag_seconds_bucket"
    assert [value(scraped, lag, le=le) for le in ("1", "2", "3", "+Inf")] == [0, 1, 2, 2]
    assert value(scraped, "shoal_node_heartbeat_lag_seconds_gcount") == 2
    assert value(scraped, "shoal_node_heartbeat_lag_max_seconds") == 3.0


def test_a_follower_says_only_that_it_does_not_lead() -> None:
    registry = CollectorRegistry()
    registry.register(MasterCollector(lambda: None))
    assert [m.name for m in registry.collect()] == ["shoal_master_leader"]
    assert value(registry, "shoal_master_leader") == 0


def test_no_series_is_per_node_so_a_scrape_stays_the_same_size() -> None:
    sizes = []
    for nodes in (3, 2000):
        shell = Shell(nodes=nodes, cpus=4)
        shell.submit(count=nodes, resources={"cpus": 1})
        sizes.append(len(generate_latest(shell.scrape()).splitlines()))
    assert sizes[0] == sizes[1]


# --- the master's counters ----------------------------------------------------------------------


def test_cycles_placements_and_transitions_are_counted() -> None:
    shell = Shell(nodes=1, cpus=2)
    job = shell.submit(count=3, resources={"cpus": 1})  # a cycle places two
    shell.report("n1", f"{job}.0", TaskState.RUNNING)
    shell.report("n1", f"{job}.0", TaskState.FINISHED, now=2.0)  # room: a cycle places the third
    scraped = shell.scrape()
    assert value(scraped, "shoal_schedule_cycle_seconds_count") == shell.state.cycles >= 2
    assert value(scraped, "shoal_schedule_placements_sum") == 3
    assert value(scraped, "shoal_task_transitions_total", state="assigned") == 3
    assert value(scraped, "shoal_task_transitions_total", state="running") == 1
    assert value(scraped, "shoal_task_transitions_total", state="finished") == 1
    assert value(scraped, "shoal_task_transitions_total", state="lost") == 0


def test_a_task_entering_pending_is_counted_when_made_as_when_it_goes_back() -> None:
    shell = Shell(nodes=2, cpus=4)
    spec = JobSpec(command="true", count=3, resources={"cpus": 1}, restart={"attempts": 1})
    shell.handle(Submit(1, "alice", spec, 0.0), Submit(2, "bob", spec.model_copy(update={"count": 2}), 0.0))
    entered = "shoal_task_transitions_total"
    assert value(shell.scrape(), entered, state="pending") == 5  # two jobs in one dispatch
    node = shell.state.ledger.tasks["1.0"].node
    shell.report(node, "1.0", TaskState.RUNNING)
    shell.report(node, "1.0", TaskState.FAILED, now=2.0)  # it runs again: pending once more
    shell.submit(now=3.0)
    assert value(shell.scrape(), entered, state="pending") == 7
    # A framework's tasks are made pending too, and placed at once.
    admin = Principal("ops", admin=True)
    framework = shell.request(lambda r: SubscribeFramework(r, admin, fp.Subscribe(name="fw"), 1001, 4.0))
    launches = [fp.TaskLaunch(name=f"t{i}", command="true", resources={"cpus": 0.1}) for i in range(2)]
    roomiest = max(shell.state.frameworks.offers.values(), key=lambda o: o.amount[0])
    accept = fp.Accept(offer_ids=[roomiest.id], tasks=launches)
    shell.request(lambda r: FrameworkCall(r, admin, framework, accept, 5.0))
    scraped = shell.scrape()
    assert value(scraped, entered, state="pending") == 9
    assert value(scraped, entered, state="failed") == 1


def test_tasks_holding_room_are_counted_as_they_change_as_a_walk_would_count_them() -> None:
    shell = Shell(nodes=3, cpus=2)
    jobs = [shell.submit(count=2, resources={"cpus": 1}, restart={"attempts": 2}) for _ in range(2)]
    shell.submit(count=2, resources={"cpus": 1})
    for task in list(shell.state.ledger.active_tasks())[:4]:
        shell.report(task.node, task.id, TaskState.RUNNING)
    shell.report(shell.state.ledger.tasks[f"{jobs[0]}.0"].node, f"{jobs[0]}.0", TaskState.FAILED, now=2.0)
    shell.handle(
        FromAgent("n1", Heartbeat(usage=Usage()), 9.0), FromAgent("n2", Heartbeat(usage=Usage()), 9.0)
    )
    shell.handle(Tick(10.5))  # n3 is lost, and its tasks with it
    shell.request(lambda r: Drain(r, "n2", True, 11.0))
    shell.request(lambda r: KillJob(r, jobs[1], 12.0))

    def walked(state: MasterState) -> Counter:
        ledger = state.ledger
        return Counter((ledger.jobs[t.job_id].spec.queue, t.state) for t in ledger.active_tasks())

    assert +shell.instruments.placed == walked(shell.state) and walked(shell.state)
    ledger = shell.state.ledger
    snapshot = Snapshot(
        list(ledger.jobs.values()), list(ledger.tasks.values()), list(ledger.nodes.values()), [], [], []
    )
    restarted = MasterState(snapshot=snapshot, now=13.0)  # a master taking over counts what is there
    assert +Instruments(restarted).placed == walked(restarted)


def test_a_store_write_is_timed() -> None:
    shell = Shell()
    with shell.instruments.writing():
        time.sleep(0.002)
    scraped = shell.scrape()
    assert value(scraped, "shoal_store_write_seconds_count") == 1
    assert value(scraped, "shoal_store_write_seconds_sum") >= 0.002


def test_a_migration_is_counted_once_by_why_and_mode() -> None:
    shell = Shell(nodes=2, cpus=2)
    job = shell.submit(resources={"cpus": 1})
    node = shell.state.ledger.tasks[f"{job}.0"].node
    shell.report(node, f"{job}.0", TaskState.RUNNING)
    shell.request(lambda r: Drain(r, node, True, 2.0))
    shell.report(node, f"{job}.0", TaskState.KILLED, now=3.0)  # stopped: it runs again elsewhere
    other = shell.state.ledger.tasks[f"{job}.0"].node
    assert other != node
    shell.report(other, f"{job}.0", TaskState.RUNNING, now=4.0)  # the move is done: its record changes
    scraped = shell.scrape()
    assert value(scraped, "shoal_migrations_total", reason="drain", mode="restart") == 1
    assert sum(shell.instruments.migrations.values()) == 1


@pytest.mark.parametrize(
    ("reason", "word"),
    [
        ("drain", "drain"),
        ("drain deadline", "drain_deadline"),
        ("83% is over the mean 40% by more than 20%", "hot_node"),
        ("10% is under the mean 40%: new capacity", "new_capacity"),
        ("emptying 12%-used node to free it", "consolidation"),
        ("asked by hand", "other"),
    ],
)
def test_each_migration_reason_is_a_word(reason: str, word: str) -> None:
    assert migration_reason(reason) == word


def test_offers_made_and_declined_are_counted() -> None:
    shell = Shell(nodes=2, cpus=4)
    admin = Principal("ops", admin=True)
    framework = shell.request(lambda r: SubscribeFramework(r, admin, fp.Subscribe(name="fw"), 1001, 0.0))
    offers = list(shell.state.frameworks.offers)
    assert len(offers) == 2
    decline = fp.Decline(offer_ids=[offers[0], "not-an-offer"], refuse_seconds=60)
    shell.request(lambda r: FrameworkCall(r, admin, framework, decline, 1.0))
    shell.request(lambda r: FrameworkCall(r, admin, framework, decline, 1.0))  # gone: not again
    scraped = shell.scrape()
    assert value(scraped, "shoal_offers_made_total") == 2
    assert value(scraped, "shoal_offers_declined_total") == 1


# --- the API's latency ------------------------------------------------------------------------


def test_calls_are_timed_by_route_template_method_and_status_class() -> None:
    app = FastAPI()

    @app.get("/v1/jobs/{job_id}")
    async def job(job_id: int) -> dict[str, int]:
        return {"id": job_id}

    registry = CollectorRegistry()
    histogram = Histogram("shoal_api_request_seconds", "", ("method", "route", "status"), registry=registry)
    app.add_middleware(RefusesJob9)
    app.add_middleware(ApiLatency, histogram=histogram, routes=lambda: app.router.routes)
    asyncio.run(_get(app, "/v1/jobs/1", "/v1/jobs/2", "/v1/jobs/x", "/v1/jobs/9", "/nowhere"))
    count = "shoal_api_request_seconds_count"
    assert value(registry, count, method="GET", route="/v1/jobs/{job_id}", status="2xx") == 2
    assert value(registry, count, method="GET", route="/v1/jobs/{job_id}", status="4xx") == 2  # 422, 429
    assert value(registry, count, method="GET", route="unmatched", status="4xx") == 1


class RefusesJob9:
    """As the master's limits refuse a call: before routing."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"] == "/v1/jobs/9":
            await send({"type": "http.response.start", "status": 429, "headers": []})
            await send({"type": "http.response.body", "body": b""})
            return
        await self.app(scope, receive, send)


async def _get(app, *paths: str) -> None:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://master") as client:
        for path in paths:
            await client.get(path)


# --- the agent ----------------------------------------------------------------------------------


def _agent() -> SimpleNamespace:
    def entry(task_id: str, state: TaskState, cpus: float) -> RunEntry:
        spec = RunSpec(
            run_id=f"{task_id}.0",
            task_id=task_id,
            attempt=0,
            argv=["true"],
            resources=Resources(cpus=cpus, mem=512),
        )
        return RunEntry(spec=spec, state=state, pid=100)

    runs = [
        entry("4.0", TaskState.RUNNING, 1),
        entry("4.1", TaskState.RUNNING, 0.5),
        entry("5.0", TaskState.FINISHED, 1),
    ]
    usage = Usage(
        cpu_percent=25.0, mem_used=1000, load1=0.5, runs={"4.0.0": RunUsage(cpu_seconds=3.5, rss=100)}
    )
    return SimpleNamespace(state=AgentState(sim_node("n1", cpus=2, mem=4096), runs), usage=usage)


def test_the_agent_says_what_each_running_task_and_the_node_use() -> None:
    registry = CollectorRegistry()
    registry.register(AgentCollector(_agent()))
    mib = 1024 * 1024
    assert value(registry, "shoal_agent_info", node="n1") == 1
    assert value(registry, "shoal_agent_tasks_running") == 2
    assert value(registry, "shoal_agent_task_cpu_seconds_total", task="4.0", job="4") == 3.5
    assert value(registry, "shoal_agent_task_memory_bytes", task="4.0", job="4") == 100 * mib
    assert value(registry, "shoal_agent_task_memory_bytes", task="4.1", job="4") is None  # not measured yet
    assert value(registry, "shoal_agent_task_cpus", task="4.1", job="4") == 0.5
    assert value(registry, "shoal_agent_task_memory_limit_bytes", task="4.1", job="4") == 512 * mib
    assert value(registry, "shoal_agent_task_cpus", task="5.0", job="5") is None  # ended
    assert value(registry, "shoal_agent_node_cpu_utilization") == 0.25
    assert value(registry, "shoal_agent_node_memory_used_bytes") == 1000 * mib
    assert value(registry, "shoal_agent_node_cpus") == 2
    assert value(registry, "shoal_agent_node_memory_bytes") == 4096 * mib


def test_the_agent_listener_answers_only_a_scrape_with_its_token() -> None:
    asyncio.run(_scrapes_with_and_without_the_token())


async def _scrapes_with_and_without_the_token() -> None:
    registry = CollectorRegistry()
    registry.register(AgentCollector(_agent()))
    transport = httpx.ASGITransport(Scrapes(registry, "sesame"))
    good = {"Authorization": "Bearer sesame"}
    async with httpx.AsyncClient(transport=transport, base_url="http://agent") as client:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic sesame"}):
            refused = await client.get("/metrics", headers=headers)
            assert refused.status_code == 401 and refused.headers["www-authenticate"] == "Bearer"
            assert refused.json()["fields"] == [] and "token" in refused.json()["error"]
        assert (await client.get("/other", headers=good)).status_code == 404
        assert (await client.post("/metrics", headers=good)).status_code == 405
        scraped = await client.get("/metrics", headers=good)
        assert scraped.status_code == 200 and b"shoal_agent_tasks_running 2.0" in scraped.content


def test_an_agent_serves_metrics_only_with_a_token() -> None:
    with pytest.raises(ValidationError, match="metrics_port needs metrics_token"):
        AgentSettings(metrics_port=9464)
    settings = AgentSettings(metrics_port=9464, metrics_token="sesame")
    assert settings.metrics_address == "127.0.0.1"
    assert AgentSettings().metrics_port is None


def test_a_follower_answers_a_scrape_itself() -> None:
    """Each master of several is scraped for its own figures: a follower's say it does not lead."""

    async def scraped(scope, receive, send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"shoal_master_leader 0.0\n"})

    gate = FollowerGate(scraped, seat=lambda: None, serving=lambda: False)
    statuses = asyncio.run(_statuses(gate, "/metrics", "/v1/jobs"))
    assert statuses == [200, 503]  # the rest go to the leader (none known here)


async def _statuses(app, *paths: str) -> list[int]:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://follower") as client:
        return [(await client.get(path)).status_code for path in paths]


# --- the metrics page -----------------------------------------------------------------------------

PAGE = Path(__file__).resolve().parents[1] / "docs" / "ops" / "metrics.md"
SERIES = ("", "_total", "_bucket", "_count", "_sum", "_created", "_gcount", "_gsum")  # of a family


def test_the_metrics_page_names_every_metric_there_is_and_no_other() -> None:
    app = FastAPI()
    instrument(app)  # the master's registry: its collector, and the API's latency
    agent = CollectorRegistry()
    agent.register(AgentCollector(_agent()))
    registries = (Shell().scrape(), app.state.metrics, agent)
    families = {m.name for r in registries for m in r.collect() if m.name.startswith("shoal_")}
    named = set(re.findall(r"\bshoal_[a-z0-9_]+", PAGE.read_text()))
    unknown = sorted(
        n for n in named if not any(n.removesuffix(s) in families for s in SERIES if n.endswith(s))
    )
    assert unknown == [], f"docs/ops/metrics.md names metrics no code makes: {unknown}"
    missing = sorted(f for f in families if not any(f + s in named for s in SERIES))
    assert missing == [], f"docs/ops/metrics.md does not name {missing}"
