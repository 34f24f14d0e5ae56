"""`shoal sim`: the real scheduler and state machines on a simulated cluster and workload.

A workload is a list of arrivals: when a job is submitted, how long each of its tasks runs,
what they ask for, and whose and where they are. It comes from a generator (Poisson
arrivals, exponential durations, seeded) or a trace file, in either of two formats:

    CSV    submit,duration,cpus,mem,count,user,queue,priority    (a header row; the last
           five columns may be left out: count 1, user "sim", queue "default", priority 0)
    JSONL  {"submit": 0.0, "duration": 30, "cpus": 1, "mem": 512, "count": 4, "user": "ann"}

Times are seconds from the start. The run is SimCluster (the master's and agents' real state
machines, the real codec, a virtual clock): every scheduling decision is the one a live
master would make. The report holds throughput, wait-time percentiles per queue and per
user, mean utilization, preemptions, and samples of utilization and queue length over time.
"""

from __future__ import annotations

import csv
import json
import math
import random
import sys
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from shoal.core.scheduler import Policy
from shoal.errors import SpecError
from shoal.master.ledger import Retention
from shoal.model import JobSpec, Resources, TaskState
from shoal.testing.sim import SimCluster, sim_node


@dataclass(frozen=True, slots=True)
class Arrival:
    submit: float
    duration: float
    cpus: float = 1.0
    mem: int = 256
    count: int = 1
    user: str = "sim"
    queue: str = "default"
    priority: int = 0

    def spec(self) -> JobSpec:
        return JobSpec(
            command=f"sleep {self.duration:.3f}",
            count=self.count,
            resources=Resources(cpus=self.cpus, mem=self.mem),
            queue=self.queue,
            priority=self.priority,
        )


_FIELDS = ("submit", "duration", "cpus", "mem", "count", "user", "queue", "priority")
_TYPES: dict[str, Callable[[str], object]] = {
    "submit": float,
    "duration": float,
    "cpus": float,
    "mem": int,
    "count": int,
    "user": str,
    "queue": str,
    "priority": int,
}


def load_trace(path: Path) -> list[Arrival]:
    """Arrivals from a CSV or JSONL trace; ValueError naming the line that is wrong."""
    text = path.read_text()
    rows: Iterable[dict[str, object]]
    if path.suffix == ".jsonl":
        rows = (json.loads(line) for line in text.splitlines() if line.strip())
    else:
        rows = csv.DictReader(text.splitlines())
    arrivals = []
    for number, row in enumerate(rows, start=1):
        try:
            unknown = set(row) - set(_FIELDS)
            if unknown:
                raise ValueError(f"unknown columns {sorted(unknown)}")
            values = {k: _TYPES[k](v) for k, v in row.items() if v not in (None, "")}
            arrivals.append(Arrival(**values))  # type: ignore[arg-type]
        except (TypeError, ValueError) as e:
            raise ValueError(f"{path}: record {number}: {e}") from None
    return sorted(arrivals, key=lambda a: a.submit)


def generate(
    jobs: int,
    seed: int = 0,
    rate: float = 1.0,
    mean_duration: float = 60.0,
    users: Iterable[str] = ("ann", "bob", "cy"),
    queues: Iterable[str] = ("default",),
) -> list[Arrival]:
    """A seeded synthetic workload: Poisson arrivals at `rate` jobs/s, exponential durations."""
    rng = random.Random(seed)
    users, queues = list(users), list(queues)
    now = 0.0
    arrivals = []
    for _ in range(jobs):
        now += rng.expovariate(rate)
        arrivals.append(
            Arrival(
                submit=round(now, 3),
                duration=round(max(1.0, rng.expovariate(1 / mean_duration)), 1),
                cpus=rng.choice([0.5, 1, 1, 2, 4]),
                mem=rng.choice([256, 512, 1024, 4096]),
                count=rng.choice([1, 1, 1, 2, 4, 8]),
                user=rng.choice(users),
                queue=rng.choice(queues),
                priority=rng.choice([0, 0, 0, 5]),
            )
        )
    return arrivals


@dataclass
class Report:
    jobs: int
    tasks: int
    makespan: float
    throughput: float  # tasks finished per virtual hour
    mean_utilization: float
    preemptions: int
    wait_by_queue: dict[str, dict[str, float]]
    wait_by_user: dict[str, dict[str, float]]
    samples: list[tuple[float, float, int]] = field(default_factory=list)  # (time, utilization, queued)

    def summary(self) -> dict[str, object]:
        """Everything but the samples: the figures a script wants."""
        return {k: v for k, v in self.__dict__.items() if k != "samples"}


