"""`shoal sim`: a workload (`shoal.workload`) replayed through the real master and agents.

The run is SimCluster (the master's and agents' real state machines and codec) on a virtual
clock that jumps from event to event, with instant links and no heartbeats: every
scheduling decision is the one a live master would make, and nothing else takes time.

A rigid job of P processors, on nodes of C cpus (`node_cpus`), becomes n = ceil(P / C)
tasks of P / n cpus that start together (a gang); `nodes: k` is k tasks of C cpus. A job
the cluster could never hold is an error, or skipped and counted with `skip_unfit`. Jobs are
followed through the ledger's transitions: when each first started, last ended, where it
ran, whether every task ran its whole run (exited 0, or was stopped at a time limit its run
reaches, as the trace's own scheduler stopped it), and the start its backfill reservation
promised it.
"""

from __future__ import annotations

import math
import sys
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from decimal import Decimal
from pathlib import Path

import numpy as np

from shoal.core.scheduler import Policy
from shoal.errors import ShoalError, SpecError
from shoal.master.ledger import Retention
from shoal.master.state import MasterState
from shoal.model import JobRecord, JobSpec, NodeStatus, Resources, TaskRecord, TaskState
from shoal.testing.sim import SimCluster, sim_node
from shoal.workload import Arrival, Workload, WorkloadError

UNFIT = "never fits the cluster"
LATE = 1e-6  # seconds past its promised start before a job counts as a late head
SLOWDOWN_FLOOR = 10.0  # seconds: bounded slowdown does not let very short jobs dominate


class SimulationError(ShoalError):
    """A run that did not end as it must: jobs left waiting with nothing more to happen."""


@dataclass(frozen=True, slots=True)
class Cluster:
    nodes: int
    cpus: float
    mem: int
    node_cpus: float | None = None  # a rigid job's processors per node; default: `cpus`

    @property
    def slot(self) -> float:
        return self.node_cpus or self.cpus


# --- queues -------------------------------------------------------------------------------


def map_queues(workload: Workload, known: Iterable[str], mapping: Mapping[str, str]) -> Workload:
    """Every job in a configured queue: its own, or the one `mapping` names for it (`*`: for
    every queue neither mapped nor configured)."""
    known = set(known)
    if bad := sorted(set(mapping.values()) - known):
        raise WorkloadError(f"--queue maps to {', '.join(bad)}, not configured (--config)")

    targets: dict[str, str] = {}
    for queue in sorted({a.queue for a in workload.arrivals}):
        if target := mapping.get(queue, queue if queue in known else mapping.get("*")):
            targets[queue] = target
    if missing := sorted({a.queue for a in workload.arrivals} - set(targets)):
        first = missing[0]
        raise WorkloadError(
            f"the trace's queues {', '.join(missing)} are not configured: map them with "
            f"--queue {first}=default (or --queue '*=default'), or configure [queues.{first}] "
            "in --config"
        )
    arrivals = [
        a if targets[a.queue] == a.queue else replace(a, queue=targets[a.queue]) for a in workload.arrivals
    ]
    return Workload(arrivals, workload.skipped, workload.cut)


def parse_queue_map(items: Sequence[str]) -> dict[str, str]:
    """`SRC=DST` pairs (`*=DST` for the rest) as a mapping."""
    mapping = {}
    for item in items:
        source, sep, target = item.partition("=")
        if not sep or not source or not target:
            raise WorkloadError(f"--queue {item!r}: expected SRC=DST or '*=DST'")
        mapping[source] = target
    return mapping


# --- jobs as the cluster sees them ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Shape:
    """What a job asks of the cluster: `count` tasks of `cpus` and `mem` each."""

    count: int
    cpus: float
    mem: int
    gang: bool


def shape(arrival: Arrival, node_cpus: float) -> Shape:
    if arrival.nodes is not None:
        return Shape(arrival.nodes, node_cpus, 0, arrival.nodes > 1)
    if arrival.procs is not None:
        n = math.ceil(arrival.procs / node_cpus)
        return Shape(n, arrival.procs / n, 0, n > 1)
    return Shape(arrival.count, arrival.cpus, arrival.mem, False)


def job_spec(arrival: Arrival, node_cpus: float) -> JobSpec:
    s = shape(arrival, node_cpus)
    return JobSpec(
        command=f"sleep {seconds(arrival.duration)}",
        count=s.count,
        resources=Resources(cpus=s.cpus, mem=s.mem),
        gang=s.gang,
        time_limit=arrival.time_limit,
        queue=arrival.queue,
        priority=arrival.priority,
    )


