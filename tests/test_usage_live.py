"""Live utilization: per node and per task, smoothed in the master, shown by `shoal top`."""

from __future__ import annotations

import json
from pathlib import Path

from shoal.model import JobSpec, TaskState
from shoal.testing.live import live_cluster, wait_for

BUSY = ["python3", "-c", "import time\nend = time.time() + 60\nwhile time.time() < end: pass"]


def test_a_busy_task_shows_in_its_load_its_nodes_and_in_top(tmp_path: Path) -> None:
    with live_cluster(tmp_path, agents=2) as cluster, cluster.client() as client:
        job = client.submit(JobSpec(command=BUSY, resources={"cpus": 1, "mem": 64}, nodes="node1"))
        task_id = f"{job}.0"
        wait_for(lambda: client.task(task_id).state is TaskState.RUNNING, what="the busy task running")
        # One core's worth, as its cgroup or process tree tells (the machine is shared: > 40%).
        loaded = wait_for(
            lambda: (t := client.task(task_id)).load is not None and t.load.cpu_percent > 40 and t,
            timeout=20,
            what="the task's load measured",
        )
        assert loaded.load.rss >= 1

        def busy_node1():
            node = next(n for n in client.nodes() if n.name == "node1")
            return node.load > 10 and len(node.history) > 3 and node

        node1 = wait_for(busy_node1, timeout=20, what="node1's smoothed load")
        assert node1.tasks == 1 and f"{task_id}.0" in node1.usage.runs
        listing = json.loads(cluster.cli("nodes", "--json").stdout)
        assert {"load", "history", "tasks"} <= set(listing[0])
        view = cluster.cli("top", "--once")
        assert view.returncode == 0, view.stderr
        rows = {
            line.split()[0]: line.split()
            for line in view.stdout.splitlines()
            if line.strip().startswith("node")
        }
        assert set(rows) == {"node1", "node2"} and rows["node1"][1] == "up"
        busiest = next(line for line in view.stdout.splitlines() if line.strip().startswith("node"))
        assert busiest.split()[0] == "node1"  # each agent measures its own tasks: node1 is busiest
        client.kill(job)
        wait_for(lambda: client.task(task_id).load is None, what="the load dropped when the task ended")
