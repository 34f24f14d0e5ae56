"""What a master restart must keep, on SimCluster over many seeds: frameworks (their tasks,
unacknowledged updates and subscriptions) and moves (migrations, make-before-break copies),
with the ledger's invariants checked after every delivery."""

from __future__ import annotations

import random

import pytest

from shoal.framework import protocol as p
from shoal.model import TaskState
from shoal.testing.sim import SimCluster, sim_node

SEEDS = range(20)


def cluster(seed: int, n: int = 3) -> SimCluster:
    sim = SimCluster([sim_node(f"node{i}") for i in range(1, n + 1)], seed=seed)
    sim.advance(1.0)  # agents register
    return sim


@pytest.mark.parametrize("seed", SEEDS)
def test_a_framework_s_tasks_each_run_once_and_are_told_across_master_restarts(seed: int) -> None:
    rng = random.Random(seed)
    sim = cluster(seed)
    launches = [
        p.TaskLaunch(name=f"t{i}", command=f"sleep {1 + i % 3}", resources={"cpus": 1}) for i in range(8)
    ]
    framework = sim.add_framework("sweep", launches)
    for _ in range(2):
        sim.advance(rng.uniform(0.2, 3.0))
        sim.restart_master()
    sim.run_until(lambda: all(framework.ended(t.name) for t in launches), limit=120)
    assert {t.name: framework.told[t.name][-1] for t in launches} == {
        t.name: TaskState.FINISHED for t in launches
    }
    jobs = [j for j in sim.master.ledger.jobs.values() if j.framework == framework.id]
    assert sorted(j.spec.name for j in jobs) == sorted(t.name for t in launches)
    assert all(sim.spawns[f"{j.id}.0"] == 1 for j in jobs)  # none ran twice
    sim.advance(11.0)  # past a redelivery: everything told was acknowledged
    assert sim.store.load().updates == []


SERVICE = {
    "command": "sleep 1000",
    "resources": {"cpus": 1},
    "ports": ["web"],
    "migrate": "make-before-break",
    "health": {"tcp": "web"},
}


@pytest.mark.parametrize("seed", SEEDS)
def test_a_make_before_break_drain_completes_across_a_master_restart(seed: int) -> None:
    rng = random.Random(seed)
    sim = cluster(seed)
    job = sim.submit({**SERVICE, "constraints": ["name != node3"]})
    [task] = sim.master.ledger.tasks_of(job)
    sim.run_until(lambda: sim.master.ledger.tasks_of(job)[0].state is TaskState.RUNNING)
    source = sim.master.ledger.tasks_of(job)[0].node
    sim.drain(source)
    sim.advance(rng.uniform(0.0, 1.0))  # the restart lands before, during or after the switch
    sim.restart_master()

    def moved() -> bool:
        now = sim.master.ledger.tasks_of(job)[0]
        return now.node not in (source, "node3") and now.successor is None and now.state is TaskState.RUNNING

    sim.run_until(moved, limit=60)
    sim.advance(5.0)  # the replaced copy is stopped
    now = sim.master.ledger.tasks_of(job)[0]
    assert sim.live_processes(task.id) == [now.node]  # one copy, where the ledger says
    assert now.history[-1].state is TaskState.MIGRATED
    [move] = [m for m in sim.master.ledger.migrations.values() if m.task_id == task.id]
    assert move.running_at is not None and move.node == now.node and not move.failed


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("restart_after", [0.0, 0.003, 0.05])
def test_a_restart_migration_lands_once_across_a_master_restart(seed: int, restart_after: float) -> None:
    """The master restarts as its Kill is on the way (lost with the connection), or as the
    task is stopping, or once it has moved: the move completes, once, within the job's rules."""
    sim = cluster(seed)
    job = sim.submit({"command": "sleep 1000", "count": 2, "resources": {"cpus": 1}, "max_per_node": 1})
    sim.run_until(lambda: all(t.state is TaskState.RUNNING for t in sim.master.ledger.tasks_of(job)))
    first = sim.master.ledger.tasks_of(job)[0]
    source = first.node
    sim.drain(source)
    sim.advance(restart_after)
    sim.restart_master()

    def moved() -> bool:
        tasks = sim.master.ledger.tasks_of(job)
        return all(t.state is TaskState.RUNNING and t.node != source for t in tasks)

    sim.run_until(moved, limit=60)
    tasks = sim.master.ledger.tasks_of(job)
    assert len({t.node for t in tasks}) == 2  # max_per_node held on the way
    for t in tasks:
        assert sim.live_processes(t.id) == [t.node]
    [move] = [m for m in sim.master.ledger.migrations.values() if m.task_id == first.id]
    assert move.running_at is not None and move.node == sim.master.ledger.tasks[first.id].node