def seconds(value: float) -> str:
    """`value` in plain decimals (the simulated `sleep` reads no exponent), exactly as the
    float reads back: the process ends at the very instant the trace says."""
    return format(Decimal(repr(float(value))), "f")


def unfit(s: Shape, cluster: Cluster) -> str | None:
    """Why the cluster, even empty, could never run a job of shape `s`; None if it could."""
    by_cpus = math.floor(cluster.cpus / s.cpus + 1e-9) if s.cpus > 0 else math.inf
    by_mem = cluster.mem // s.mem if s.mem > 0 else math.inf
    per_node = min(by_cpus, by_mem)
    if per_node == 0:
        return f"a task of {s.cpus:g} cpus and {s.mem} MiB, nodes have {cluster.cpus:g} and {cluster.mem}"
    if s.gang and per_node * cluster.nodes < s.count:
        return (
            f"{s.count} tasks of {s.cpus:g} cpus must start together, "
            f"{cluster.nodes} nodes of {cluster.cpus:g} cpus hold {per_node * cluster.nodes}"
        )
    return None


def _fitting(arrivals: list[Arrival], cluster: Cluster, skip: bool) -> tuple[list[Arrival], int]:
    """The arrivals the cluster can run, and how many it never could (with `skip`)."""
    kept = []
    for arrival in arrivals:
        why = unfit(shape(arrival, cluster.slot), cluster)
        if why is None:
            kept.append(arrival)
        elif not skip:
            raise WorkloadError(f"job {arrival.id} never fits the cluster: {why} (--skip-unfit skips it)")
    return kept, len(arrivals) - len(kept)


# --- the report ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class JobRun:
    """One job as it ran; times from the first submission."""

    id: int
    user: str
    queue: str
    submit: float
    start: float
    end: float
    cpus: float  # held while it runs (a rigid job's processors)
    nodes: tuple[str, ...]
    ok: bool  # every task ran its whole run (exit 0, or stopped at a limit it reaches)
    run: float  # how long the trace says it runs
    promised: float | None = None  # the start its first reservation promised

    @property
    def wait(self) -> float:
        return self.start - self.submit

    @property
    def slowdown(self) -> float:
        """Bounded slowdown: time in the system over run time, short runs counted as 10 s."""
        return max(1.0, (self.end - self.submit) / max(self.run, SLOWDOWN_FLOOR))

    @property
    def late(self) -> bool:
        return self.promised is not None and self.start > self.promised + LATE

    def record(self) -> dict[str, object]:
        """The fields `--jobs-out` writes."""
        keys = ("id", "user", "queue", "submit", "start", "end", "cpus", "nodes")
        return {k: getattr(self, k) for k in keys}


@dataclass(frozen=True, slots=True)
class Stats:
    jobs: int
    wait_mean: float
    wait_p50: float
    wait_p90: float
    wait_p99: float
    wait_max: float
    slowdown_mean: float

    @classmethod
    def of(cls, runs: Sequence[JobRun]) -> Stats:
        if not runs:
            return cls(0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0)
        waits = np.array([r.wait for r in runs])
        p50, p90, p99 = (round(float(v), 2) for v in np.percentile(waits, [50, 90, 99]))
        mean_slowdown = float(np.mean([r.slowdown for r in runs]))
        return cls(
            len(runs),
            round(float(waits.mean()), 2),
            p50,
            p90,
            p99,
            round(float(waits.max()), 2),
            round(mean_slowdown, 3),
        )


@dataclass
class Report:
    jobs: int
    tasks: int
    skipped: dict[str, int]  # reason -> jobs not simulated
    cut: int  # runs cut to their time limit
    failed: int  # jobs some task of which did not run its whole run
    stopped: int  # jobs stopped at a time limit their run reaches, as in the trace
    makespan: float  # first submission to last end, seconds
    utilization: float  # cpu-seconds held over the cluster's, across the makespan
    preemptions: int
    late_heads: int  # jobs started later than a reservation promised them
    wait: Stats
    by_queue: dict[str, Stats]
    by_user: dict[str, Stats]
    cluster_cpus: float
    runs: list[JobRun] = field(default_factory=list)

    def summary(self) -> dict[str, object]:
        """Everything but the job runs: the figures a script wants."""
        figures = asdict(self)
        del figures["runs"]
        return figures


