"""A scrape of a master's `GET /metrics` with ten thousand nodes, as Prometheus makes it.

    python bench/metrics.py --nodes 10000 --tasks 50000 --scrapes 21

The master is a real process over HTTP on loopback. Its ledger is written to its SQLite store
before it starts: `--nodes` nodes of 16 cpus, `--tasks` tasks running on them (jobs of 250
tasks, two queues), and 2,000 jobs of 5 tasks that wait on a constraint no node meets. The
ledger is made by the master's own state machine in this process (the records a real one
would have written), so the master loads what it would after a restart; its heartbeat
timeout is an hour, so every node stays up for the run without an agent. A metrics token is
made through the API, then `--scrapes` scrapes are timed one after the other, on one
keep-alive connection, from the request's start to its body's last byte.

Prints one JSON line last: nodes, tasks, scrape_ms (the median), scrape_p90_ms, bytes and
series (the answer's lines that are samples), and goal_met (scrape_ms <= 100). Exits 1 when
the answer is not a full scrape (a status other than 200, no node counted).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

from shoal.core.scheduler import Policy, QueuePolicy
from shoal.master.events import FromAgent, Persist, Submit
from shoal.master.state import MasterState
from shoal.master.store.sqlite import SqliteStore
from shoal.model import JobSpec, TaskState
from shoal.testing.live import LiveCluster
from shoal.testing.sim import sim_node
from shoal.wire import Register, RunReport, RunReports

GOAL_MS = 100.0
ARRAY = 250  # tasks a running job holds
WAITING_JOBS = 2000


def ledger(nodes: int, tasks: int) -> MasterState:
    """A master's state with `nodes` nodes, `tasks` of them running, and jobs that wait."""
    queues = {"default": QueuePolicy(), "batch": QueuePolicy()}
    state = MasterState(heartbeat_timeout=3600.0, policy=Policy(queues=queues))
    now = time.time()
    state.handle(*(FromAgent(f"n{i}", Register(node=sim_node(f"n{i}", cpus=16)), now) for i in range(nodes)))
    submissions = [
        Submit(
            j,
            f"user{j % 10}",
            JobSpec(command="sleep 1d", count=ARRAY, queue=("default", "batch")[j % 2]),
            now,
        )
        for j in range(tasks // ARRAY)
    ]
    waiting = JobSpec(command="true", count=5, constraints=["name == nowhere"])
    submissions += [Submit(len(submissions) + j, "ops", waiting, now) for j in range(WAITING_JOBS)]
    state.handle(*submissions)
    reports: dict[str, list[RunReport]] = {}
    for task in state.ledger.active_tasks():
        run = RunReport(run_id=task.run_id, task_id=task.id, attempt=task.attempt, state=TaskState.RUNNING)
        reports.setdefault(task.node or "", []).append(run)
    state.handle(*(FromAgent(node, RunReports(reports=runs), now) for node, runs in reports.items()))
    return state


def write(state: MasterState, path: Path) -> None:
    ledger = state.ledger
    path.parent.mkdir(parents=True, exist_ok=True)
    store = SqliteStore(path, fsync=False)
    store.apply(
        Persist(
            jobs=tuple(ledger.jobs.values()),
            tasks=tuple(ledger.tasks.values()),
            nodes=tuple(ledger.nodes.values()),
            counters=(("job", ledger.next_job_id),),
        )
    )
    store.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=10_000)
    parser.add_argument("--tasks", type=int, default=50_000)
    parser.add_argument("--scrapes", type=int, default=21)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="shoal-metrics-") as scratch:
        root = Path(scratch)
        began = time.monotonic()
        write(ledger(args.nodes, args.tasks), root / "master" / "shoal.db")
        print(f"ledger written in {time.monotonic() - began:.1f}s", file=sys.stderr)
        queues = json.dumps({"default": {}, "batch": {}})
        cluster = LiveCluster(
            root, 0, 3600.0, 1.0, master_settings={"fsync": "false", "rate_limit": "0", "queues": queues}
        )
        try:
            cluster.start()
            return scrape(cluster, args)
        finally:
            cluster.stop()


def scrape(cluster: LiveCluster, args: argparse.Namespace) -> int:
    headers = {"Authorization": f"Bearer {cluster.metrics_token()}"}
    times, answer = [], None
    with httpx.Client(base_url=cluster.url, headers=headers, timeout=30) as client:
        client.get("/metrics")  # the connection, and the first scrape's one-off costs
        for _ in range(args.scrapes):
            began = time.perf_counter()
            answer = client.get("/metrics")
            times.append((time.perf_counter() - began) * 1000)
    assert answer is not None
    up = next((line for line in answer.text.splitlines() if line.startswith('shoal_nodes{state="up"}')), "")
    if answer.status_code != 200 or not up.endswith(f" {float(args.nodes)}"):
        print(f"not a full scrape: {answer.status_code}, {up!r}", file=sys.stderr)
        return 1
    median = statistics.median(times)
    figures = {
        "nodes": args.nodes,
        "tasks": args.tasks,
        "scrape_ms": round(median, 1),
        "scrape_p90_ms": round(sorted(times)[int(0.9 * (len(times) - 1))], 1),
        "bytes": len(answer.content),
        "series": sum(1 for line in answer.text.splitlines() if line and not line.startswith("#")),
        "goal_met": median <= GOAL_MS,
    }
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
