"""Three masters on etcd with real agents: one leads, followers point at it, and a killed or
stopped leader is replaced without losing a job or disturbing a task that keeps running."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import httpx
import pytest

from shoal.client import Client
from shoal.framework import Driver, OfferInfo, TaskLaunch
from shoal.model import JobSpec, TaskState
from shoal.services import MASTER_SERVICE
from shoal.testing.ha import HaCluster, ha_cluster
from shoal.testing.live import wait_for
from shoal.testing.recorder import Recorder


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> HaCluster:
    # Agents find a new leader and register there within a second or two; on a machine the
    # whole suite loads, once not within the default 6 s of silence, and a task was lost.
    with ha_cluster(tmp_path_factory.mktemp("ha"), masters=3, agents=2, heartbeat_timeout=10.0) as c:
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
    # The registry lists them too, for clients that find masters through it (or its DNS).
    with cluster.client() as c:
        wait_for(lambda: len(c.service(MASTER_SERVICE)[0]) == 3, what="three masters in the registry")
        assert {e.meta["name"] for e in c.service(MASTER_SERVICE)[0]} == set(cluster.names)


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


def test_over_tls_a_client_and_an_agent_follow_a_killed_leader(tmp_path: Path) -> None:
    """Each master serves its own certificate of the cluster's authority: a client trusting
    the CA follows to the new leader, and the agent, joined with a bootstrap token, goes on
    there with its certificate and keeps its task."""
    with ha_cluster(tmp_path, masters=2, agents=1, tls=True) as tls:
        with tls.client() as c:
            long = c.submit(JobSpec(command="sleep 300", resources={"cpus": 0.5}))
            wait_for(lambda: _running(tls, long)[0] == "running", what="the long task running")
            before = _running(tls, long)
        old = tls.leader()
        tls.kill_master(old)
        with tls.client() as c:
            done = c.submit(JobSpec(command="true", resources={"cpus": 0.1}))  # follows to the new leader
            assert c.wait(done, timeout=30).state.value == "complete"  # run by the agent there
            assert tls.leader() != old
            assert _running(tls, long) == before and not c.job(long).tasks[0].history


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


def test_a_paused_leader_wakes_deposed_and_acts_no_more(cluster: HaCluster) -> None:
    """A leader frozen past its lease (a long GC pause, a stopped VM) is replaced; woken, it
    must not launch, kill or answer as leader: it follows the new one."""
    with cluster.client() as c:
        long = c.submit(JobSpec(command="sleep 300", resources={"cpus": 0.1}))
        wait_for(lambda: _running(cluster, long)[0] == "running", what="the long task running")
        before = _running(cluster, long)
    old = cluster.leader()
    proc = cluster.masters[old]
    # A frozen process's port still accepts connections (the kernel does), and a call to it
    # waits out its timeout: this client knows only the other masters.
    others = Client([url for name, url in cluster.urls.items() if name != old], cluster.admin_token)
    proc.send_signal(signal.SIGSTOP)
    try:
        with others:
            # Followers name the frozen leader until its lease runs out; then another leads.
            new = wait_for(
                lambda: next((m.name for m in others.masters() if m.leader and m.name != old), None),
                what="a new leader",
            )
            job = others.submit(JobSpec(command="true", resources={"cpus": 0.1}))
            # The agents hang up on the frozen master and find the new one: the job runs.
            assert others.wait(job, timeout=30).state.value == "complete"
    finally:
        proc.send_signal(signal.SIGCONT)
    headers = {"Authorization": f"Bearer {cluster.admin_token}"}
    answer = wait_for(
        lambda: (r := httpx.get(f"{cluster.urls[old]}/v1/jobs", headers=headers)).status_code == 307 and r,
        what="the woken master following",
    )
    assert answer.headers["x-shoal-leader"] == cluster.urls[new]
    assert cluster.leader() == new
    with cluster.client() as c:
        assert c.job(job).state.value == "complete"
        # The task that ran through it all is the same run: neither the frozen master nor
        # its agents' fencing stopped it, and the new leader adopted it.
        assert _running(cluster, long) == before
        assert not c.job(long).tasks[0].history
        c.kill(long)


def test_a_framework_follows_the_new_leader_with_its_tasks_and_updates(cluster: HaCluster) -> None:
    """Its subscription, its running task and the update it did not acknowledge outlive the
    leader; the new leader offers again and takes a launch."""
    launched: list[str] = []
    lock = threading.Lock()

    def launch(d: Driver, offers: list[OfferInfo]) -> None:
        with lock:
            wanted = [n for n in ("keeper", "brief", "after") if n not in launched]
            if not wanted or (wanted[0] == "after" and not killed.is_set()):
                d.decline([o.id for o in offers], refuse_seconds=0.5)
                return
            name = wanted[0]
            launched.append(name)
        command = "sleep 300" if name == "keeper" else "true"
        d.launch([offers[0].id], [TaskLaunch(name=name, command=command, resources={"cpus": 0.1, "mem": 16})])

    killed = threading.Event()
    recorder = Recorder(launch)
    d = Driver(recorder, "ha", url=cluster.url, token=cluster.admin_token, implicit_acknowledgements=False)
    d.start()
    try:
        wait_for(lambda: TaskState.FINISHED in recorder.states("brief"), timeout=30, what="brief finished")
        wait_for(lambda: TaskState.RUNNING in recorder.states("keeper"), timeout=30, what="keeper running")
        unacked = next(u for u in recorder.updates if u.task == "brief" and u.state is TaskState.FINISHED)
        subscriptions = recorder.subscriptions
        cluster.kill_master(cluster.leader())
        killed.set()
        wait_for(
            lambda: recorder.subscriptions > subscriptions, timeout=30, what="the driver at the new leader"
        )
        wait_for(
            lambda: sum(u.uuid == unacked.uuid for u in recorder.updates) >= 2, timeout=30, what="redelivery"
        )
        wait_for(lambda: TaskState.FINISHED in recorder.states("after"), timeout=30, what="a launch after")
        assert TaskState.LOST not in recorder.states("keeper")
        with cluster.client() as c:
            keeper = next(f for f in c.frameworks() if f.name == "ha")
            assert keeper.connected
    finally:
        d.stop()
    cluster.start_master_named(next(n for n in cluster.names if n not in cluster.masters))
    wait_for(lambda: len(cluster.listing()) == 3, what="all three masters back")
