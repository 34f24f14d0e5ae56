"""A real master and two real agents on loopback: the fault cases of SimCluster, live."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import psutil
import pytest

from shoal.client import ApiError
from shoal.model import JobSpec, JobState, Role, TaskState
from shoal.testing.live import LiveCluster, live_cluster, wait_for


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    """One cluster for the tests that leave it as they found it: every job they start ends
    before they return, and no process of the cluster is stopped."""
    with live_cluster(tmp_path_factory.mktemp("live"), agents=2) as c:
        yield c


@pytest.fixture
def own(tmp_path: Path):
    """A cluster of the test's own: it kills or restarts a process, or lists every job."""
    with live_cluster(tmp_path, agents=2) as c:
        yield c


def task_groups(task_id: str) -> set[int]:
    """Process groups of live processes that belong to `task_id`."""
    groups = set()
    for proc in psutil.process_iter(["environ", "status"]):
        try:
            if (
                proc.info["status"] != psutil.STATUS_ZOMBIE
                and (proc.info["environ"] or {}).get("SHOAL_TASK_ID") == task_id
            ):
                groups.add(os.getpgid(proc.pid))
        except (psutil.Error, ProcessLookupError):
            continue
    return groups


def test_agent_killed_tasks_are_lost_and_rerun_on_the_other_agent(own: LiveCluster) -> None:
    cluster = own
    with cluster.client() as client:
        job = client.submit(
            JobSpec(command="sleep 300", resources={"cpus": 1}, restart={"attempts": 1, "delay": 0})
        )
        first = wait_for(
            lambda: (
                client.task(f"{job}.0").node if client.task(f"{job}.0").state is TaskState.RUNNING else None
            )
        )
        cluster.kill_agent(first)
        task = wait_for(
            lambda: (t := client.task(f"{job}.0")).attempt == 1 and t.state is TaskState.RUNNING and t,
            timeout=cluster.heartbeat_timeout + 10,
            what="the task running again",
        )
        assert task.history[0].state is TaskState.LOST and task.history[0].node == first
        assert task.node != first


def test_master_killed_and_restarted_keeps_jobs_and_readopts_tasks(own: LiveCluster) -> None:
    cluster = own
    with cluster.client() as client:
        done = client.submit(JobSpec(command="true", resources={"cpus": 0.1}))
        client.wait(done, timeout=30)
        running = client.submit(JobSpec(command="sleep 300", count=2, resources={"cpus": 1}))
        wait_for(lambda: all(t.state is TaskState.RUNNING for t in client.job(running).tasks))
        groups = {t.id: task_groups(t.id) for t in client.job(running).tasks}
        cluster.restart_master()
        cluster.wait_nodes_up()
        assert client.job(done).state is JobState.COMPLETE
        view = client.job(running)
        assert all(t.state is TaskState.RUNNING and t.attempt == 0 for t in view.tasks)
        # still the very same processes: re-adopted, not started twice
        assert {t.id: task_groups(t.id) for t in view.tasks} == groups
        assert all(len(g) == 1 for g in groups.values())
        # and still under control: a kill reaches them
        client.kill(running)
        assert client.wait(running, timeout=15).state is JobState.KILLED


def test_agent_restart_readopts_its_running_task(own: LiveCluster) -> None:
    cluster = own
    with cluster.client() as client:
        job = client.submit(JobSpec(command="sleep 1.5; exit 4", resources={"cpus": 1}))
        node = wait_for(
            lambda: (
                client.task(f"{job}.0").node if client.task(f"{job}.0").state is TaskState.RUNNING else None
            )
        )
        cluster.kill_agent(node)
        cluster.start_agent(node)
        view = client.wait(job, timeout=20)
        assert (view.tasks[0].state, view.tasks[0].exit_code, view.tasks[0].attempt) == (
            TaskState.FAILED,
            4,
            0,
        )


