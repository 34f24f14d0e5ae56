"""Chaos: leader kills and other faults on network-namespace hosts, and what really ran.

    python bench/chaos.py                     # 20 leader kills and 20 other faults, seed 1
    python bench/chaos.py --kills 3 --others 3 --minutes 3 --seed 7

`shoal.testing.chaos` lays out three hosts each running one etcd member and one master,
`--agents` agent hosts and a host for this driver, all in network namespaces (root needed),
runs a steady workload (arrays of short sleeps, tasks failing a few attempts before they
succeed, long tasks that should run across every failover, a service, a framework's short
tasks) and injects, in an order drawn
from `--seed`: `--kills` SIGKILLs of the leader and `--others` other faults (an etcd member
killed, a master's or an agent's host isolated, the leader cut from etcd or from an agent),
each healed before the next; no fault starts after `--minutes`. Then it heals everything,
waits for every job to end and checks every task's own record of its runs.

Prints one JSON line last: failover_submit_p50_s and failover_submit_max_s (SIGKILL of the
leader -> the first submission a new leader accepted), failover_launch_p50_s and
failover_launch_max_s (-> the first start of a task of a job submitted after the kill), and
failover_p50_s, failover_max_s (the launch ones, the stricter); kills, faults (by kind); by
kind of fault, counted from each fault to the next: elections (of a leader), interrupted
(runs of long tasks that ended: stopped, to run again) and unacknowledged (submissions whose
call failed); lost, duplicates, repeated_runs, over_restarted, false_lost, lost_reports,
long_restarts, unended_runs; framework_tasks and framework_unended (launched by the
framework, and of those never heard by it to end), service_wrong (endpoints the registry
gave wrongly at the end); submitted, acknowledged, complete, kept_unacknowledged (jobs
that exist though their submission's call failed); invariants_ok; goals_met (failover
p50 <= 3 s, max <= 5 s, lost = duplicates = false_lost = 0); seed, elapsed_s and root (where
the logs, the histories and the timeline chaos.log are; kept with --keep). Every finding is
printed above it, with its evidence. Exits 1 when a job was lost, a task ran twice (at once,
or one run started twice) or more often than its policy allows, the ledger's invariants do
not hold, or a leader kill could not be timed.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from shoal.testing.chaos import ChaosConfig, ChaosResult, run_chaos
from shoal.testing.hosts import clean_leftovers, netns_problem

GOAL_P50_S, GOAL_MAX_S = 3.0, 5.0


def _spread(values: list[float]) -> tuple[float | None, float | None]:
    return (round(statistics.median(values), 3), round(max(values), 3)) if values else (None, None)


def figures(result: ChaosResult, root: Path) -> dict[str, object]:
    submit_p50, submit_max = _spread([f.submit_s for f in result.failovers if f.submit_s is not None])
    launch_p50, launch_max = _spread([f.launch_s for f in result.failovers if f.launch_s is not None])
    goals = (
        launch_p50 is not None
        and launch_p50 <= GOAL_P50_S
        and launch_max is not None
        and launch_max <= GOAL_MAX_S
        and result.lost == result.duplicates == result.false_lost == 0
    )
    return {
        "failover_submit_p50_s": submit_p50,
        "failover_submit_max_s": submit_max,
        "failover_launch_p50_s": launch_p50,
        "failover_launch_max_s": launch_max,
        "failover_p50_s": launch_p50,
        "failover_max_s": launch_max,
        "kills": len(result.failovers),
        "faults": result.faults,
        "elections": result.elections,
        "interrupted": result.interrupted,
        "unacknowledged": result.unacknowledged,
        "lost": result.lost,
        "duplicates": result.duplicates,
        "repeated_runs": result.repeated_runs,
        "over_restarted": result.over_restarted,
        "false_lost": result.false_lost,
        "lost_reports": result.lost_reports,
        "long_restarts": result.long_restarts,
        "framework_tasks": result.framework_tasks,
        "framework_unended": result.framework_unended,
        "service_wrong": result.service_wrong,
        "unended_runs": result.unended_runs,
        "submitted": result.submitted,
        "acknowledged": result.acknowledged,
        "complete": result.complete,
        "kept_unacknowledged": result.kept_unacknowledged,
        "invariants_ok": not result.invariants,
        "goals_met": goals,
        "seed": result.seed,
        "elapsed_s": result.elapsed_s,
        "root": str(root),
    }


def failed(result: ChaosResult) -> list[str]:
    """Why the run fails, if it does."""
    why = [
        f"{name} = {count}"
        for name, count in (
            ("lost", result.lost),
            ("duplicates", result.duplicates),
            ("repeated_runs", result.repeated_runs),
            ("over_restarted", result.over_restarted),
        )
        if count
    ]
    if result.invariants:
        why.append(result.invariants)
    untimed = [f.leader for f in result.failovers if f.submit_s is None or f.launch_s is None]
    if untimed:
        why.append(f"{len(untimed)} leader kills with no new work accepted and started after them")
    return why


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=20, help="SIGKILLs of the leader")
    parser.add_argument("--others", type=int, default=None, help="other faults [as many as --kills]")
    parser.add_argument("--minutes", type=float, default=15.0, help="no fault starts after this")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--agents", type=int, default=3)
    parser.add_argument("--heartbeat-timeout", type=float, default=ChaosConfig.heartbeat_timeout)
    parser.add_argument("--keep", type=Path, default=None, help="keep logs and histories in this directory")
    args = parser.parse_args()
    if problem := netns_problem():
        print(f"cannot run: {problem}", file=sys.stderr)
        return 2
    clean_leftovers()
    config = ChaosConfig(
        seed=args.seed,
        kills=args.kills,
        others=args.others,
        minutes=args.minutes,
        agents=args.agents,
        heartbeat_timeout=args.heartbeat_timeout,
    )
    root = args.keep or Path(tempfile.mkdtemp(prefix="shoal-chaos-"))
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, transient=True) as progress:
        bar = progress.add_task("starting etcd, masters and agents", total=None)

        def advance(done: int, total: int, what: str) -> None:
            progress.update(bar, completed=done, total=total, description=what.replace("_", " "))

        result = run_chaos(config, root, advance)
        for problem in result.problems:
            progress.console.print(problem, markup=False, highlight=False)
    why = failed(result)
    if not why and args.keep is None:
        shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(figures(result, root)))
    if why:
        print("failed: " + "; ".join(why), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