def _grouped(runs: Iterable[JobRun], key: Callable[[JobRun], str]) -> dict[str, Stats]:
    groups: dict[str, list[JobRun]] = defaultdict(list)
    for r in runs:
        groups[key(r)].append(r)
    return {name: Stats.of(rs) for name, rs in sorted(groups.items())}


# --- following jobs through the ledger ----------------------------------------------------

# Native tasks preempted or moved are queued again; with no restart attempts every other
# end state is a task's last.
_REQUEUED = frozenset({TaskState.PREEMPTED, TaskState.MIGRATED})


@dataclass
class _Job:
    arrival: Arrival
    shape: Shape
    start: float = math.inf
    end: float = -math.inf
    nodes: set[str] = field(default_factory=set)
    ended: int = 0  # tasks in their last state
    ok: int = 0  # of those, tasks that ran their whole run: exit 0, or stopped at the limit
    stopped: int = 0  # of those, tasks stopped at a time limit their run reaches
    promised: float | None = None

    def ran_out(self, held: float) -> bool:
        """Whether a task stopped after `held` seconds ran all the trace says it ran: the
        trace's own scheduler stopped it at its limit (a tie with its exit goes either way)."""
        limit = self.arrival.time_limit
        return limit is not None and self.arrival.duration >= limit and held >= limit - 1e-9


class _Watcher:
    """Follows every job through the ledger's transitions."""

    def __init__(self, master: MasterState, progress: Callable[[], None]) -> None:
        self.master = master
        self.progress = progress
        self.jobs: dict[int, _Job] = {}
        self.placed_at: dict[str, float] = {}
        self.busy = 0.0  # cpu-seconds held
        self.preemptions = 0
        self.finished = 0

    def expect(self, job_id: int, arrival: Arrival, s: Shape) -> None:
        self.jobs[job_id] = _Job(arrival, s)

    def __call__(self, task: TaskRecord, job: JobRecord, was: TaskState, now: float) -> None:
        record = self.jobs[job.id]
        state = task.state
        if was is TaskState.PENDING and state.active:
            self._placed(record, job.id, task, now)
        held = 0.0
        if was.active and not state.active:
            held = now - self.placed_at.pop(task.id)
            self.busy += record.shape.cpus * held
        if state is TaskState.PREEMPTED:
            self.preemptions += 1
        elif state.terminal and state not in _REQUEUED:
            self._ended(record, task, held, now)

    def _placed(self, record: _Job, job_id: int, task: TaskRecord, now: float) -> None:
        if record.start == math.inf:
            record.promised = self.master.promised.get(job_id)
        record.start = min(record.start, now)
        record.nodes.add(task.node or "")
        self.placed_at[task.id] = now

    def _ended(self, record: _Job, task: TaskRecord, held: float, now: float) -> None:
        record.ended += 1
        if task.state is TaskState.FINISHED and task.exit_code == 0:
            record.ok += 1
        elif task.state is TaskState.FAILED and record.ran_out(held):
            record.ok += 1
            record.stopped += 1
        record.end = max(record.end, now)
        if record.ended == record.shape.count:
            self.finished += 1
            self.progress()


# --- the run ------------------------------------------------------------------------------


def simulate(
    workload: Workload,
    cluster: Cluster,
    policy: Policy | None = None,
    *,
    skip_unfit: bool = False,
    progress: Callable[[], None] = lambda: None,
) -> Report:
    """Run `workload` on `cluster` until every job has ended."""
    policy = policy or Policy()
    map_queues(workload, policy.queues, {})  # every queue must be configured
    arrivals, unfit_jobs = _fitting(workload.arrivals, cluster, skip_unfit)
    sim = _cluster(cluster, policy)
    # Whole seconds from a whole second on: a trace's integer times stay exact.
    origin = float(math.ceil(sim.now))
    watcher = _Watcher(sim.master, progress)
    sim.master.ledger.watch(watcher)
    for arrival in arrivals:
        sim.at(origin + arrival.submit, lambda a=arrival: _submit(sim, watcher, a, cluster.slot))
    sim.run(lambda: watcher.finished == len(arrivals))
    if watcher.finished < len(arrivals):
        raise SimulationError(_stuck(sim, watcher))
    skipped = Counter(workload.skipped)
    if unfit_jobs:
        skipped[UNFIT] += unfit_jobs
    return _report(watcher, origin, cluster.nodes * cluster.cpus, skipped, workload.cut)


