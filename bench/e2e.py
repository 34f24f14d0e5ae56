"""End to end on real processes: a master and local agents on 127.0.0.1.

    python bench/e2e.py --agents 4 --tasks 10000

1. Throughput: one array of `true` tasks, from submission until its last task has ended.
   A task counts only if it ran and exited 0: after the array ends, every task is read back
   through the API, and only those FINISHED with exit code 0 count (`ok_tasks`).
2. Start latency: single-task jobs on the idle cluster, one after another; a task's latency
   is the master's own record: submitted -> reported running by its agent.
3. The machine's own ceiling, in the same run: how many `true` processes per second it can
   spawn and reap on all its cores (posix_spawn, no shoal at all). Every task costs at least
   two such spawns (its wrapper shell and its command), so spawn_ceiling_per_s / 2 bounds
   e2e_tasks_per_s, and their ratio says how much shoal itself costs.
4. What syncing to disk costs: 1 and 2 again on a second cluster whose master has its
   `fsync` setting off (SHOAL_FSYNC=false: acknowledged changes are not synced to disk
   before the answer), with an array of `--nofsync-tasks` (default: as many as in 1, so
   the two rates compare). The default figures are with the master's default (fsync on).
5. With `--store etcd`, the cost of the replicated store: instead of 4, the same array on a
   cluster of three masters on three etcd members (all on this machine); `e2e_tasks_per_s`,
   the start latencies and the CPU figures are then that cluster's, and `sqlite_tasks_per_s`
   is 1's (one master on SQLite, fsync on), measured in the same run.
6. With `--tls`, what TLS costs: instead of 4, the same array and starts on two clusters of
   `--store`, one on plain HTTP (`--insecure`, agents with the cluster token) and one on
   TLS (the cluster's own authority, agents joining with a bootstrap token and presenting
   their certificates). Both are up at once and take turns (a quarter of the array at a
   time: plain, TLS, TLS, plain, plain, TLS, TLS, plain; then single tasks alternately): on
   a machine whose speed drifts, the one measured second would otherwise look faster. The
   figures are then the TLS cluster's,
   with plain_tasks_per_s, plain_start_p50_ms, plain_shoal_cpu_ms_per_task and
   tls_over_plain (tasks/s with TLS over without; goal >= 0.9).
Prints one JSON line last: agents, tasks, ok_tasks, e2e_tasks_per_s, spawn_ceiling_per_s,
start_p50_ms, start_p99_ms, submit_ms (how long the API took to accept the array), where the
array's CPU went: shoal_cpu_ms_per_task (the master and agents themselves) and
machine_cpu_ms_per_task (every core, the tasks' own processes and the kernel included), and
with fsync off: nofsync_tasks, e2e_tasks_per_s_nofsync, start_p50_ms_nofsync,
start_p99_ms_nofsync (with `--store etcd`: store, sqlite_tasks_per_s, sqlite_start_p50_ms
instead). Exits 1, naming the tasks, unless every task of both clusters ran and exited 0.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import psutil
from rich.progress import Progress

from shoal.client import Client
from shoal.config import MasterSettings, data_home
from shoal.model import JobSpec, JobState, Resources, TaskState
from shoal.testing.ha import ha_cluster
from shoal.testing.live import LiveCluster, live_cluster
from shoal.views import TaskView

TINY = Resources(cpus=0.01, mem=16)
ENDED = ("finished", "failed", "killed", "lost")
PAGE = 10_000  # tasks read back per call
TLS_ROUNDS = 4  # with --tls: parts of the array each cluster runs, taking turns (even)


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


def described(task: TaskView) -> str:
    return f"{task.id}: {task.state.value}, exit code {task.exit_code} {task.message}".strip()


def failures(client: Client, job: int, count: int) -> list[str]:
    """Every task of `job` that did not run to exit code 0, read back page by page."""
    bad = []
    for offset in range(0, count, PAGE):
        for task in client.job(job, offset=offset, limit=PAGE).tasks:
            if task.state is not TaskState.FINISHED or task.exit_code != 0:
                bad.append(described(task))
    return bad


@dataclass
class Run:
    """What one cluster measured."""

    tasks: int
    ok: int = 0
    elapsed: float = 0.0
    submit_ms: float = 0.0
    latencies: list[float] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    shoal_cpu: float = 0.0
    machine_cpu: float = 0.0

    def percentile(self, q: float) -> float | None:
        return round(float(np.percentile(self.latencies, q)), 1) if self.latencies else None


@contextlib.contextmanager
def cluster_on(
    store: str, root: Path, agents: int, settings: dict[str, str], tls: bool
) -> Iterator[LiveCluster]:
    """A fresh cluster: one master on SQLite, or three masters on three etcd members."""
    if store == "etcd":
        with ha_cluster(
            root,
            masters=3,
            agents=agents,
            etcd_members=3,
            heartbeat_timeout=30,
            master_settings=settings,
            tls=tls,
        ) as cluster:
            yield cluster
    else:
        with live_cluster(
            root, agents=agents, heartbeat_timeout=30, master_settings=settings, tls=tls
        ) as cluster:
            yield cluster


def measure(
    root: Path,
    agents: int,
    tasks: int,
    starts: int,
    progress: Progress,
    what: str,
    store: str = "sqlite",
    **settings: str,
) -> Run:
    """The array's throughput and the start latency on a fresh cluster with these master settings."""
    run = Run(tasks)
    progress.console.print(f"{what}: starting the masters, etcd if any, and {agents} agents")
    with cluster_on(store, root, agents, settings, tls=False) as cluster, cluster.client() as client:
        array(cluster, client, tasks, run, progress, what)
        for _ in track(progress, f"{what}: start latency", starts):
            start(client, run)
    return run


