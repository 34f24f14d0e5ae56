"""Rebalancing and drains on real agents: busy tasks piled on one node get spread; a
drained node is emptied. The agents share this machine, so each measures its own tasks."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from shoal.checks import TASK_CHECK, serves
from shoal.model import JobSpec, Role, TaskState
from shoal.testing.live import live_cluster, wait_for
from shoal.testing.programs import COUNTER

pytestmark = pytest.mark.timeout(120)

# Half a core each: busy for 10 ms, asleep for 10 ms.
HALF_BUSY = [
    "python3",
    "-c",
    "import time\nwhile True:\n    t = time.perf_counter()\n"
    "    while time.perf_counter() - t < 0.01: pass\n    time.sleep(0.01)",
]
SETTINGS = {"rebalance": "spread", "rebalance_every": "2", "rebalance_cooldown": "5", "rebalance_budget": "4"}


def test_loadgen_tasks_piled_on_one_node_are_spread_until_the_gap_closes(tmp_path: Path) -> None:
    """Three `shoal loadgen` tasks binpacked onto one node hold this machine at 40-60% between
    them; the rebalancer spreads them until the nodes' smoothed loads are within 10 points."""
    loadgen = [sys.executable, "-m", "shoal", "loadgen", "--min", "40", "--max", "60", "--interval-ms", "300"]
    with live_cluster(tmp_path, agents=3, master_settings=SETTINGS) as cluster, cluster.client() as client:
        job = client.submit(
            JobSpec(command=loadgen, count=3, resources={"cpus": 0.5, "mem": 64}, strategy="binpack")
        )
        tasks = wait_for(
            lambda: (ts := client.job(job).tasks) and all(t.state is TaskState.RUNNING for t in ts) and ts,
            what="three loadgen tasks running",
        )
        assert len({t.node for t in tasks}) == 1  # binpacked onto one node

        def gap() -> float:
            loads = [n.load for n in client.nodes()]
            return max(loads) - min(loads)

        wait_for(lambda: gap() > 25, timeout=20, what="the pile measured")
        wait_for(lambda: gap() < 10, timeout=60, what="the load spread")
        spread = client.job(job).tasks
        assert len({t.node for t in spread}) == 3
        moves = client.events()
        assert 1 <= len(moves) <= 3 and all(m.duration is not None and m.reason for m in moves)
        plan = cluster.cli("rebalance", "--dry-run")
        assert plan.returncode == 0, plan.stderr


def test_drain_empties_a_node_and_undrain_lets_it_work_again(tmp_path: Path) -> None:
    with live_cluster(tmp_path, agents=2) as cluster, cluster.client() as client:
        job = client.submit(JobSpec(command="sleep 300", count=2, resources={"cpus": 0.5, "mem": 16}))
        wait_for(lambda: all(t.state is TaskState.RUNNING for t in client.job(job).tasks), what="running")
        drained = cluster.cli("drain", "node1")
        assert drained.returncode == 0, drained.stderr

        def on_node1() -> int:
            return next(n for n in client.nodes() if n.name == "node1").tasks

        wait_for(lambda: on_node1() == 0, what="node1 emptied")
        wait_for(
            lambda: all(t.state is TaskState.RUNNING and t.node == "node2" for t in client.job(job).tasks),
            what="every task running on node2",
        )
        node1 = next(n for n in client.nodes() if n.name == "node1")
        assert node1.drained
        events = cluster.cli("events")
        assert events.returncode == 0 and "drain" in events.stdout
        undrained = cluster.cli("undrain", "node1")
        assert undrained.returncode == 0, undrained.stderr
        later = client.submit(JobSpec(command="sleep 300", resources={"cpus": 0.5, "mem": 16}, nodes="node1"))
        wait_for(lambda: client.job(later).tasks[0].state is TaskState.RUNNING, what="node1 working again")


def test_a_checkpointing_task_keeps_counting_from_where_it_was_after_a_move(tmp_path: Path) -> None:
    with live_cluster(tmp_path, agents=2) as cluster, cluster.client() as client:
        job = client.submit(
            JobSpec(command=COUNTER, resources={"cpus": 0.1, "mem": 32}, migrate="checkpoint")
        )
        task_id = f"{job}.0"
        first = wait_for(
            lambda: (t := client.task(task_id)).state is TaskState.RUNNING and t, what="the counter running"
        )
        wait_for(lambda: len(client.logs(task_id).split()) >= 10, what="some counting")
        client.drain(first.node)
        moved = wait_for(
            lambda: (t := client.task(task_id)).attempt == 1 and t.state is TaskState.RUNNING and t,
            timeout=30,
            what="the counter running again elsewhere",
        )
        assert moved.node != first.node and moved.history[-1].state is TaskState.MIGRATED
        before = [int(n) for n in client.logs(task_id, attempt=0).split()]
        wait_for(lambda: client.logs(task_id, attempt=1).split(), what="counting again")
        after = [int(n) for n in client.logs(task_id, attempt=1).split()]
        assert after[0] == before[-1] + 1  # its state came along: it went on, not from 1
        [event] = client.events()
        assert event.mode.value == "checkpoint" and event.source == first.node and event.duration is not None
        with cluster.client(client.create_token("someone", Role.USER).token) as someone:
            assert someone.events() == []  # another user's job's move is not theirs to see


