"""Frameworks against a real master and real agents: fair shares, failover, bad calls, restarts."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from shoal.client import ApiError
from shoal.framework import AsyncDriver, Driver, OfferInfo, Scheduler, TaskLaunch, TaskStatus
from shoal.model import JobSpec, TaskState
from shoal.testing.live import LiveCluster, live_cluster, wait_for
from shoal.testing.recorder import Recorder

pytestmark = pytest.mark.timeout(120)


def driver(cluster: LiveCluster, scheduler: Scheduler, name: str, **kw) -> Driver:
    return Driver(scheduler, name, url=cluster.url, token=cluster.admin_token, **kw)


def sleeper(name: str, cpus: float = 0.25, seconds: float = 300) -> TaskLaunch:
    return TaskLaunch(name=name, command=f"sleep {seconds}", resources={"cpus": cpus, "mem": 16})


def one_task_per_offer(prefix: str, seconds: float = 300) -> Callable[[Driver, list[OfferInfo]], None]:
    """Launch one small task on each offer that holds one; decline the rest for long."""
    serial = iter(range(10**6))

    def on_offers(d: Driver, offers: list[OfferInfo]) -> None:
        for offer in offers:
            if offer.resources.cpus >= 0.25 and offer.resources.mem >= 16:
                with contextlib.suppress(ApiError):  # rescinded meanwhile: there will be others
                    d.launch([offer.id], [sleeper(f"{prefix}{next(serial)}", seconds=seconds)])
            else:
                d.decline([offer.id], refuse_seconds=60)

    return on_offers


@pytest.fixture
def weighted(tmp_path: Path):
    settings = {"queues": json.dumps({"heavy": {"weight": 2}}), "offer_timeout": "2"}
    with live_cluster(tmp_path, agents=3, master_settings=settings) as cluster:
        yield cluster


def test_frameworks_weighted_one_and_two_share_a_full_cluster_a_third_and_two_thirds(weighted) -> None:
    """Both always want more; their tasks are short, so every second the cluster is divided
    anew. Sampled over time, their dominant shares settle at 1/3 and 2/3."""
    recorders = [
        Recorder(one_task_per_offer("l", seconds=1.5)),
        Recorder(one_task_per_offer("h", seconds=1.5)),
    ]
    light = driver(weighted, recorders[0], "light").start()
    heavy = driver(weighted, recorders[1], "heavy", role="heavy").start()
    with weighted.client() as client:
        # Whoever came first took the whole cluster; once both have seen a task of theirs
        # end, those first tasks are over and the cluster is being divided between them.
        wait_for(lambda: all(r.finished_any() for r in recorders), what="a task of each finished")
        samples = []
        for _ in range(30):
            tasks = {f.name: f.tasks for f in client.frameworks()}
            samples.append((tasks["light"] * 0.25 / 6, tasks["heavy"] * 0.25 / 6))
            time.sleep(0.2)
        listing = weighted.cli("frameworks")
    light.stop()
    heavy.stop()
    mean_light = sum(s[0] for s in samples) / len(samples)
    mean_heavy = sum(s[1] for s in samples) / len(samples)
    assert mean_light + mean_heavy > 0.8  # the cluster is kept busy
    assert mean_light / (mean_light + mean_heavy) == pytest.approx(1 / 3, abs=0.05)
    assert mean_heavy / (mean_light + mean_heavy) == pytest.approx(2 / 3, abs=0.05)
    assert listing.returncode == 0 and "light" in listing.stdout and "heavy" in listing.stdout


def test_a_framework_that_comes_back_within_its_failover_timeout_keeps_its_tasks(tmp_path: Path) -> None:
    with live_cluster(tmp_path, agents=1) as cluster:
        launched = threading.Event()

        def once(d: Driver, offers: list[OfferInfo]) -> None:
            if not launched.is_set():
                launched.set()
                d.launch([offers[0].id], [sleeper("keep")])

        first = Recorder(once)
        d1 = driver(cluster, first, "keeper", failover_timeout=3).start()
        wait_for(lambda: TaskState.RUNNING in first.states("keep"), what="the task running")
        framework_id = d1.framework_id
        d1.stop(failover=True)
        d1.join(10)

        second = Recorder()
        d2 = driver(cluster, second, "keeper", failover_timeout=3, framework_id=framework_id).start()
        assert d2.framework_id == framework_id
        d2.reconcile(["keep"])
        wait_for(lambda: TaskState.RUNNING in second.states("keep"), what="the task reported still running")
        with cluster.client() as client:
            [view] = client.frameworks()
            assert view.tasks == 1 and view.connected

            d2.stop(failover=True)
            d2.join(10)
            job_id = second.updates[-1].job_id
            wait_for(
                lambda: client.job(job_id).state.value == "killed",
                timeout=20,
                what="the task killed after the timeout",
            )
            assert client.frameworks() == []


def test_a_broken_framework_gets_clear_errors_and_disturbs_no_one(tmp_path: Path) -> None:
    # No offer is taken back for a starved framework (patience past the timeout): an offer
    # rescinded here has expired.
    settings = {"offer_timeout": "1.5", "offer_patience": "60"}
    with live_cluster(tmp_path, agents=2, master_settings=settings) as cluster:
        good = Recorder(one_task_per_offer("g"))
        good_driver = driver(cluster, good, "good").start()
        broken = Recorder()  # hoards its offers: answers none
        bad = driver(cluster, broken, "broken").start()
        wait_for(lambda: broken.offers or good.offers, what="offers")
        call = f"{cluster.url}/v1/frameworks/{bad.framework_id}/call"
        auth = {"Authorization": f"Bearer {cluster.admin_token}"}
        with httpx.Client(headers=auth) as http:
            garbage = http.post(call, content=b"{not json", headers={"content-type": "application/json"})
            assert garbage.status_code == 422 and "error" in garbage.json()
            unknown = http.post(call, json={"type": "launch_rockets"})
            assert unknown.status_code == 422 and "launch_rockets" in unknown.json()["error"]
        with pytest.raises(ApiError) as never_offered:
            bad.launch(["no-such-offer"], [sleeper("x")])
        assert never_offered.value.status == 409 and never_offered.value.fields[0].field == "offer_ids"
        stale = wait_for(lambda: broken.outstanding()[-1:], what="an offer")[0]
        with pytest.raises(ApiError) as too_big:  # checked past the offer: it stands, unused
            bad.launch([stale.id], [sleeper("huge", cpus=64)])
        assert too_big.value.status == 422 and too_big.value.fields[0].field == "tasks"
        wait_for(lambda: stale.id in broken.rescinded, timeout=5, what="the unanswered offer rescinded")
        with pytest.raises(ApiError) as expired:
            bad.launch([stale.id], [sleeper("late")])
        assert expired.value.status == 409 and expired.value.fields[0].field == "offer_ids"
        fresh = wait_for(
            lambda: [o for o in broken.outstanding() if o.id != stale.id][-1:], what="a new offer"
        )[0]
        bad.launch([fresh.id], [TaskLaunch(name="once", command="true", resources={"cpus": 0, "mem": 1})])
        with pytest.raises(ApiError) as twice:
            bad.launch([fresh.id], [sleeper("twice")])
        assert twice.value.status == 409
        # Meanwhile: the well-behaved framework runs its tasks and a native job completes.
        wait_for(
            lambda: any(TaskState.RUNNING in good.states(u.task) for u in good.updates), what="good running"
        )
        with cluster.client() as client:
            job = client.submit(JobSpec(command="true", resources={"cpus": 0.1, "mem": 16}))
            bad.stop()
            good_driver.stop()
            assert client.wait(job, timeout=30).state.value == "complete"


def test_status_updates_survive_a_master_sigkill_and_restart(tmp_path: Path) -> None:
    with live_cluster(tmp_path, agents=1) as cluster:
        launched = threading.Event()

        def once(d: Driver, offers: list[OfferInfo]) -> None:
            if not launched.is_set():
                launched.set()
                d.launch([offers[0].id], [TaskLaunch(name="brief", command="true", resources={"mem": 16})])

        recorder = Recorder(once)
        d = driver(cluster, recorder, "unacked", implicit_acknowledgements=False).start()
        wait_for(lambda: TaskState.FINISHED in recorder.states("brief"), what="the task finished")
        finished = next(u for u in recorder.updates if u.state is TaskState.FINISHED)
        cluster.restart_master()
        # The driver subscribes again by itself; what it did not acknowledge comes again.
        wait_for(
            lambda: recorder.states("brief").count(TaskState.FINISHED) >= 2, timeout=30, what="redelivery"
        )
        again = [u for u in recorder.updates if u.state is TaskState.FINISHED][-1]
        assert again.uuid == finished.uuid and again.job_id == finished.job_id
        d.acknowledge(*recorder.updates)
        seen, subscriptions = len(recorder.updates), recorder.subscriptions
        cluster.restart_master()
        wait_for(lambda: recorder.subscriptions > subscriptions, timeout=30, what="the driver back")
        # A subscription gets what is unacknowledged first; a reconciliation's answer comes
        # after it on the same stream, so by then anything redelivered would be here.
        d.reconcile(["brief"])
        wait_for(lambda: len(recorder.updates) > seen, what="the reconciliation answered")
        [answer] = recorder.updates[seen:]  # acknowledged: not delivered again
        assert (answer.task, answer.state, answer.uuid) == ("brief", TaskState.FINISHED, None)
        d.stop()


EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_the_sweep_example_runs_every_task_and_retries_failures(tmp_path: Path) -> None:
    marks = tmp_path / "marks"
    marks.mkdir()
    # Every fourth task fails on its first run only.
    command = f"if [ $(({{i}} % 4)) -eq 0 ] && mkdir {marks}/{{i}} 2>/dev/null; then exit 1; fi"
    with live_cluster(tmp_path / "cluster", agents=2) as cluster:
        result = subprocess.run(
            [sys.executable, str(EXAMPLES / "sweep.py"), "--tasks", "20", "--command", command, "--json"],
            env=cluster.cli_env(),
            capture_output=True,
            text=True,
            timeout=90,
        )
        assert result.returncode == 0, result.stderr
        summary = json.loads(result.stdout.strip().splitlines()[-1])
        assert summary["finished"] == 20 and summary["failed"] == 0 and summary["retried"] == 5
        assert sorted(int(p.name) for p in marks.iterdir()) == [0, 4, 8, 12, 16]
        with cluster.client() as client:
            assert client.frameworks() == []  # it tore itself down


def test_the_keeper_example_replaces_replicas_lost_with_their_node(tmp_path: Path) -> None:
    with live_cluster(tmp_path, agents=3) as cluster:
        keeper = subprocess.Popen(
            [sys.executable, str(EXAMPLES / "keeper.py"), "--replicas", "2", "--command", "sleep 300"],
            env=cluster.cli_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            with cluster.client() as client:

                def replicas() -> dict[str, str]:
                    return {
                        job.name: task.node
                        for job in client.jobs()
                        if job.state.value == "running"
                        for task in [client.task(f"{job.id}.0")]
                        if task.state is TaskState.RUNNING and task.node
                    }

                first = wait_for(lambda: (r := replicas()) and len(r) == 2 and r, what="two replicas")
                assert len(set(first.values())) == 2  # one a node
                victim = next(iter(first.values()))
                cluster.kill_agent(victim)
                then = wait_for(
                    lambda: (r := replicas()) and len(r) == 2 and victim not in r.values() and r,
                    timeout=30,
                    what="a replacement replica",
                )
                assert set(then) != set(first)
        finally:
            keeper.send_signal(signal.SIGINT)
            keeper.wait(20)
        with cluster.client() as client:
            wait_for(lambda: client.frameworks() == [], what="the keeper torn down on Ctrl-C")


def test_the_asyncio_driver_runs_coroutine_callbacks(tmp_path: Path) -> None:
    class Once(Scheduler):
        def __init__(self) -> None:
            self.launched = False
            self.seen: list[TaskState] = []

        async def resource_offers(self, driver: AsyncDriver, offers: list[OfferInfo]) -> None:
            if not self.launched:
                self.launched = True
                await driver.launch(
                    [offers[0].id], [TaskLaunch(name="hi", command="echo hi", resources={"mem": 16})]
                )
            await driver.decline([o.id for o in offers[1:]])

        async def status_update(self, driver: AsyncDriver, status: TaskStatus) -> None:
            self.seen.append(status.state)
            if status.state.terminal:
                await driver.stop()

    with live_cluster(tmp_path, agents=1) as cluster:
        scheduler = Once()
        runner = AsyncDriver(scheduler, "async", url=cluster.url, token=cluster.admin_token)
        asyncio.run(asyncio.wait_for(runner.run(), 30))
        assert scheduler.seen[-1] is TaskState.FINISHED
        with cluster.client() as client:
            job = next(j for j in client.jobs() if j.name == "hi")
            assert client.logs(f"{job.id}.0") == b"hi\n"
            assert client.frameworks() == []
