"""Scheduler throughput and latency through the master's real state machine.

    python bench/scheduler.py --nodes 10000 --tasks 100000
    python bench/scheduler.py --nodes 10000 --tasks 100000 --full

Registers N simulated nodes, then submits jobs one at a time (mostly single tasks, some
arrays of 10 and 100, a fifth with a rack constraint, mixed strategies), each submission one
`MasterState.handle` call as the API would make it: ledger, scheduling cycle, plan check,
launch frames. A task's latency is the time of the call that placed it. Prints one JSON line
last: nodes, tasks, placements_per_s, p50_ms, p99_ms, utilization, unplaced, rss_mb, and
placements_per_cpu_s (per second of this process's CPU time: steadier than wall time on a
shared machine); each the median of `--runs` runs on fresh masters. Nothing ends, and no
I/O is done: the in-memory figure.

`--full` runs a busier workload, as a master meets it, twice on fresh masters in each run:
once through the state machine alone (`state_placements_per_s`), once through the whole
path a live master takes for the same events (`placements_per_s`); and, in the same run, the
plain workload above in memory (`memory_placements_per_s`, the figure without `--full`).
The whole path: `MasterState.handle`,
then every `Persist` command written to a SQLite store in a temporary directory
(`SqliteStore.apply`, the store's default durability), then every frame to an agent encoded
with the wire codec (`wire.encode` of each `Send`), as `master.server.Master.dispatch` does.
The workload: queues `prod` (priority order, weight 4, a 30% guarantee, jobs of priority
100-500 that may not be preempted), `batch` (fair between users, weight 2), `research`
(FIFO, at most 60% of the cluster) and `default`; five users with weights; one job in two
has a time limit (a task ends before it, so it may backfill ahead of a reservation); jobs
arrive over an hour of virtual time, sized and timed so that what is due to run at once asks
for 1.3 times the cluster: it stays filled above 80% with work waiting (from the second
half-hour on), and higher priorities preempt lower ones. (It takes far longer than the
in-memory run of the same size: try `--nodes 1000 --tasks 10000 --runs 1 --full` first.)
Simulated agents (not timed) answer as real ones do: a launched run reports RUNNING at the
next arrival, FINISHED (exit 0) when its duration has passed, KILLED the step after a kill;
their reports reach the master batched with the next submission, as the server batches what
arrives in one turn of its loop. Heartbeats are left out (nodes never time out). The JSON
line then holds: nodes, tasks, jobs, runs, placements (runs launched, restarts after
preemption included), placements_per_s, state_placements_per_s, memory_placements_per_s,
placements_per_cpu_s and state_placements_per_cpu_s (per second of CPU time: steadier on a
shared machine), full_over_memory (the full path's time over the state machine's), the full path's time
split into state_share, store_share and encode_share, p50_ms and p99_ms (of the full-path
call that placed a task), utilization (mean share of cpus held, over the second half of
the hour), preemptions (runs killed to make room), waiting_at_end (tasks not running or
finished when the last job arrived) and rss_mb.
"""

from __future__ import annotations

import argparse
import gc
import heapq
import itertools
import json
import random
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import psutil
from rich.progress import Progress

from shoal.config import MasterSettings, QueueSettings
from shoal.master.events import Command, Event, FromAgent, Persist, Reply, Send, Submit, Tick
from shoal.master.server import tune_collector
from shoal.master.state import MasterState
from shoal.master.store.sqlite import SqliteStore
from shoal.model import JobSpec, NodeInfo, Resources, TaskState
from shoal.wire import Kill, Launch, Register, RunReport, RunReports, RunSpec, encode