def test_bad_input_auth_and_ownership(own: LiveCluster) -> None:
    cluster = own
    auth = {"Authorization": f"Bearer {cluster.admin_token}"}
    with httpx.Client(base_url=cluster.url, headers=auth) as http:
        bad = http.post("/v1/jobs", json={"command": "x", "resources": {"cpus": -1}})
        assert bad.status_code == 422 and bad.json()["fields"][0]["field"] == "resources.cpus"
        huge = http.post("/v1/jobs", json={"command": "x", "resources": {"cpus": 64}})
        assert huge.status_code == 422
        assert huge.json()["error"] == "unschedulable: needs 64 cpus, the largest node has 2"
        garbage = http.post("/v1/jobs", content=b"{not json", headers={"Content-Type": "application/json"})
        assert garbage.status_code == 422
    assert httpx.get(f"{cluster.url}/v1/jobs").status_code == 401
    assert httpx.get(f"{cluster.url}/v1/jobs", headers={"Authorization": "Bearer nope"}).status_code == 401

    with cluster.client() as admin:
        alice = admin.create_token("alice", Role.USER).token
        bob = admin.create_token("bob", Role.USER).token
        reader = admin.create_token("rita", Role.READER).token
    with cluster.client(alice) as a, cluster.client(bob) as b, cluster.client(reader) as r:
        job = a.submit(JobSpec(command="sleep 60", resources={"cpus": 0.1}))
        assert [j.id for j in b.jobs()] == []
        with pytest.raises(ApiError) as not_his:
            b.kill(job)
        assert not_his.value.status == 403
        with pytest.raises(ApiError) as not_his_either:
            b.logs(f"{job}.0")
        assert not_his_either.value.status == 403
        with pytest.raises(ApiError) as missing:
            b.kill(job + 100)
        assert missing.value.status == 404
        assert [j.id for j in r.jobs()] == [job]
        with pytest.raises(ApiError) as refused:
            r.kill(job)
        assert refused.value.status == 403
        with pytest.raises(ApiError) as not_admin:
            a.create_token("mallory", Role.ADMIN)
        assert not_admin.value.status == 403
        a.kill(job)
        assert a.wait(job, timeout=15).state is JobState.KILLED

    cli = cluster.cli("kill", str(job), token=bob)
    assert cli.returncode == 2 and "belongs to another user" in cli.stderr
    listed = cluster.cli("jobs", "--state", "killed", "--owner", "alice", "--json")
    assert [j["id"] for j in json.loads(listed.stdout)] == [job]
    theirs = cluster.cli("jobs", "--owner", "alice", token=bob)
    assert theirs.returncode == 2 and "owner=bob" in theirs.stderr


def test_concurrent_submissions_are_each_acknowledged_once(own: LiveCluster) -> None:
    cluster = own
    from concurrent.futures import ThreadPoolExecutor

    spec = JobSpec(command="true", resources={"cpus": 0.1})
    with cluster.client() as client, ThreadPoolExecutor(16) as pool:
        ids = list(pool.map(lambda _: client.submit(spec), range(64)))
        assert len(set(ids)) == 64
        for job_id in ids:
            assert client.wait(job_id, timeout=60).state is JobState.COMPLETE
        cluster.restart_master()  # every acknowledged submission is in the store
        kept = {j.id: j.state for j in client.jobs()}
        assert all(kept.get(job_id) is JobState.COMPLETE for job_id in ids)


def test_run_streams_output_and_propagates_exit_codes(cluster: LiveCluster) -> None:
    hi = cluster.cli("run", "--", "echo", "hi")
    assert (hi.returncode, hi.stdout) == (0, "hi\n")
    failing = cluster.cli("run", "--cpus", "0.5", "--", "sh", "-c", "echo out; echo err >&2; exit 3")
    assert (failing.returncode, failing.stdout, failing.stderr) == (3, "out\n", "err\n")
    many = cluster.cli("run", "-n", "3", "--cpus", "1", "--", "sh", "-c", 'echo "task $SHOAL_TASK_INDEX"')
    assert many.returncode == 0
    assert sorted(many.stdout.splitlines()) == ["0: task 0", "1: task 1", "2: task 2"]


def test_nodes_report_resources_labels_and_live_usage(cluster: LiveCluster) -> None:
    with cluster.client() as client:
        wait_for(lambda: all(n.usage.mem_used > 0 for n in client.nodes()), what="a heartbeat with usage")
        for node in client.nodes():
            assert node.info.labels == {"agent": node.name}
            assert (node.info.capacity.cpus, node.info.capacity.mem) == (2, 2048)
            assert node.info.attributes["os"] == "linux" and node.info.attributes["arch"]
            assert node.info.capacity.disk > 0


def test_job_tasks_spread_over_agents_and_logs_come_back(cluster: LiveCluster) -> None:
    with cluster.client() as client:
        job = client.submit(
            JobSpec(command="echo part-{index} $SHOAL_JOB_ID", count=4, resources={"cpus": 1})
        )
        view = client.wait(job, timeout=30)
        assert view.state is JobState.COMPLETE
        assert {t.node for t in view.tasks} == {"node1", "node2"}
        for t in view.tasks:
            assert client.logs(t.id) == f"part-{t.index} {job}\n".encode()
        assert b"".join(client.follow(f"{job}.0")) == f"part-0 {job}\n".encode()


