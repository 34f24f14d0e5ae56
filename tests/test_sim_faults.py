"""Fault cases on SimCluster: the real state machines and codec, a virtual clock, many seeds."""

from __future__ import annotations

import pytest

from shoal.core.scheduler import Policy, QueuePolicy
from shoal.errors import SpecError
from shoal.model import JobState, NodeStatus, TaskState
from shoal.testing.sim import SimCluster, sim_node

SEEDS = range(25)


def cluster(seed: int, n: int = 2, **kw) -> SimCluster:
    sim = SimCluster([sim_node(f"node{i}") for i in range(1, n + 1)], seed=seed, **kw)
    sim.advance(1.0)  # agents register
    return sim


def job_state(sim: SimCluster, job_id: int) -> JobState:
    from shoal.model import job_state as derive

    return derive(sim.master.ledger.jobs[job_id], sim.master.ledger.tasks_of(job_id))


@pytest.mark.parametrize("seed", SEEDS)
def test_tasks_run_and_finish(seed: int) -> None:
    sim = cluster(seed)
    job = sim.submit({"command": "sleep 2", "count": 4, "resources": {"cpus": 1}})
    sim.advance(0.5)
    assert {t.state for t in sim.master.ledger.tasks_of(job)} == {TaskState.RUNNING}
    sim.run_until(lambda: job_state(sim, job) is JobState.COMPLETE)
    assert all(sim.spawns[t.id] == 1 for t in sim.master.ledger.tasks_of(job))
    # acknowledged end states leave the agents' tables
    sim.advance(1.0)
    assert all(not n.state.runs for n in sim.nodes.values())


@pytest.mark.parametrize("seed", SEEDS)
def test_exit_codes_are_kept(seed: int) -> None:
    sim = cluster(seed)
    job = sim.submit({"command": "exit 3"})
    sim.run_until(lambda: job_state(sim, job) is JobState.FAILED)
    (task,) = sim.master.ledger.tasks_of(job)
    assert (task.state, task.exit_code) == (TaskState.FAILED, 3)


@pytest.mark.parametrize("seed", SEEDS)
def test_kill_stops_every_process(seed: int) -> None:
    sim = cluster(seed)
    job = sim.submit({"command": "sleep 100", "count": 3, "resources": {"cpus": 1}})
    sim.advance(1.0)
    sim.kill_job(job)
    sim.run_until(lambda: job_state(sim, job) is JobState.KILLED)
    assert all(sim.live_processes(t.id) == [] for t in sim.master.ledger.tasks_of(job))


@pytest.mark.parametrize("seed", SEEDS)
def test_lost_agent_tasks_rerun_elsewhere(seed: int) -> None:
    sim = cluster(seed, heartbeat_timeout=3.0)
    job = sim.submit(
        {"command": "sleep 30", "count": 2, "resources": {"cpus": 3}, "restart": {"attempts": 1, "delay": 0}}
    )
    sim.advance(1.0)
    victim = sim.master.ledger.tasks[f"{job}.0"].node
    survivor = "node2" if victim == "node1" else "node1"
    sim.kill_agent(victim)
    sim.advance(3.0 + 1.0)  # within the heartbeat timeout plus one master tick
    assert sim.master.ledger.nodes[victim].status is NodeStatus.DOWN
    task = sim.master.ledger.tasks[f"{job}.0"]
    assert task.history[0].state is TaskState.LOST
    # the survivor is full (3 of 4 cpus in use) until the other task ends; then it reruns there
    sim.run_until(lambda: sim.master.ledger.tasks[f"{job}.0"].state is TaskState.RUNNING, limit=60)
    assert sim.master.ledger.tasks[f"{job}.0"].node == survivor
    assert sim.master.ledger.tasks[f"{job}.0"].attempt == 1


@pytest.mark.parametrize("seed", SEEDS)
def test_lost_without_attempts_left_stays_lost(seed: int) -> None:
    sim = cluster(seed, heartbeat_timeout=3.0)
    job = sim.submit({"command": "sleep 30"})
    sim.advance(1.0)
    sim.kill_agent(sim.master.ledger.tasks[f"{job}.0"].node)
    sim.advance(5.0)
    assert sim.master.ledger.tasks[f"{job}.0"].state is TaskState.LOST
    assert job_state(sim, job) is JobState.FAILED