def _cluster(cluster: Cluster, policy: Policy) -> SimCluster:
    """Nodes of `cluster`, registered; instant links, no heartbeats, nothing stored."""
    sim = SimCluster(
        [sim_node(f"node{i}", cpus=cluster.cpus, mem=cluster.mem) for i in range(1, cluster.nodes + 1)],
        heartbeat_timeout=math.inf,
        heartbeat_interval=math.inf,
        latency=(0.0, 0.0),
        policy=policy,
        # The report reads every job at the end: nothing finished is pruned before it.
        retention=Retention(age=math.inf, count=sys.maxsize),
        check=False,
        persist=False,
    )
    nodes = sim.master.ledger.nodes
    sim.run(lambda: sum(n.status is NodeStatus.UP for n in nodes.values()) == cluster.nodes)
    return sim


def _submit(sim: SimCluster, watcher: _Watcher, arrival: Arrival, node_cpus: float) -> None:
    # Ids are given in order, and a cycle may place the job before `submit` returns.
    job_id = sim.master.ledger.next_job_id
    watcher.expect(job_id, arrival, shape(arrival, node_cpus))
    try:
        got = sim.submit(job_spec(arrival, node_cpus), owner=arrival.user)
    except SpecError as e:
        raise WorkloadError(f"job {arrival.id} was refused: {e}") from None
    assert got == job_id, (got, job_id)


def _stuck(sim: SimCluster, watcher: _Watcher) -> str:
    stuck = [(i, r) for i, r in watcher.jobs.items() if r.ended < r.shape.count]
    why = sim.master.why_waiting
    first = "; ".join(f"job {r.arrival.id}: {why(i) or 'not waiting'}" for i, r in stuck[:3])
    return f"{len(stuck)} jobs never ended, with nothing left to happen ({first})"


def _report(watcher: _Watcher, origin: float, cluster_cpus: float, skipped: Counter[str], cut: int) -> Report:
    runs = [_run(r, origin) for r in watcher.jobs.values()]
    begin = min((r.submit for r in runs), default=0.0)
    makespan = max((r.end for r in runs), default=begin) - begin
    return Report(
        jobs=len(runs),
        tasks=sum(r.shape.count for r in watcher.jobs.values()),
        skipped=dict(skipped),
        cut=cut,
        failed=sum(not r.ok for r in runs),
        stopped=sum(r.stopped > 0 for r in watcher.jobs.values()),
        makespan=round(makespan, 3),
        utilization=round(watcher.busy / (cluster_cpus * makespan), 4) if makespan > 0 else 0.0,
        preemptions=watcher.preemptions,
        late_heads=sum(r.late for r in runs),
        wait=Stats.of(runs),
        by_queue=_grouped(runs, lambda r: r.queue),
        by_user=_grouped(runs, lambda r: r.user),
        cluster_cpus=cluster_cpus,
        runs=runs,
    )


def _run(record: _Job, origin: float) -> JobRun:
    a, s = record.arrival, record.shape
    return JobRun(
        id=a.id,
        user=a.user,
        queue=a.queue,
        submit=a.submit,
        start=record.start - origin,
        end=record.end - origin,
        cpus=s.count * s.cpus,
        nodes=tuple(sorted(record.nodes)),
        ok=record.ok == s.count,
        run=a.duration,
        promised=record.promised - origin if record.promised is not None else None,
    )


# --- the plot -----------------------------------------------------------------------------


def steps(changes: Iterable[tuple[float, float]]) -> tuple[list[float], list[float]]:
    """A step function from (time, change) pairs: the times and the level from each on."""
    times: list[float] = []
    levels: list[float] = []
    level = 0.0
    for when, change in sorted(changes):
        level += change
        if times and times[-1] == when:
            levels[-1] = level
        else:
            times.append(when)
            levels.append(level)
    return times, levels


def plot(report: Report, path: Path) -> None:
    """Cpus held and jobs queued over time, from the job runs, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    held = steps([(r.start, r.cpus) for r in report.runs] + [(r.end, -r.cpus) for r in report.runs])
    queued = steps([(r.submit, 1) for r in report.runs] + [(r.start, -1) for r in report.runs])
    fig, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(9, 5.5))
    top.step(held[0], [100 * v / report.cluster_cpus for v in held[1]], where="post", color="tab:blue")
    top.set_ylabel("CPU allocated (%)")
    top.set_ylim(0, 105)
    bottom.step(queued[0], queued[1], where="post", color="tab:orange")
    bottom.set_ylabel("jobs queued")
    bottom.set_xlabel("time (s)")
    fig.suptitle(f"shoal sim: {report.jobs} jobs, {report.tasks} tasks, utilization {report.utilization:.0%}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