def test_kill_leaves_no_process_of_the_task(cluster: LiveCluster) -> None:
    with cluster.client() as client:
        job = client.submit(
            JobSpec(
                command="sleep 300 & sleep 300 & trap '' TERM; wait", kill_grace=1, resources={"cpus": 0.5}
            )
        )
        wait_for(lambda: client.job(job).tasks[0].state is TaskState.RUNNING)
        wait_for(lambda: task_groups(f"{job}.0"), what="the task's processes")
        client.kill(job)
        assert client.wait(job, timeout=15).state is JobState.KILLED
        wait_for(lambda: not task_groups(f"{job}.0"), timeout=5, what="every process of the group gone")


def test_a_job_holding_a_nul_byte_is_refused_and_the_agents_stay_up(cluster: LiveCluster) -> None:
    """JSON carries NUL bytes, and no process can be given one: the master refuses such a
    job, naming the field (an agent given one anyway fails the run: see test_runner), and
    the agents run on."""
    with cluster.client() as client, pytest.raises(ApiError) as refused:
        client.submit({"command": ["echo", "a\0b"], "env": {"X": "y"}})
    assert refused.value.status == 422 and "command" in str(refused.value)
    assert all(proc.poll() is None for proc in cluster.agents.values())
    assert cluster.cli("run", "--", "echo", "hi").stdout == "hi\n"


def test_agent_with_a_wrong_token_is_refused(cluster: LiveCluster, tmp_path: Path) -> None:
    env = {**os.environ, "SHOAL_CLUSTER_TOKEN": "wrong"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "shoal",
            "agent",
            "--master",
            cluster.url,
            "--name",
            "intruder",
            "--state-dir",
            str(tmp_path / "intruder"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode != 0 and "refused the cluster token" in proc.stderr
    with cluster.client() as client:
        assert "intruder" not in {n.name for n in client.nodes()}


def test_tokens_never_reach_the_logs(cluster: LiveCluster) -> None:
    cluster.cli("run", "--", "true")
    logs = "".join(p.read_text() for p in cluster.root.glob("*.log"))
    assert "registered" in logs  # the logs do say things
    assert cluster.admin_token not in logs and cluster.cluster_token not in logs


def test_constraints_and_node_sets_steer_tasks(cluster: LiveCluster) -> None:
    pinned = cluster.cli("run", "-n", "2", "--cpus", "0.5", "-c", "agent == node2", "--", "true")
    assert pinned.returncode == 0, pinned.stderr
    nodeset = cluster.cli("run", "-n", "2", "--cpus", "0.5", "-w", "node[1]", "--", "true")
    assert nodeset.returncode == 0, nodeset.stderr
    with cluster.client() as client:
        jobs = sorted(client.jobs(), key=lambda j: j.id)[-2:]
        assert {t.node for t in client.job(jobs[0].id).tasks} == {"node2"}
        assert {t.node for t in client.job(jobs[1].id).tasks} == {"node1"}
        with pytest.raises(ApiError) as bad_set:
            client.submit(JobSpec(command="true", nodes="node[1-"))
        assert bad_set.value.status == 422 and bad_set.value.fields[0].field == "nodes"
        with pytest.raises(ApiError) as bad_constraint:
            client.submit({"command": "true", "constraints": ["rack r1"]})
        assert bad_constraint.value.status == 422 and bad_constraint.value.fields[0].field == "constraints"
        waiting = client.submit(
            JobSpec(command="true", constraints=["agent == node9"], resources={"cpus": 0.5})
        )
        view = wait_for(lambda: (v := client.job(waiting)).waiting and v)
        assert view.waiting == "2 nodes fail agent == node9"
        client.kill(waiting)


def test_tasks_are_held_to_their_cpus_and_memory(cluster: LiveCluster) -> None:
    burn = (
        "import time, resource\n"
        "end = time.time() + 2\n"
        "while time.time() < end: pass\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_utime)\n"
    )
    with cluster.client() as client:
        cpu = client.submit(
            JobSpec(command=[sys.executable, "-c", burn], resources={"cpus": 0.25, "mem": 256})
        )
        hog = client.submit(
            JobSpec(command=[sys.executable, "-c", "b = bytearray(400 * 2**20)"], resources={"mem": 128})
        )
        cpu_view, hog_view = client.wait(cpu, timeout=30), client.wait(hog, timeout=30)
        busy = float(client.logs(f"{cpu}.0").decode())
        assert busy < 0.25 * 2 * 1.6, f"{busy:.2f} cpu-seconds in 2 s at a quota of 0.25 cpus"
        assert cpu_view.state is JobState.COMPLETE
        assert hog_view.tasks[0].state is TaskState.FAILED and hog_view.tasks[0].exit_code in (-9, 137)