@pytest.mark.parametrize("seed", SEEDS)
def test_master_restart_keeps_jobs_and_readopts_tasks(seed: int) -> None:
    sim = cluster(seed)
    running = sim.submit({"command": "sleep 10", "count": 2, "resources": {"cpus": 1}})
    sim.advance(1.0)
    queued = sim.submit({"command": "sleep 1", "count": 20, "resources": {"cpus": 4}})
    sim.restart_master()  # nothing in flight survives, only the store
    assert set(sim.master.ledger.jobs) == {running, queued}
    sim.run_until(lambda: job_state(sim, running) is JobState.COMPLETE, limit=30)
    assert all(sim.spawns[t.id] == 1 for t in sim.master.ledger.tasks_of(running)), "a task ran twice"
    sim.run_until(lambda: job_state(sim, queued) is JobState.COMPLETE, limit=60)
    assert all(sim.spawns[t.id] == 1 for t in sim.master.ledger.tasks_of(queued))


@pytest.mark.parametrize("seed", SEEDS)
def test_kill_while_agents_are_away_reaches_them_when_they_return(seed: int) -> None:
    sim = cluster(seed)
    job = sim.submit({"command": "sleep 100", "count": 2, "resources": {"cpus": 1}})
    sim.advance(1.0)
    sim.restart_master()
    sim.kill_job(job)  # before any agent has reconnected: the kill frames go nowhere
    sim.run_until(lambda: job_state(sim, job) is JobState.KILLED, limit=10)
    assert all(sim.live_processes(t.id) == [] for t in sim.master.ledger.tasks_of(job))


@pytest.mark.parametrize("seed", SEEDS)
def test_agent_restart_readopts_its_runs(seed: int) -> None:
    sim = cluster(seed)
    job = sim.submit({"command": "sleep 5", "resources": {"cpus": 1}})
    sim.advance(1.0)
    node = sim.master.ledger.tasks[f"{job}.0"].node
    sim.restart_agent(node)
    sim.advance(1.0)
    assert sim.master.ledger.tasks[f"{job}.0"].state is TaskState.RUNNING
    sim.run_until(lambda: job_state(sim, job) is JobState.COMPLETE)
    assert sim.spawns[f"{job}.0"] == 1


@pytest.mark.parametrize("seed", SEEDS)
def test_run_that_ends_while_its_agent_is_away_reports_its_exit(seed: int) -> None:
    sim = SimCluster([sim_node("node1")], seed=seed, runtime=lambda spec: (2.0, 7))
    job = sim.submit({"command": "work"})
    sim.advance(1.0)
    assert sim.master.ledger.tasks[f"{job}.0"].state is TaskState.RUNNING
    sim.stop_agent("node1")
    sim.advance(2.0)  # the process ends meanwhile; the node is not yet timed out
    sim.start_agent("node1")
    sim.run_until(lambda: sim.master.ledger.tasks[f"{job}.0"].state.terminal, limit=10)
    task = sim.master.ledger.tasks[f"{job}.0"]
    assert (task.state, task.exit_code) == (TaskState.FAILED, 7)
    assert sim.spawns[f"{job}.0"] == 1


@pytest.mark.parametrize("seed", SEEDS)
def test_partitioned_node_orphans_are_killed_after_heal(seed: int) -> None:
    sim = cluster(seed, heartbeat_timeout=3.0)
    job = sim.submit(
        {"command": "sleep 60", "resources": {"cpus": 1}, "restart": {"attempts": 2, "delay": 0}}
    )
    sim.advance(1.0)
    first = sim.master.ledger.tasks[f"{job}.0"].node
    sim.partition(first)
    sim.advance(5.0)
    task = sim.master.ledger.tasks[f"{job}.0"]
    assert task.attempt == 1 and task.node != first and task.state is TaskState.RUNNING
    sim.heal(first)
    sim.advance(2.0)
    assert sim.live_processes(f"{job}.0") == [task.node], "the orphan on the healed node still runs"


def test_unschedulable_spec_is_refused_with_the_reason() -> None:
    sim = cluster(0)
    with pytest.raises(SpecError) as info:
        sim.submit({"command": "x", "resources": {"cpus": 64}})
    assert info.value.field == "resources"
    assert info.value.reason == "unschedulable: needs 64 cpus, the largest node has 4"
    assert sim.master.ledger.jobs == {}


@pytest.mark.parametrize("seed", SEEDS)
def test_priority_preempts_lower_work_which_requeues_and_runs_later(seed: int) -> None:
    sim = cluster(seed)  # 2 nodes of 4 cpus
    low = sim.submit({"command": "sleep 20", "count": 8, "resources": {"cpus": 1}, "priority": 1})
    sim.advance(1.0)
    assert all(t.state is TaskState.RUNNING for t in sim.master.ledger.tasks_of(low))
    high = sim.submit({"command": "sleep 5", "count": 2, "resources": {"cpus": 2}, "priority": 10})
    sim.run_until(
        lambda: all(t.state is TaskState.RUNNING for t in sim.master.ledger.tasks_of(high)), limit=10
    )
    preempted = [
        t for t in sim.master.ledger.tasks_of(low) if t.history and t.history[-1].state is TaskState.PREEMPTED
    ]
    assert len(preempted) == 4  # exactly the room of the two high tasks
    assert all(t.history[-1].message == f"preempted for job {high}" for t in preempted)
    sim.run_until(lambda: job_state(sim, low) is JobState.COMPLETE, limit=120)
    assert job_state(sim, high) is JobState.COMPLETE