def test_a_node_that_joins_gets_work(tmp_path: Path) -> None:
    with live_cluster(tmp_path, agents=3, master_settings=SETTINGS) as cluster, cluster.client() as client:
        cluster.kill_agent("node3")  # node3 leaves before the work comes
        wait_for(
            lambda: next(n for n in client.nodes() if n.name == "node3").status.value == "down", what="down"
        )
        job = client.submit(JobSpec(command=HALF_BUSY, count=4, resources={"cpus": 0.5, "mem": 64}))
        wait_for(lambda: all(t.state is TaskState.RUNNING for t in client.job(job).tasks), what="running")
        cluster.start_agent("node3")  # back, empty: new capacity
        wait_for(
            lambda: any(t.node == "node3" and t.state is TaskState.RUNNING for t in client.job(job).tasks),
            timeout=60,
            what="work moved to the node that joined",
        )
        assert any(m.target == "node3" and m.reason for m in client.events())


def test_a_service_moved_make_before_break_never_fails_a_request(tmp_path: Path) -> None:
    with live_cluster(tmp_path, agents=2) as cluster, cluster.client() as client:
        job = client.submit(
            JobSpec(
                command="exec python3 -m http.server $SHOAL_PORT_WEB --bind 127.0.0.1",
                resources={"cpus": 0.1, "mem": 64},
                ports=["web"],
                migrate="make-before-break",
                health={"http": "web/", "interval": 0.2},
            )
        )
        task_id = f"{job}.0"
        first = wait_for(
            lambda: serves([TASK_CHECK], (t := client.task(task_id)).checks) and t, what="the service serving"
        )
        old_url = f"http://127.0.0.1:{first.ports['web']}/"
        outcomes: list[bool] = []
        stop = threading.Event()

        def poll() -> None:
            with cluster.client() as ledger, httpx.Client(timeout=2) as http:
                while not stop.is_set():
                    port = ledger.task(task_id).ports["web"]  # where the ledger says it serves now
                    try:
                        outcomes.append(http.get(f"http://127.0.0.1:{port}/").status_code == 200)
                    except httpx.HTTPError:
                        outcomes.append(False)
                    time.sleep(0.02)

        def polled(more: int) -> Callable[[], bool]:
            """Whether `more` requests were made past the count now; fails if the poller stopped."""
            target = len(outcomes) + more

            def done() -> bool:
                if poller.done():
                    raise AssertionError("the poller stopped before it was told to") from poller.exception()
                return len(outcomes) >= target

            return done

        def old_copy_stopped() -> bool:
            try:
                httpx.get(old_url, timeout=1)
            except httpx.ConnectError:
                return True
            return False

        with ThreadPoolExecutor(1) as pool:
            poller = pool.submit(poll)
            try:
                wait_for(polled(10), what="the service answering the poller")
                client.drain(first.node)
                moved = wait_for(
                    lambda: (t := client.task(task_id)).attempt == 1 and t,
                    timeout=30,
                    what="the new copy taking over",
                )
                wait_for(old_copy_stopped, timeout=10, what="the old copy stopped")
                wait_for(polled(10), what="the new copy answering the poller")
            finally:
                stop.set()
            poller.result(timeout=10)  # and any error of its own
        assert moved.node != first.node
        assert outcomes and all(outcomes), f"{outcomes.count(False)} of {len(outcomes)} requests failed"
        [event] = client.events()
        assert event.mode.value == "make-before-break" and event.duration is not None and not event.failed


def test_consolidate_empties_a_lightly_used_node(tmp_path: Path) -> None:
    settings = {**SETTINGS, "rebalance": "consolidate"}
    with live_cluster(tmp_path, agents=3, master_settings=settings) as cluster, cluster.client() as client:
        # Spread out by the scheduler: one light task on each node.
        job = client.submit(JobSpec(command="sleep 300", count=3, resources={"cpus": 0.25, "mem": 16}))
        wait_for(lambda: len({t.node for t in client.job(job).tasks}) == 3, what="one task a node")
        # Consolidation packs them: at least one node ends with nothing on it.
        wait_for(lambda: any(n.tasks == 0 for n in client.nodes()), timeout=60, what="a node emptied")
        assert client.events() and all(m.reason.startswith("emptying") for m in client.events())
        wait_for(
            lambda: all(t.state is TaskState.RUNNING for t in client.job(job).tasks),
            what="every task running again where it was packed",
        )
