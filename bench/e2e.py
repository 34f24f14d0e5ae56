"""End to end on real processes: a master and local agents on 127.0.0.1.

    python bench/e2e.py --agents 4 --tasks 10000

1. Throughput: one array of `true` tasks, from submission until its last task has ended.
2. Start latency: single-task jobs on the idle cluster, one after another; a task's latency
   is the master's own record: submitted -> reported running by its agent.
3. The machine's own ceiling, in the same run: how many `true` processes per second it can
   spawn and reap on all its cores (posix_spawn, no shoal at all). Every task costs at least
   two such spawns (its wrapper shell and its command), so spawn_ceiling_per_s / 2 bounds
   e2e_tasks_per_s, and their ratio says how much shoal itself costs.
Prints one JSON line last: agents, tasks, e2e_tasks_per_s, spawn_ceiling_per_s, start_p50_ms,
start_p99_ms, submit_ms (how long the API took to accept the array), and where the array's
CPU went: shoal_cpu_ms_per_task (the master and agents themselves) and
machine_cpu_ms_per_task (every core, the tasks' own processes and the kernel included).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import psutil
from rich.progress import Progress

from shoal.config import data_home
from shoal.model import JobSpec, JobState, Resources
from shoal.testing.live import live_cluster

TINY = Resources(cpus=0.01, mem=16)


def spawn_ceiling(count: int = 4000) -> float:
    """`true` processes spawned and reaped per second, bare, by one spawner per core (the
    calls release the interpreter, so threads spawn in parallel)."""
    null = [(os.POSIX_SPAWN_OPEN, fd, os.devnull, os.O_RDWR, 0) for fd in (0, 1, 2)]
    cores = os.cpu_count() or 1

    def spawner(share: int) -> None:
        for _ in range(share):
            os.waitpid(os.posix_spawn("/bin/true", ["true"], {}, file_actions=null, setsid=True), 0)

    began = time.perf_counter()
    with ThreadPoolExecutor(cores) as pool:
        list(pool.map(spawner, [count // cores] * cores))
    return (count // cores * cores) / (time.perf_counter() - began)


def _cpu(processes: list[psutil.Process]) -> float:
    """CPU seconds the master and agents have used (their task processes not included)."""
    return sum(sum(p.cpu_times()[:2]) for p in processes)


def _busy(times: Any) -> float:
    """CPU seconds the whole machine has been busy, all cores together."""
    return float(times.user + times.nice + times.system + times.irq + times.softirq)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", type=int, default=4)
    parser.add_argument("--tasks", type=int, default=10_000)
    parser.add_argument("--starts", type=int, default=50, help="single tasks timed for start latency")
    args = parser.parse_args()
    # The cluster keeps its files where agents keep theirs by default (the data home), not in
    # /tmp: every run is a sandbox directory with two files, and /tmp is often a tmpfs or, on
    # some machines, far slower at creating files than the disk an agent's state is on.
    data_home().mkdir(parents=True, exist_ok=True)
    with (
        tempfile.TemporaryDirectory(dir=data_home(), prefix="bench-") as root,
        live_cluster(Path(root), agents=args.agents, heartbeat_timeout=30) as cluster,
    ):
        daemons = [psutil.Process(p.pid) for p in (cluster.master, *cluster.agents.values()) if p]
        with cluster.client() as client:
            cpu_before = _cpu(daemons)
            machine_before = psutil.cpu_times()
            began = time.perf_counter()
            job = client.submit(JobSpec(command=["true"], count=args.tasks, resources=TINY))
            submit_ms = (time.perf_counter() - began) * 1000
            with Progress(transient=True) as progress:
                bar = progress.add_task("array", total=args.tasks)
                while True:
                    view = client.job(job, limit=0)  # the counts, not the tasks
                    done = sum(
                        n
                        for state, n in view.counts.items()
                        if state in ("finished", "failed", "killed", "lost")
                    )
                    progress.update(bar, completed=done)
                    if view.state in (JobState.COMPLETE, JobState.FAILED, JobState.KILLED):
                        break
                    time.sleep(0.1)
            elapsed = time.perf_counter() - began
            shoal_cpu = _cpu(daemons) - cpu_before
            machine = psutil.cpu_times()
            latencies = []
            for _ in range(args.starts):
                single = client.submit(JobSpec(command=["sleep", "0.2"], resources=TINY))
                final = client.wait(single, poll=0.05)
                task = final.tasks[0]
                assert task.started_at is not None, task
                latencies.append((task.started_at - final.submitted_at) * 1000)
    ceiling = spawn_ceiling()
    ms = np.array(latencies)
    print(
        json.dumps(
            {
                "agents": args.agents,
                "tasks": args.tasks,
                "array_state": view.state.value,
                "e2e_tasks_per_s": round(args.tasks / elapsed),
                "spawn_ceiling_per_s": round(ceiling),
                "shoal_cpu_ms_per_task": round(shoal_cpu / args.tasks * 1000, 3),
                "machine_cpu_ms_per_task": round(
                    (_busy(machine) - _busy(machine_before)) / args.tasks * 1000, 3
                ),
                "submit_ms": round(submit_ms, 1),
                "start_p50_ms": round(float(np.percentile(ms, 50)), 1),
                "start_p99_ms": round(float(np.percentile(ms, 99)), 1),
            }
        )
    )


if __name__ == "__main__":
    sys.exit(main())