def test_a_job_for_a_missing_queue_is_refused() -> None:
    sim = cluster(0)
    with pytest.raises(SpecError) as info:
        sim.submit({"command": "x", "queue": "gpu"})
    assert info.value.field == "queue" and "the queues are: default" in info.value.reason


@pytest.mark.parametrize("seed", SEEDS)
def test_a_queue_takes_back_its_guarantee_from_a_borrower(seed: int) -> None:
    queues = {"default": QueuePolicy(), "x": QueuePolicy(guarantee=0.5), "y": QueuePolicy(guarantee=0.5)}
    sim = cluster(seed, policy=Policy(queues=queues))  # 2 nodes of 4 cpus
    borrower = sim.submit({"command": "sleep 100", "count": 8, "resources": {"cpus": 1}, "queue": "x"})
    sim.advance(1.0)
    assert sum(t.state is TaskState.RUNNING for t in sim.master.ledger.tasks_of(borrower)) == 8
    owner = sim.submit({"command": "sleep 100", "count": 4, "resources": {"cpus": 1}, "queue": "y"})
    sim.run_until(
        lambda: all(t.state is TaskState.RUNNING for t in sim.master.ledger.tasks_of(owner)), limit=10
    )
    assert sum(t.state is TaskState.RUNNING for t in sim.master.ledger.tasks_of(borrower)) == 4
    assert sum(t.state is TaskState.PENDING for t in sim.master.ledger.tasks_of(borrower)) == 4


def test_a_large_array_runs_to_the_end_a_slice_per_cycle(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("shoal.master.state.GROUP_CAP", 50)  # the same rule, at a size a test runs fast
    sim = SimCluster([sim_node(f"n{i}", cpus=64, mem=1 << 20) for i in range(4)], check=False)
    sim.advance(1.0)
    job = sim.submit({"command": "sleep 1", "count": 500, "resources": {"cpus": 0.01, "mem": 1}})
    sim.run(lambda: True)  # one event: the scheduling cycle of this instant
    stored = sim.store.load().tasks
    assert len(stored) == 50  # the first slice was placed; the rest is implied by the job row
    assert {t.state for t in stored} == {TaskState.ASSIGNED}
    sim.run_until(lambda: job_state(sim, job) is JobState.COMPLETE, limit=60)
    assert all(sim.spawns[t.id] == 1 for t in sim.master.ledger.tasks_of(job))


@pytest.mark.parametrize("seed", SEEDS)
def test_a_task_is_stopped_at_its_time_limit(seed: int) -> None:
    sim = cluster(seed)
    job = sim.submit({"command": "sleep 100", "time_limit": 2})
    sim.run_until(lambda: sim.master.ledger.tasks[f"{job}.0"].state.terminal, limit=10)
    task = sim.master.ledger.tasks[f"{job}.0"]
    assert task.state is TaskState.FAILED and task.message == "stopped at its time limit of 2s"
    # stopped at its limit, as the master saw it: each end is a link's latency (1-5 ms) late
    assert task.finished_at - task.started_at == pytest.approx(2.0, abs=0.004)


@pytest.mark.parametrize("seed", SEEDS)
def test_backfill_lets_short_jobs_pass_without_delaying_the_big_one(seed: int) -> None:
    sim = cluster(seed, n=1)  # one node of 4 cpus
    long = sim.submit({"command": "sleep 10", "resources": {"cpus": 3}, "time_limit": 12})
    sim.advance(1.0)
    big = sim.submit({"command": "sleep 1", "resources": {"cpus": 4}})
    short = sim.submit({"command": "sleep 2", "resources": {"cpus": 1}, "time_limit": 3})
    endless = sim.submit({"command": "sleep 2", "resources": {"cpus": 1}})
    sim.advance(0.5)
    assert sim.master.ledger.tasks[f"{short}.0"].state is TaskState.RUNNING  # fits before the reservation
    assert sim.master.ledger.tasks[f"{endless}.0"].state is TaskState.PENDING  # would delay it
    sim.run_until(lambda: sim.master.ledger.tasks[f"{big}.0"].state is TaskState.RUNNING, limit=20)
    started = sim.master.ledger.tasks[f"{big}.0"].started_at
    assert started <= sim.master.ledger.tasks[f"{long}.0"].finished_at + 1.0
