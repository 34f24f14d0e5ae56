"""`shoal history` against a real master and agents: what a task used, measured by its agent
as it ended, comes back with where and how it ran; filters; users see their own."""

from __future__ import annotations

import csv
import io
import json
import sys
import time
from pathlib import Path

from shoal.model import JobSpec, JobState, Role
from shoal.testing.live import live_cluster

# A second of CPU and 96 MiB written (so resident), then exit.
BURN = [
    sys.executable,
    "-c",
    "import time\nx = b'1' * (96 << 20)\n"
    "end = time.process_time() + 1.0\nwhile time.process_time() < end: pass",
]


def history(cluster, *args: str, token: str | None = None) -> list[dict]:
    listed = cluster.cli("history", "--json", *args, token=token)
    assert listed.returncode == 0, listed.stderr
    return json.loads(listed.stdout)


def test_history_lists_ended_tasks_with_their_cpu_time_and_peak_memory(tmp_path: Path) -> None:
    with live_cluster(tmp_path, agents=2) as cluster, cluster.client() as admin:
        alice = admin.create_token("alice", Role.USER).token
        bob = admin.create_token("bob", Role.USER).token
        rita = admin.create_token("rita", Role.READER).token
        with cluster.client(alice) as a, cluster.client(bob) as b:
            burn = a.submit(
                JobSpec(name="burn", command=BURN, resources={"cpus": 1, "mem": 256}, nodes="node1")
            )
            fail = a.submit(JobSpec(name="fail", command="exit 3", resources={"cpus": 0.5}, nodes="node2"))
            echo = b.submit(JobSpec(name="echo", command="echo hi", count=2, resources={"cpus": 0.5}))
            assert a.wait(burn, timeout=60).state is JobState.COMPLETE
            assert a.wait(fail, timeout=30).state is JobState.FAILED
            assert b.wait(echo, timeout=30).state is JobState.COMPLETE

        mine = history(cluster, token=alice)
        assert [r["task_id"] for r in mine] == [f"{fail}.0", f"{burn}.0"]  # newest job first
        failed, burned = mine
        assert (burned["state"], burned["exit_code"], burned["node"], burned["owner"]) == (
            "finished",
            0,
            "node1",
            "alice",
        )
        assert 0.8 <= burned["cpu_seconds"] < 30, burned  # a second of CPU, as the agent measured it
        assert 96 <= burned["peak_mem"] <= 256, burned  # MiB: all it wrote, within its limit
        assert burned["attempts"] == 1 and burned["queue"] == "default" and burned["name"] == "burn"
        assert burned["submitted_at"] <= burned["started_at"] <= burned["finished_at"] <= time.time()
        assert (failed["state"], failed["exit_code"], failed["signal"], failed["node"]) == (
            "failed",
            3,
            None,
            "node2",
        )

        # Filters, on the command line (durations and ISO times) and in the SDK.
        assert len(history(cluster, "--since", "1h", "--state", "finished,failed", token=alice)) == 2
        assert history(cluster, "--since", "2999-01-01T00:00", token=alice) == []
        with cluster.client(alice) as a:
            assert [e.task_id for e in a.history(states=["failed"]).entries] == [f"{fail}.0"]
            assert [e.task_id for e in a.history(node="node1").entries] == [f"{burn}.0"]
            assert a.history(until=time.time() - 3600).entries == []
            first = a.history(limit=1)
            assert [e.task_id for e in first.entries] == [f"{fail}.0"] and first.next == f"{fail}.0"
            assert [e.task_id for e in a.history(after=first.next).entries] == [f"{burn}.0"]

        # A user sees their own only; a reader (and an admin) anyone's, and may choose whose.
        assert {r["owner"] for r in history(cluster, token=bob)} == {"bob"}
        refused = cluster.cli("history", "--user", "bob", token=alice)
        assert refused.returncode != 0 and "its own history only" in refused.stderr
        with cluster.client(rita) as r:
            assert {e.owner for e in r.history().entries} == {"alice", "bob"}
            assert [e.task_id for e in r.history(user="bob").entries] == [f"{echo}.0", f"{echo}.1"]
        everyone = history(cluster)
        assert len(everyone) == 4

        # CSV: a header, then the rows --json gives, in the same order.
        table = cluster.cli("history", "--csv")
        assert table.returncode == 0, table.stderr
        rows = list(csv.DictReader(io.StringIO(table.stdout)))
        assert [r["task_id"] for r in rows] == [r["task_id"] for r in everyone]
        row = next(r for r in rows if r["task_id"] == f"{burn}.0")
        assert (
            float(row["cpu_seconds"]) == burned["cpu_seconds"] and int(row["peak_mem"]) == burned["peak_mem"]
        )
        assert row["signal"] == "" and row["exit_code"] == "0"

        shown = cluster.cli("history", token=alice)
        assert shown.returncode == 0 and f"{burn}.0" in shown.stdout and "finished" in shown.stdout