def nodes(count: int, rng: random.Random) -> list[NodeInfo]:
    racks = max(1, count // 40)
    return [
        NodeInfo(
            name=f"node{i}",
            hostname=f"node{i}",
            capacity=Resources(
                cpus=rng.choice([16, 32, 64]), mem=rng.choice([65536, 131072, 262144]), disk=500_000
            ),
            labels={"rack": f"r{i % racks}", "zone": f"z{i % 3}"},
            attributes={"os": "linux", "arch": "x86_64", "kernel": rng.choice(["5.10.0", "6.1.0"])},
        )
        for i in range(count)
    ]


def jobs(tasks: int, racks: int, rng: random.Random) -> list[JobSpec]:
    specs: list[JobSpec] = []
    left = tasks
    while left > 0:
        count = min(left, rng.choices([1, 10, 100], weights=[60, 30, 10])[0])
        left -= count
        constraints = [f"rack == r{rng.randrange(racks)}"] if rng.random() < 0.2 else []
        specs.append(
            JobSpec(
                command="true",
                count=count,
                resources=Resources(cpus=rng.choice([0.25, 0.5, 1, 2]), mem=rng.choice([256, 1024, 4096])),
                strategy=rng.choice(["binpack", "spread", "least-loaded"]),
                constraints=constraints,
            )
        )
    return specs


def launched(commands: list[Command]) -> list[RunSpec]:
    """The runs these commands launch."""
    frames = [c.frame for c in commands if isinstance(c, Send)]
    return [run for frame in frames if isinstance(frame, Launch) for run in frame.runs]


def run(args: argparse.Namespace, progress: Progress) -> dict[str, float]:
    """One run on a fresh master: the figures of the JSON line."""
    rng = random.Random(args.seed)
    state = MasterState(heartbeat_timeout=1e9)
    infos = nodes(args.nodes, rng)
    for info in infos:
        state.handle(FromAgent(info.name, Register(node=info), 0.0))
    specs = jobs(args.tasks, max(1, args.nodes // 40), rng)
    latencies: list[float] = []
    busy = cpu = shown = 0.0
    placed = 0
    held = 0.0  # cpus the placed tasks hold (nothing ends here)
    bar = progress.add_task("submitting", total=args.tasks)
    for request, spec in enumerate(specs, start=1):
        start, start_cpu = time.perf_counter(), time.process_time()
        commands = state.handle(Submit(request, "bench", spec, 1.0))
        took = time.perf_counter() - start
        busy += took
        cpu += time.process_time() - start_cpu
        runs = launched(commands)
        placed += len(runs)
        held += sum(r.resources.cpus for r in runs)
        latencies.extend([took] * len(runs))
        progress.advance(bar, spec.count)
        if time.perf_counter() - shown > 0.2:
            progress.refresh()
            shown = time.perf_counter()
    progress.remove_task(bar)
    ms = np.array(latencies or [0.0]) * 1000
    return {
        "placements_per_s": placed / busy,
        "placements_per_cpu_s": placed / cpu,
        "p50_ms": float(np.percentile(ms, 50)),
        "p99_ms": float(np.percentile(ms, 99)),
        "utilization": held / sum(i.capacity.cpus for i in infos),
        "unplaced": args.tasks - placed,
        "rss_mb": psutil.Process().memory_info().rss / 2**20,
    }


# --- the full path ----------------------------------------------------------------------------

HORIZON = 3600.0  # virtual seconds over which the jobs arrive
TICK = 0.5  # the master's default tick
QUEUES = {
    "prod": QueueSettings(order="priority", weight=4, guarantee=0.3),
    "batch": QueueSettings(order="fair", weight=2),
    "research": QueueSettings(order="fifo", weight=1, limit=0.6),
    "default": QueueSettings(),
}
USERS = {"alice": 2.0, "bob": 1.0, "carol": 1.0, "dave": 0.5, "erin": 1.0}
DEMAND = 1.3  # what the tasks due to run at once ask for, in clusters' worth of cpus


@dataclass(frozen=True, slots=True)
class Arrival:
    owner: str
    spec: JobSpec
    duration: float  # seconds each of its tasks runs


def mixed_jobs(tasks: int, infos: list[NodeInfo], rng: random.Random) -> list[Arrival]:
    """Jobs in several queues of several users, sized and timed so that the tasks due to run
    at once ask for DEMAND times the cluster's cpus: it fills, and work waits. Tasks are
    2.5 times the cluster's cpus per task on average (at most half the smallest node), so
    the cluster fills about twice over the hour and tasks end and start throughout."""
    racks = max(1, len(infos) // 40)
    per_task = sum(i.capacity.cpus for i in infos) / tasks
    mean = min(max(0.5, 2.5 * per_task), min(i.capacity.cpus for i in infos) / 2)
    lasts = HORIZON * DEMAND * per_task / mean  # a task's mean duration
    arrivals: list[Arrival] = []
    left = tasks
    while left > 0:
        count = min(left, rng.choices([1, 10, 100], weights=[60, 30, 10])[0])
        left -= count
        queue = rng.choices(list(QUEUES), weights=[20, 40, 20, 20])[0]
        if queue == "prod":
            priority, preemptible = rng.choice([100, 200, 500]), False
        else:
            priority, preemptible = rng.choice([0, 0, 0, 10, 50]), rng.random() < 0.9
        cpus = max(0.25, round(mean * rng.choice([0.5, 0.75, 1.25, 1.5]) * 4) / 4)
        duration = lasts * rng.uniform(0.5, 1.5)
        time_limit = round(duration * rng.uniform(1.2, 2.0)) if rng.random() < 0.5 else None
        spec = JobSpec(
            command=f"sleep {duration:.0f}",
            count=count,
            resources=Resources(cpus=cpus, mem=int(cpus * rng.choice([1024, 2048, 4096]))),
            queue=queue,
            priority=priority,
            preemptible=preemptible,
            time_limit=time_limit,
            strategy=rng.choice(["binpack", "spread", "least-loaded"]),
            constraints=[f"rack == r{rng.randrange(racks)}"] if rng.random() < 0.1 else [],
        )
        arrivals.append(Arrival(rng.choice(list(USERS)), spec, duration))
    return arrivals


@dataclass
class Agents:
    """Simulated agents, not timed: a launched run reports RUNNING a step later and FINISHED
    (exit 0) when its job's duration has passed; a killed one reports KILLED a step later."""

    step: float
    durations: dict[int, float] = field(default_factory=dict)  # job id -> seconds
    # run id -> its node, cpus, task id and attempt, from its launch to its end
    live: dict[str, tuple[str, float, str, int]] = field(default_factory=dict)
    due: list[tuple[float, int, str, RunReport]] = field(default_factory=list)
    held: float = 0.0  # cpus the live runs hold
    kills: int = 0
    finished: int = 0
    _seq: itertools.count = field(default_factory=itertools.count)

    def _at(self, when: float, node: str, report: RunReport) -> None:
        """Deliver `report` from `node` with the first batch at or after `when`."""
        heapq.heappush(self.due, (when, next(self._seq), node, report))

    def take(self, commands: list[Command], now: float) -> None:
        for c in commands:
            if not isinstance(c, Send):
                continue
            if isinstance(c.frame, Launch):
                for run in c.frame.runs:
                    self.live[run.run_id] = (c.node, run.resources.cpus, run.task_id, run.attempt)
                    self.held += run.resources.cpus
                    ids = {"run_id": run.run_id, "task_id": run.task_id, "attempt": run.attempt}
                    self._at(now + self.step, c.node, RunReport(**ids, state=TaskState.RUNNING))
                    ends = now + self.step + self.durations[int(run.task_id.split(".")[0])]
                    self._at(ends, c.node, RunReport(**ids, state=TaskState.FINISHED, exit_code=0))
            elif isinstance(c.frame, Kill):
                for run_id in c.frame.run_ids:
                    if (live := self.live.get(run_id)) is not None:
                        self.kills += 1
                        ids = {"run_id": run_id, "task_id": live[2], "attempt": live[3]}
                        killed = RunReport(**ids, state=TaskState.KILLED, exit_code=-15)
                        self._at(now + self.step, c.node, killed)

    def reports(self, now: float) -> list[FromAgent]:
        """The reports due by `now`, one frame per node."""
        by_node: dict[str, list[RunReport]] = defaultdict(list)
        while self.due and self.due[0][0] <= now:
            _, _, node, report = heapq.heappop(self.due)
            if report.run_id not in self.live:
                continue  # it ended already (killed before its end came)
            if report.state is not TaskState.RUNNING:
                self.held -= self.live.pop(report.run_id)[1]
                self.finished += report.state is TaskState.FINISHED
            by_node[node].append(report)
        return [FromAgent(node, RunReports(reports=rs), now) for node, rs in by_node.items()]


def full_run(args: argparse.Namespace, progress: Progress, persist: bool) -> dict[str, float]:
    """The mixed workload on a fresh master: through the state machine alone, or (`persist`)
    with the store's writes and the frames' encoding too."""
    rng = random.Random(args.seed)
    infos = nodes(args.nodes, rng)
    arrivals = mixed_jobs(args.tasks, infos, rng)
    capacity = sum(i.capacity.cpus for i in infos)
    step = HORIZON / len(arrivals)
    policy = MasterSettings(queues=QUEUES, user_weights=USERS).policy()  # as the server builds it
    state = MasterState(heartbeat_timeout=1e9, policy=policy)
    with tempfile.TemporaryDirectory(prefix="shoal-bench-") as root:
        store = SqliteStore(Path(root) / "shoal.db") if persist else None
        for info in infos:
            commands = state.handle(FromAgent(info.name, Register(node=info), 0.0))
            if store is not None:
                for c in commands:
                    if isinstance(c, Persist):
                        store.apply(c)
        agents = Agents(step)
        handling = storing = encoding = cpu = 0.0
        placed = 0
        latencies: list[float] = []
        held: list[float] = []
        next_tick = TICK
        shown = 0.0
        what = "full path" if persist else "state machine"
        bar = progress.add_task(f"{what}: submitting", total=args.tasks)
        for request, arrival in enumerate(arrivals, start=1):
            now = request * step
            events: list[Event] = [*agents.reports(now), Submit(request, arrival.owner, arrival.spec, now)]
            if now >= next_tick or state.wants_cycle:
                events.append(Tick(now))
                next_tick = now + TICK
            began, began_cpu = time.perf_counter(), time.process_time()
            commands = state.handle(*events)
            handled = time.perf_counter()
            if store is not None:
                for c in commands:
                    if isinstance(c, Persist):
                        store.apply(c)
                stored = time.perf_counter()
                for c in commands:
                    if isinstance(c, Send):
                        encode(c.frame)
                encoded = time.perf_counter()
                storing += stored - handled
                encoding += encoded - stored
            else:
                encoded = handled
            handling += handled - began
            cpu += time.process_time() - began_cpu
            for c in commands:
                if isinstance(c, Reply) and c.request == request:
                    if c.error is not None:
                        raise SystemExit(f"job {request} was refused: {c.error}")
                    agents.durations[int(c.value)] = arrival.duration  # type: ignore[arg-type]
            runs = launched(commands)
            placed += len(runs)
            latencies.extend([encoded - began] * len(runs))
            agents.take(commands, now)
            if now > HORIZON / 2:
                held.append(agents.held / capacity)
            progress.advance(bar, arrival.spec.count)
            if time.perf_counter() - shown > 0.2:
                progress.refresh()
                shown = time.perf_counter()
        progress.remove_task(bar)
        if store is not None:
            store.close()
    busy = handling + storing + encoding
    ms = np.array(latencies or [0.0]) * 1000
    running = len(agents.live)
    return {
        "jobs": len(arrivals),
        "placements": placed,
        "placements_per_s": placed / busy,
        "placements_per_cpu_s": placed / cpu,
        "busy": busy,
        "state_share": handling / busy,
        "store_share": storing / busy,
        "encode_share": encoding / busy,
        "p50_ms": float(np.percentile(ms, 50)),
        "p99_ms": float(np.percentile(ms, 99)),
        "utilization": float(np.mean(held)) if held else 0.0,
        "preemptions": agents.kills,
        "waiting_at_end": args.tasks - agents.finished - running,
        "rss_mb": psutil.Process().memory_info().rss / 2**20,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=10_000)
    parser.add_argument("--tasks", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--runs", type=int, default=3, help="runs on fresh masters; figures are medians")
    parser.add_argument("--full", action="store_true", help="a mixed workload, with the store and the codec")
    args = parser.parse_args()
    tune_collector()  # as the master process does
    runs = []
    memory = []  # --full: the busy workload through the state machine alone
    plain = []  # --full: the in-memory run of the plain workload, as without --full
    # Redrawn between submissions, not by Rich's thread: that would take the interpreter
    # from the master in the middle of the calls being timed.
    with Progress(transient=True, auto_refresh=False) as progress:
        for _ in range(args.runs):
            if args.full:
                memory.append(full_run(args, progress, persist=False))
                gc.collect()
                runs.append(full_run(args, progress, persist=True))
                if runs[-1]["placements"] != memory[-1]["placements"]:
                    progress.console.print(
                        f"the two masters placed {memory[-1]['placements']} and {runs[-1]['placements']}"
                        " runs: the same events gave different decisions"
                    )
                gc.collect()
                plain.append(run(args, progress))
                progress.console.print(
                    f"run {len(runs)}: {runs[-1]['placements_per_s']:.0f} placements/s full,"
                    f" {memory[-1]['placements_per_s']:.0f} by the state machine alone,"
                    f" {plain[-1]['placements_per_s']:.0f} in memory on the plain workload"
                )
            else:
                runs.append(run(args, progress))
                progress.console.print(f"run {len(runs)}: {runs[-1]['placements_per_s']:.0f} placements/s")
            gc.collect()  # the last run's master, before the next one starts

    def median(key: str, of: list[dict[str, float]] = runs) -> float:
        return float(np.median([r[key] for r in of]))

    figures: dict[str, object] = {"nodes": args.nodes, "tasks": args.tasks, "runs": args.runs}
    if args.full:
        figures.update(
            {
                "jobs": runs[0]["jobs"],
                "placements": round(median("placements")),
                "placements_per_s": round(median("placements_per_s")),
                "state_placements_per_s": round(median("placements_per_s", memory)),
                "memory_placements_per_s": round(median("placements_per_s", plain)),
                "placements_per_cpu_s": round(median("placements_per_cpu_s")),
                "state_placements_per_cpu_s": round(median("placements_per_cpu_s", memory)),
                "full_over_memory": round(median("busy") / median("busy", memory), 2),
                "state_share": round(median("state_share"), 3),
                "store_share": round(median("store_share"), 3),
                "encode_share": round(median("encode_share"), 3),
                "p50_ms": round(median("p50_ms"), 3),
                "p99_ms": round(median("p99_ms"), 3),
                "utilization": round(median("utilization"), 4),
                "preemptions": round(median("preemptions")),
                "waiting_at_end": round(median("waiting_at_end")),
            }
        )
    else:
        figures.update(
            {
                "placements_per_s": round(median("placements_per_s")),
                "placements_per_cpu_s": round(median("placements_per_cpu_s")),
                "p50_ms": round(median("p50_ms"), 3),
                "p99_ms": round(median("p99_ms"), 3),
                "utilization": round(median("utilization"), 4),
                "unplaced": round(median("unplaced")),
            }
        )
    figures["rss_mb"] = round(runs[0]["rss_mb"])  # later runs reuse the heap the first grew
    print(json.dumps(figures))
    if not all(r["placements_per_s"] > 0 for r in [*runs, *memory]):
        print("a run placed no task", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
