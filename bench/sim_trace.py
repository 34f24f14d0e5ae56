"""`shoal sim` on a real HPC log, and its backfill checked against the reference simulator.

    python bench/sim_trace.py ../shared/traces/SDSC-BLUE-2000-4.2-cln.first10000.swf.gz
    python bench/sim_trace.py PATH.swf --jobs 2000

The trace (SWF, plain or gzipped, read as far as its first `--jobs`; every queue put in one
FIFO queue; `skipped`: the jobs the reader left out, by reason) runs first through
`shoal.simulation` on `--nodes` nodes of `--node-cpus` cpus (144 of 8: SDSC Blue Horizon)
with EASY backfill: `jobs_per_s` (jobs simulated per wall second), `wall_s`, `late_heads`
(jobs started after the start a reservation promised them), `wait_mean`, `slowdown_mean`
(bounded, 10 s) and `utilization`. Then as one pool of all those cpus (a single node, each
job one task), under none, easy and conservative backfill (`--depth` reservations): every
job's start against `shoal.testing.backfill_reference`, as `<mode>_mismatched_starts`, with
`<mode>_late_heads`, `<mode>_shoal_s` and `<mode>_reference_s` (wall seconds). (Late heads
are expected under conservative backfill: each cycle plans afresh, and an earlier job's
reservation moving up may push a later one's back.) A job with no time limit gets the
longest limit of the trace in that comparison (`limits_assumed` counts them), as the
reference needs one.

Prints one JSON line last; exits 1 when a start differs from the reference's or a job did
not run its whole run (`failed`; the first differences go to stderr).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from shoal.core.scheduler import Policy, QueuePolicy
from shoal.simulation import Cluster, Report, map_queues, simulate
from shoal.testing import backfill_reference as reference
from shoal.workload import Arrival, Workload, read

MODES: tuple[reference.Mode, ...] = ("none", "easy", "conservative")
SHOWN = 5  # differences printed per mode


def policy(mode: reference.Mode, depth: int) -> Policy:
    return Policy(queues={"default": QueuePolicy(order="fifo", backfill=mode, depth=depth)})


def timed(
    progress: Progress, what: str, total: int, run: Callable[[Callable[[], None]], Report]
) -> tuple[Report, float]:
    bar = progress.add_task(what, total=total)
    began = time.perf_counter()
    report = run(lambda: progress.advance(bar))
    elapsed = time.perf_counter() - began
    progress.remove_task(bar)
    return report, elapsed


def with_limits(arrivals: list[Arrival]) -> tuple[list[Arrival], int]:
    """Every arrival with a time limit: the trace's longest where it has none."""
    longest = max((a.time_limit for a in arrivals if a.time_limit is not None), default=None)
    assumed = [a for a in arrivals if a.time_limit is None]
    if assumed and longest is None:
        longest = max(max(a.duration for a in arrivals), 1.0)
    return [a if a.time_limit is not None else replace(a, time_limit=longest) for a in arrivals], len(assumed)


def differences(report: Report, expected: dict[int, float]) -> list[str]:
    return [
        f"job {r.id}: shoal {r.start:g}, reference {expected[r.id]:g}"
        for r in report.runs
        if abs(r.start - expected[r.id]) > 1e-6
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trace", type=Path, help="an SWF log, plain or .gz")
    parser.add_argument("--jobs", type=int, default=None, help="the first N jobs of the trace only")
    parser.add_argument("--nodes", type=int, default=144)
    parser.add_argument("--node-cpus", type=int, default=8)
    parser.add_argument(
        "--depth", type=int, default=100, help="conservative backfill's reservations per pass"
    )
    args = parser.parse_args()
    workload = read(args.trace, args.jobs)
    workload = map_queues(workload, {"default"}, {"*": "default"})
    pool = args.nodes * args.node_cpus
    arrivals, assumed = with_limits(workload.arrivals)
    figures: dict[str, object] = {
        "trace": args.trace.name,
        "jobs": len(arrivals),
        "skipped": dict(workload.skipped),
    }
    failed = 0
    mismatched = 0
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        transient=True,
    ) as progress:
        cluster = Cluster(args.nodes, args.node_cpus, 4096 * args.nodes, args.node_cpus)
        report, wall = timed(
            progress,
            f"{args.nodes} nodes, easy",
            len(workload.arrivals),
            lambda tick: simulate(workload, cluster, policy("easy", args.depth), progress=tick),
        )
        failed += report.failed
        figures |= {
            "nodes": args.nodes,
            "node_cpus": args.node_cpus,
            "jobs_per_s": round(report.jobs / wall, 1),
            "wall_s": round(wall, 2),
            "late_heads": report.late_heads,
            "wait_mean": report.wait.wait_mean,
            "slowdown_mean": report.wait.slowdown_mean,
            "utilization": report.utilization,
            "limits_assumed": assumed,
        }
        one = Cluster(1, pool, 4096, pool)
        jobs = [reference.Job(a.id, a.submit, a.procs or 0, a.duration, a.time_limit or 0) for a in arrivals]
        for mode in MODES:
            report, wall = timed(
                progress,
                f"one pool, {mode}",
                len(arrivals),
                lambda tick, mode=mode: simulate(
                    Workload(arrivals), one, policy(mode, args.depth), progress=tick
                ),
            )
            began = time.perf_counter()
            expected = reference.simulate(jobs, pool, mode, args.depth).starts
            reference_wall = time.perf_counter() - began
            wrong = differences(report, expected)
            for line in wrong[:SHOWN]:
                progress.console.print(f"{mode}: {line}")
            failed += report.failed
            mismatched += len(wrong)
            figures |= {
                f"{mode}_mismatched_starts": len(wrong),
                f"{mode}_late_heads": report.late_heads,
                f"{mode}_shoal_s": round(wall, 2),
                f"{mode}_reference_s": round(reference_wall, 2),
            }
    figures["failed"] = failed
    print(json.dumps(figures))
    return 1 if failed or mismatched else 0


if __name__ == "__main__":
    sys.exit(main())
