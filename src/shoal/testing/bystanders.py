"""A live cluster busy with work that must not notice what a test throws at its master.

    with bystanders(tmp_path) as b:
        ...                                  # bad frames, bad calls
        assert_unharmed(b, "the bad calls")

Two real agents each run a long task of a native job, and a framework of the user alice
holds a long task of its own and keeps every other offer it is made. `assert_unharmed`
checks that the master lists nodes and jobs at once, that the real nodes are up and as they
registered, that every task runs in the same attempt on the same node, that no watched
framework lost its stream (a driver that had subscribes again), and that the master logged
no error nor traceback.
"""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from shoal.client import Client
from shoal.framework import Driver, OfferInfo, Scheduler, TaskLaunch
from shoal.model import NodeInfo, NodeStatus, Role, TaskState, run_id
from shoal.testing.live import LiveCluster, live_cluster, wait_for
from shoal.testing.recorder import Recorder

REAL_NODES = ("node1", "node2")
QUICK = 2.0  # seconds the master may take to list nodes and jobs
STEADY = {"name": "steady", "command": "sleep 600", "count": 2, "max_per_node": 1}
# An error or a traceback, logged by shoal or by uvicorn (whose lines start "ERROR:").
_TROUBLE = re.compile(r"Traceback|^ERROR:|^\S+ \S+ (ERROR|CRITICAL) ", re.MULTILINE)


@dataclass
class Bystanders:
    cluster: LiveCluster
    admin: Client
    framework: Recorder  # alice's, holding the task "steady-fw"
    framework_id: str
    runs: dict[str, tuple[str, int]]  # run id -> (node, attempt), as they must stay
    nodes: dict[str, NodeInfo]  # the real nodes as they registered
    watched: list[Recorder] = field(default_factory=list)  # frameworks whose streams must hold

    def user_token(self, name: str) -> str:
        """A user's token, allowed to subscribe frameworks in the default role."""
        return self.admin.create_token(name, Role.USER, ("default",)).token

    def subscribe(self, scheduler: Scheduler, name: str, token: str) -> Driver:
        return Driver(scheduler, name, url=self.cluster.url, token=token).start()


class LaunchOnce:
    """One long task on a real node; every other offer is kept."""

    def __init__(self) -> None:
        self.done = False

    def __call__(self, driver: Driver, offers: list[OfferInfo]) -> None:
        for offer in offers:
            if not self.done and offer.node in REAL_NODES and offer.resources.cpus >= 0.25:
                task = TaskLaunch(name="steady-fw", command="sleep 600", resources={"cpus": 0.25, "mem": 16})
                driver.launch([offer.id], [task])
                self.done = True


def running(admin: Client) -> dict[str, tuple[str, int]]:
    """Every running task's run id -> (node, attempt)."""
    tasks = [t for job in admin.jobs() for t in admin.job(job.id).tasks]
    return {run_id(t.id, t.attempt): (t.node or "", t.attempt) for t in tasks if t.state is TaskState.RUNNING}


@contextlib.contextmanager
def bystanders(root: Path, master_settings: Mapping[str, str] | None = None) -> Iterator[Bystanders]:
    """The cluster, its work under way (a heartbeat timeout of 10 s, the default). No limit
    on calls a second: the checks call as fast as a test runs, and the limiter is tested
    on its own."""
    settings = {"rate_limit": "0", **(master_settings or {})}
    with (
        live_cluster(
            root, agents=2, heartbeat_timeout=10, heartbeat_interval=0.5, master_settings=settings
        ) as cluster,
        cluster.client() as admin,
    ):
        admin.submit({**STEADY, "resources": {"cpus": 0.5, "mem": 64}})
        alice = admin.create_token("alice", Role.USER, ("default",)).token
        framework = Recorder(on_offers=LaunchOnce())
        driver = Driver(framework, "bystander", url=cluster.url, token=alice).start()
        try:
            runs = wait_for(lambda: r if len(r := running(admin)) == 3 else None, what="3 tasks running")
            nodes = {n.name: n.info for n in admin.nodes()}
            yield Bystanders(cluster, admin, framework, str(driver.framework_id), runs, nodes, [framework])
        finally:
            driver.stop(failover=True)


def assert_unharmed(b: Bystanders, where: str) -> None:
    began = time.monotonic()
    nodes = {n.name: n for n in b.admin.nodes()}
    runs = running(b.admin)
    took = time.monotonic() - began
    assert took < QUICK, f"after {where}: the master took {took:.1f}s to list nodes and jobs"
    for name in REAL_NODES:
        node = nodes[name]
        assert node.status is NodeStatus.UP and node.connected, f"after {where}: {name} is {node.status}"
        assert node.info == b.nodes[name], f"after {where}: {name}'s record changed"
    assert runs == b.runs, f"after {where}: the running tasks changed"
    for framework in b.watched:
        assert framework.subscriptions == 1, f"after {where}: a framework lost its stream"
    log = (b.cluster.root / "master.log").read_text(errors="replace")
    assert not _TROUBLE.search(log), f"after {where}: the master logged\n{log[-3000:]}"