def measure_tls(
    root: Path, agents: int, tasks: int, starts: int, progress: Progress, store: str
) -> tuple[Run, Run]:
    """The same work on a TLS cluster and a plain one, both up at once and taking turns,
    so that what drifts on the machine meanwhile falls on both alike: the array in
    `TLS_ROUNDS` parts on each, in the order plain, TLS, TLS, plain..., then single tasks
    alternately."""
    plain, secure = Run(tasks), Run(tasks)
    progress.console.print(f"starting two clusters (plain and TLS), etcd if any, and {agents} agents each")
    with (
        cluster_on(store, root / "plain", agents, {}, tls=False) as plain_cluster,
        cluster_on(store, root / "tls", agents, {}, tls=True) as tls_cluster,
        plain_cluster.client() as plain_client,
        tls_cluster.client() as tls_client,
    ):
        turns = {"plain": (plain_cluster, plain_client, plain), "TLS": (tls_cluster, tls_client, secure)}
        for what in ("plain", "TLS", "TLS", "plain") * (TLS_ROUNDS // 2):
            cluster, client, run = turns[what]
            array(cluster, client, tasks // TLS_ROUNDS, run, progress, what)
        for i in track(progress, "start latency, alternately", 2 * starts):
            _, client, run = turns["plain" if i % 2 else "TLS"]
            start(client, run)
    return secure, plain


def track(progress: Progress, what: str, total: int) -> Iterator[int]:
    bar = progress.add_task(what, total=total)
    for i in range(total):
        yield i
        progress.advance(bar)
    progress.remove_task(bar)


def array(cluster: LiveCluster, client: Client, tasks: int, run: Run, progress: Progress, what: str) -> None:
    """One array of `true` tasks, from submission until its last task has ended, added to `run`."""
    daemons = [psutil.Process(p.pid) for p in (*cluster.daemons(), *cluster.agents.values())]
    cpu_before = _cpu(daemons)
    machine_before = psutil.cpu_times()
    began = time.perf_counter()
    job = client.submit(JobSpec(command=["true"], count=tasks, resources=TINY))
    run.submit_ms += (time.perf_counter() - began) * 1000
    bar = progress.add_task(f"{what}: array", total=tasks)
    while True:
        view = client.job(job, limit=0)  # the counts, not the tasks
        done = sum(n for state, n in view.counts.items() if state in ENDED)
        progress.update(bar, completed=done)
        if view.state in (JobState.COMPLETE, JobState.FAILED, JobState.KILLED):
            break
        time.sleep(0.1)
    run.elapsed += time.perf_counter() - began
    run.shoal_cpu += _cpu(daemons) - cpu_before
    run.machine_cpu += _busy(psutil.cpu_times()) - _busy(machine_before)
    progress.remove_task(bar)
    failed = failures(client, job, tasks)
    run.failed += failed
    run.ok += tasks - len(failed)


def start(client: Client, run: Run) -> None:
    """One single-task job on the idle cluster: its start latency, by the master's record."""
    single = client.submit(JobSpec(command=["sleep", "0.2"], resources=TINY))
    final = client.wait(single, poll=0.05)
    task = final.tasks[0]
    if task.state is TaskState.FINISHED and task.exit_code == 0 and task.started_at is not None:
        run.latencies.append((task.started_at - final.submitted_at) * 1000)
    else:
        run.failed.append(described(task))


def _compared(args: argparse.Namespace, root: str, nofsync_tasks: int, progress: Progress) -> Run:
    """The run 1 is compared with: three masters on etcd, or fsync off."""
    if args.store == "etcd":
        return measure(Path(root) / "etcd", args.agents, args.tasks, args.starts, progress, "etcd", "etcd")
    return measure(
        Path(root) / "nofsync", args.agents, nofsync_tasks, args.starts, progress, "fsync off", fsync="false"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", type=int, default=4)
    parser.add_argument("--tasks", type=int, default=10_000)
    parser.add_argument("--starts", type=int, default=50, help="single tasks timed for start latency")
    parser.add_argument(
        "--nofsync-tasks", type=int, default=None, help="the array with fsync off (default: --tasks)"
    )
    parser.add_argument(
        "--store",
        choices=("sqlite", "etcd"),
        default="sqlite",
        help="etcd: compare three masters on etcd with one on SQLite, instead of fsync off",
    )
    parser.add_argument(
        "--tls", action="store_true", help="compare TLS with plain HTTP on --store, instead of fsync off"
    )
    args = parser.parse_args()
    nofsync_tasks = args.nofsync_tasks or args.tasks
    if "fsync" not in MasterSettings.model_fields:
        raise SystemExit("this master has no `fsync` setting (SHOAL_FSYNC): nothing to compare")
    # The clusters keep their files where agents keep theirs by default (the data home), not in
    # /tmp: every run is a sandbox directory with two files, and /tmp is often a tmpfs or, on
    # some machines, far slower at creating files than the disk an agent's state is on.
    data_home().mkdir(parents=True, exist_ok=True)
    with (
        tempfile.TemporaryDirectory(dir=data_home(), prefix="bench-") as root,
        Progress(transient=True) as progress,
    ):
        if args.tls:  # the TLS cluster's figures lead; the plain one's compare
            synced, other = measure_tls(
                Path(root), args.agents, args.tasks, args.starts, progress, args.store
            )
        else:
            synced = measure(Path(root) / "fsync", args.agents, args.tasks, args.starts, progress, "fsync on")
            other = _compared(args, root, nofsync_tasks, progress)
        progress.console.print("timing the machine's own spawn ceiling")
        ceiling = spawn_ceiling()
    main_run = other if args.store == "etcd" and not args.tls else synced
    figures: dict[str, Any] = {
        "agents": args.agents,
        "tasks": args.tasks,
        "ok_tasks": main_run.ok,
        "e2e_tasks_per_s": round(main_run.ok / main_run.elapsed),
        "spawn_ceiling_per_s": round(ceiling),
        "shoal_cpu_ms_per_task": round(main_run.shoal_cpu / args.tasks * 1000, 3),
        "machine_cpu_ms_per_task": round(main_run.machine_cpu / args.tasks * 1000, 3),
        "submit_ms": round(main_run.submit_ms, 1),
        "start_p50_ms": main_run.percentile(50),
        "start_p99_ms": main_run.percentile(99),
    }
    if args.tls:
        figures |= {
            "store": args.store,
            "plain_tasks_per_s": round(other.ok / other.elapsed),
            "plain_start_p50_ms": other.percentile(50),
            "plain_shoal_cpu_ms_per_task": round(other.shoal_cpu / args.tasks * 1000, 3),
            "tls_over_plain": round((synced.ok / synced.elapsed) / (other.ok / other.elapsed), 2),
        }
    elif args.store == "etcd":
        figures |= {
            "store": "etcd",
            "sqlite_tasks_per_s": round(synced.ok / synced.elapsed),
            "sqlite_start_p50_ms": synced.percentile(50),
            "etcd_vs_sqlite": round((other.ok / other.elapsed) / (synced.ok / synced.elapsed), 2),
        }
    else:
        figures |= {
            "nofsync_tasks": nofsync_tasks,
            "e2e_tasks_per_s_nofsync": round(other.ok / other.elapsed),
            "start_p50_ms_nofsync": other.percentile(50),
            "start_p99_ms_nofsync": other.percentile(99),
        }
    print(json.dumps(figures))
    failed = [*synced.failed, *other.failed]
    if failed:
        shown = "\n  ".join(failed[:10])
        more = f"\n  ... and {len(failed) - 10} more" if len(failed) > 10 else ""
        print(f"{len(failed)} tasks did not run to exit code 0:\n  {shown}{more}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