def simulate(
    arrivals: list[Arrival],
    nodes: int,
    cpus: float,
    mem: int,
    policy: Policy | None = None,
    seed: int = 0,
    sample_every: float = 10.0,
    progress: Callable[[int], None] = lambda done: None,
) -> Report:
    """Run `arrivals` on `nodes` simulated nodes until every job has ended."""
    sim = SimCluster(
        [sim_node(f"node{i}", cpus=cpus, mem=mem) for i in range(1, nodes + 1)],
        seed=seed,
        heartbeat_timeout=1e9,
        policy=policy,
        # The report reads every job at the end: nothing finished is pruned before it.
        retention=Retention(age=math.inf, count=sys.maxsize),
        check=False,
    )
    sim.advance(1.0)
    start = sim.now
    job_of: dict[int, Arrival] = {}
    samples: list[tuple[float, float, int]] = []
    total_cpus = nodes * cpus
    pending = list(reversed(arrivals))
    # However badly things go, a serial run of everything ends by then.
    horizon = (
        start
        + max((a.submit for a in arrivals), default=0)
        + sum(a.duration * a.count for a in arrivals)
        + 60
    )
    finished = 0
    while (pending or finished < len(sim.master.ledger.tasks)) and sim.now < horizon:
        due = start + pending[-1].submit if pending else math.inf
        sim.advance(min(sample_every, max(0.0, due - sim.now)))
        while pending and start + pending[-1].submit <= sim.now:
            arrival = pending.pop()
            try:
                job_id = sim.submit(arrival.spec(), owner=arrival.user)
            except SpecError:
                continue  # refused as a live master would refuse it; not part of the run
            job_of[job_id] = arrival
        used = float(sim.master.ledger.table.allocated[:, 0].sum())
        queued = sum(len(ids) for ids in sim.master.ledger.pending.values())
        samples.append((sim.now - start, used / total_cpus, queued))
        now_finished = sum(1 for t in sim.master.ledger.tasks.values() if t.state.terminal)
        progress(now_finished - finished)
        finished = now_finished
    return _report(sim, job_of, samples)


def _report(sim: SimCluster, job_of: dict[int, Arrival], samples: list[tuple[float, float, int]]) -> Report:
    waits_q: dict[str, list[float]] = defaultdict(list)
    waits_u: dict[str, list[float]] = defaultdict(list)
    preemptions = 0
    for task in sim.master.ledger.tasks.values():
        job = sim.master.ledger.jobs[task.job_id]
        first = task.history[0].started_at if task.history else task.started_at
        preemptions += sum(a.state is TaskState.PREEMPTED for a in task.history)
        if first is not None:
            waits_q[job.spec.queue].append(first - job.submitted_at)
            waits_u[job.owner].append(first - job.submitted_at)
    makespan = samples[-1][0] if samples else 0.0
    tasks = len(sim.master.ledger.tasks)
    return Report(
        jobs=len(job_of),
        tasks=tasks,
        makespan=round(makespan, 1),
        throughput=round(tasks / makespan * 3600, 1) if makespan else 0.0,
        mean_utilization=round(float(np.mean([u for _, u, _ in samples])) if samples else 0.0, 4),
        preemptions=preemptions,
        wait_by_queue={q: _percentiles(w) for q, w in sorted(waits_q.items())},
        wait_by_user={u: _percentiles(w) for u, w in sorted(waits_u.items())},
        samples=samples,
    )


def _percentiles(values: list[float]) -> dict[str, float]:
    a = np.array(values)
    return {p: round(float(np.percentile(a, q)), 2) for p, q in (("p50", 50), ("p90", 90), ("p99", 99))}


def plot(report: Report, path: Path) -> None:
    """Utilization and queue length over time, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    times = [t for t, _, _ in report.samples]
    fig, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(9, 5.5))
    top.plot(times, [u * 100 for _, u, _ in report.samples], color="tab:blue")
    top.set_ylabel("CPU allocated (%)")
    top.set_ylim(0, 105)
    bottom.plot(times, [q for _, _, q in report.samples], color="tab:orange")
    bottom.set_ylabel("tasks queued")
    bottom.set_xlabel("time (s)")
    fig.suptitle(
        f"shoal sim: {report.jobs} jobs, {report.tasks} tasks, mean utilization {report.mean_utilization:.0%}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
