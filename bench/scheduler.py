"""Scheduler throughput and latency through the master's real state machine (no I/O).

    python bench/scheduler.py --nodes 10000 --tasks 100000

Registers N simulated nodes, then submits jobs one at a time (mostly single tasks, some
arrays of 10 and 100, a fifth with a rack constraint, mixed strategies), each submission one
`MasterState.handle` call as the API would make it: ledger, scheduling cycle, plan check,
launch frames. A task's latency is the time of the call that placed it. Prints one JSON line
last: nodes, tasks, placements_per_s, p50_ms, p99_ms, utilization, unplaced, rss_mb, and
placements_per_cpu_s (per second of this process's CPU time: steadier than wall time on a
shared machine); each the median of `--runs` runs on fresh masters.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import sys
import time

import numpy as np
import psutil
from rich.progress import Progress

from shoal.master.events import FromAgent, Submit
from shoal.master.server import tune_collector
from shoal.master.state import MasterState
from shoal.model import JobSpec, NodeInfo, Resources, TaskState
from shoal.wire import Register


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
    bar = progress.add_task("submitting", total=args.tasks)
    for request, spec in enumerate(specs, start=1):
        start, start_cpu = time.perf_counter(), time.process_time()
        state.handle(Submit(request, "bench", spec, 1.0))
        took = time.perf_counter() - start
        busy += took
        cpu += time.process_time() - start_cpu
        latencies.extend([took] * spec.count)
        progress.advance(bar, spec.count)
        if time.perf_counter() - shown > 0.2:
            progress.refresh()
            shown = time.perf_counter()
    progress.remove_task(bar)
    placed = sum(1 for t in state.tasks.values() if t.state is TaskState.ASSIGNED)
    ms = np.array(latencies) * 1000
    return {
        "placements_per_s": placed / busy,
        "placements_per_cpu_s": placed / cpu,
        "p50_ms": float(np.percentile(ms, 50)),
        "p99_ms": float(np.percentile(ms, 99)),
        "utilization": float(state.table.allocated[:, 0].sum() / state.table.capacity[:, 0].sum()),
        "unplaced": args.tasks - placed,
        "rss_mb": psutil.Process().memory_info().rss / 2**20,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=10_000)
    parser.add_argument("--tasks", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--runs", type=int, default=3, help="runs on fresh masters; figures are medians")
    args = parser.parse_args()
    tune_collector()  # as the master process does
    runs = []
    # Redrawn between submissions, not by Rich's thread: that would take the interpreter
    # from the master in the middle of the calls being timed.
    with Progress(transient=True, auto_refresh=False) as progress:
        for _ in range(args.runs):
            runs.append(run(args, progress))
            gc.collect()  # the last run's master, before the next one starts
            progress.console.print(f"run {len(runs)}: {runs[-1]['placements_per_s']:.0f} placements/s")

    def median(key: str) -> float:
        return float(np.median([r[key] for r in runs]))

    print(
        json.dumps(
            {
                "nodes": args.nodes,
                "tasks": args.tasks,
                "runs": args.runs,
                "placements_per_s": round(median("placements_per_s")),
                "placements_per_cpu_s": round(median("placements_per_cpu_s")),
                "p50_ms": round(median("p50_ms"), 3),
                "p99_ms": round(median("p99_ms"), 3),
                "utilization": round(median("utilization"), 4),
                "unplaced": round(median("unplaced")),
                "rss_mb": round(runs[0]["rss_mb"]),  # later runs reuse the heap the first grew
            }
        )
    )


if __name__ == "__main__":
    sys.exit(main())
