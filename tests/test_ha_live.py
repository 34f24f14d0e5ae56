"""Three masters on etcd with real agents: one leads, followers point at it, and a killed or
stopped leader is replaced without losing a job or disturbing a task that keeps running."""

from __future__ import annotations

import signal
import time

import httpx
import pytest

from shoal.model import JobSpec, TaskState
from shoal.testing.ha import HaCluster, ha_cluster
from shoal.testing.live import wait_for


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> HaCluster:
    with ha_cluster(tmp_path_factory.mktemp("ha"), masters=3, agents=2) as c:
        yield c


def _running(cluster: HaCluster, job_id: int) -> tuple[str, int, str | None]:
    with cluster.client() as c:
        task = c.job(job_id).tasks[0]
    return task.state.value, task.attempt, task.node


def test_one_leader_and_followers_point_at_it(cluster: HaCluster) -> None:
    listing = cluster.listing()
    assert sorted(m.name for m in listing) == cluster.names
    leaders = [m for m in listing if m.leader]
    assert len(leaders) == 1
    leader = leaders[0]
    headers = {"Authorization": f"Bearer {cluster.admin_token}"}
    for name in cluster.names:
        if name == leader.name:
            continue
        answer = httpx.get(f"{cluster.urls[name]}/v1/jobs?x=1", headers=headers)
        assert answer.status_code == 307
        assert answer.headers["location"] == f"{leader.url}/v1/jobs?x=1"
        assert answer.headers["x-shoal-leader"] == leader.url
        # The listing is every master's to give, and it needs a token like any call.
        assert httpx.get(f"{cluster.urls[name]}/v1/masters").status_code == 401
        assert httpx.get(f"{cluster.urls[name]}/v1/masters", headers=headers).status_code == 200


def test_a_killed_leader_is_replaced_and_running_work_is_kept(cluster: HaCluster) -> None:
    with cluster.client() as c:
        long = c.submit(JobSpec(command="sleep 300", resources={"cpus": 0.5}))
        wait_for(lambda: _running(cluster, long)[0] == "running", what="the long task running")
        before = _running(cluster, long)
        done = c.submit(JobSpec(command="true", resources={"cpus": 0.1}))
        assert c.wait(done, timeout=30).state.value == "complete"
    old = cluster.leader()
    killed = time.monotonic()
    cluster.kill_master(old)
    with cluster.client() as c:
        after_kill = c.submit(JobSpec(command="true", resources={"cpus": 0.1}))  # follows to the new leader
        accepted = time.monotonic() - killed
        assert c.wait(after_kill, timeout=30).state.value == "complete"
        assert c.job(done).state.value == "complete"  # acknowledged before the kill: kept
    new = cluster.leader()
    assert new != old
    assert accepted < 10, f"a submission waited {accepted:.1f}s for a new leader"
    # The task that kept running was re-adopted: same attempt, same node, never lost.
    assert _running(cluster, long) == before
    with cluster.client() as c:
        task = c.job(long).tasks[0]
        assert task.state is TaskState.RUNNING and not task.history
        c.kill(long)
    cluster.start_master_named(old)  # back as a follower
    wait_for(lambda: len(cluster.listing()) == 3, what="the old leader back as a follower")
    assert cluster.leader() == new


def test_a_stopped_leader_hands_over_at_once(cluster: HaCluster) -> None:
    old = cluster.leader()
    stopped = time.monotonic()
    cluster.kill_master(old, signal.SIGTERM)  # a graceful stop revokes the lease
    with cluster.client() as c:
        c.submit(JobSpec(command="true", resources={"cpus": 0.1}))
    handed = time.monotonic() - stopped
    assert cluster.leader() != old
    # Well under the lease's 2 s plus the 0.5 s etcd takes to notice an expiry.
    assert handed < 2.0, f"the handover took {handed:.1f}s"
    cluster.start_master_named(old)
    wait_for(lambda: len(cluster.listing()) == 3, what="the stopped master back")
