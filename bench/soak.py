"""Soak: a long stream of short tasks through a live master, and whether its memory stays flat.

    python bench/soak.py --tasks 200000
    python bench/soak.py --tasks 5000        # a quick try

A master and `--agents` local agents on 127.0.0.1 run `--tasks` `true` tasks: arrays of
`--array` tasks, with single-task jobs between them (`--singles`, the share of tasks that
come as single-task jobs), no more than `--window` tasks unfinished at a time. The master
keeps finished jobs only briefly: its `job_retention` setting (SHOAL_JOB_RETENTION, seconds)
and `job_retention_count` (SHOAL_JOB_RETENTION_COUNT, jobs), `--retention` and
`--retention-count` here. Every job is read back through the API as soon as it has ended
(before the master forgets it), and a task counts only if it is FINISHED with exit code 0.

The master's resident memory (RSS) is taken after a warm-up (`--warmup` tasks in the same
mix, then a pause of the retention time so what it ran is forgotten) and again at the end
(after the same pause), and sampled in between. Prints one JSON line last: tasks, jobs,
agents, job_retention, job_retention_count, ok (tasks that ran to exit 0), lost (tasks that
did not, or that could not be checked: `unchecked` of them were forgotten by the master
before they were read, or never ended), tasks_per_s, rss_start_mb, rss_end_mb, rss_peak_mb
and rss_growth (end over start; the aim is at most 1.10). Exits 1 if lost > 0.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from shoal.client import ApiError, Client
from shoal.config import MasterSettings, data_home
from shoal.model import JobSpec, JobState, Resources, TaskState
from shoal.testing.live import live_cluster
from shoal.views import TaskView

TINY = Resources(cpus=0.01, mem=16)
ENDED = (JobState.COMPLETE, JobState.FAILED, JobState.KILLED)
JOB_DEADLINE = 300.0  # seconds a job of `true` tasks may take before it counts as lost
PAGE = 10_000


def plan(tasks: int, array: int, singles: float) -> Iterator[int]:
    """Job sizes: an array, then as many single-task jobs as keep their share, and again."""
    per_array = round(array * singles / (1 - singles)) if singles < 1 else None
    left = tasks
    while left > 0:
        if per_array is None:  # single-task jobs only
            left -= 1
            yield 1
            continue
        size = min(array, left)
        left -= size
        yield size
        for _ in range(min(per_array, left)):
            left -= 1
            yield 1


@dataclass
class Job:
    id: int
    count: int
    submitted: float


@dataclass
class Soak:
    """Jobs submitted and not yet checked, in submission order, and what the checked ones gave."""

    client: Client
    window: int
    jobs: dict[int, Job] = field(default_factory=dict)
    unfinished: int = 0  # tasks of the jobs not yet checked
    submitted_jobs: int = 0
    ok: int = 0
    lost: int = 0
    unchecked: int = 0
    failures: list[str] = field(default_factory=list)
    _last_full: float = 0.0

    def submit(self, count: int) -> None:
        job = self.client.submit(JobSpec(command=["true"], count=count, resources=TINY))
        self.jobs[job] = Job(job, count, time.monotonic())
        self.unfinished += count
        self.submitted_jobs += 1

    def _lose(self, job: Job, count: int, why: str) -> None:
        self.lost += count
        if len(self.failures) < 20:
            self.failures.append(f"job {job.id}: {why}")

    def _tasks(self, job: Job) -> list[TaskView]:
        tasks: list[TaskView] = []
        for offset in range(0, job.count, PAGE):
            tasks.extend(self.client.job(job.id, offset=offset, limit=PAGE).tasks)
        return tasks

    def check(self, job: Job) -> bool:
        """Whether `job` is done with: ended and its tasks counted (or lost)."""
        try:
            view = self.client.job(job.id, limit=1 if job.count == 1 else 0)
            if view.state not in ENDED:
                if time.monotonic() - job.submitted > JOB_DEADLINE:
                    self.unchecked += job.count
                    self._lose(job, job.count, f"still {view.state.value} after {JOB_DEADLINE:.0f}s")
                    return True
                return False
            tasks = view.tasks if job.count == 1 else self._tasks(job)
        except ApiError as e:
            if e.status != 404:
                raise
            self.unchecked += job.count
            self._lose(job, job.count, "forgotten by the master before it was checked")
            return True
        good = sum(1 for t in tasks if t.state is TaskState.FINISHED and t.exit_code == 0)
        self.ok += good
        if len(tasks) != job.count:
            self.unchecked += job.count - len(tasks)
        if good != job.count:
            bad = next((t for t in tasks if t.state is not TaskState.FINISHED or t.exit_code != 0), None)
            example = f"; {bad.id} {bad.state.value}, exit code {bad.exit_code} {bad.message}" if bad else ""
            self._lose(
                job, job.count - good, f"{job.count - good} of {job.count} tasks not run to 0{example}"
            )
        return True

    def sweep(self) -> int:
        """Check the jobs in order, and stop at the third in a row still running: the rest were
        submitted later and run later. Every two seconds, look on to the twentieth in a row,
        for a job that ended out of turn. Returns the tasks of the jobs done with."""
        full = time.monotonic() - self._last_full > 2.0
        if full:
            self._last_full = time.monotonic()
        done = misses = 0
        for job in list(self.jobs.values()):
            if self.check(job):
                del self.jobs[job.id]
                self.unfinished -= job.count
                done += job.count
                misses = 0
            else:
                misses += 1
                if misses >= (20 if full else 3):
                    break
        return done

    def run(self, sizes: Iterator[int], progress: Progress, what: str, total: int) -> None:
        """Submit the jobs of `sizes`, keeping at most `window` tasks unfinished, until all are checked."""
        bar = progress.add_task(what, total=total)
        upcoming = next(sizes, None)
        while upcoming is not None or self.jobs:
            # Submissions in short bursts between sweeps: a job that has ended must be read
            # back within the retention time, and a submission can take 0.1 s on a busy master.
            burst = time.monotonic() + 0.25
            while upcoming is not None and (self.unfinished + upcoming <= self.window or not self.jobs):
                self.submit(upcoming)
                upcoming = next(sizes, None)
                if time.monotonic() > burst:
                    break
            done = self.sweep()
            progress.advance(bar, done)
            if not done:
                time.sleep(0.05)
        progress.remove_task(bar)


def rss_mb(process: psutil.Process) -> float:
    return process.memory_info().rss / 2**20


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=200_000)
    parser.add_argument("--agents", type=int, default=3)
    parser.add_argument("--array", type=int, default=1000, help="tasks in each array")
    parser.add_argument("--singles", type=float, default=0.1, help="share of tasks run as single-task jobs")
    parser.add_argument("--window", type=int, default=2500, help="tasks unfinished at a time, at most")
    parser.add_argument(
        "--warmup",
        type=int,
        default=None,
        help="tasks run before the first RSS (default: a tenth of --tasks)",
    )
    # Short, but longer than this bench may take to read a job back on a loaded machine: a
    # job pruned before it was read counts as lost.
    parser.add_argument("--retention", type=float, default=30.0, help="the master's job_retention, seconds")
    parser.add_argument("--retention-count", type=int, default=2000, help="the master's job_retention_count")
    args = parser.parse_args()
    if args.warmup is None:
        args.warmup = args.tasks // 10
    if not 0 <= args.singles <= 1:
        parser.error("--singles is a share: 0 to 1")
    missing = [s for s in ("job_retention", "job_retention_count") if s not in MasterSettings.model_fields]
    if missing:
        print(
            f"warning: this master has no setting {', '.join(missing)}: it keeps finished jobs",
            file=sys.stderr,
        )
    settings = {"job_retention": str(args.retention), "job_retention_count": str(args.retention_count)}
    pause = args.retention + 2.0  # past the retention, and a tick of the master's clock
    data_home().mkdir(parents=True, exist_ok=True)  # where agents' sandboxes are quick to make
    with (
        tempfile.TemporaryDirectory(dir=data_home(), prefix="soak-") as root,
        Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            transient=True,
        ) as progress,
    ):
        progress.console.print(f"starting a master and {args.agents} agents")
        with (
            live_cluster(
                Path(root),
                agents=args.agents,
                heartbeat_timeout=30,
                heartbeat_interval=1.0,
                master_settings=settings,
                agent_settings={"keep_sandboxes": "30"},  # 200,000 sandboxes would fill a disk
            ) as cluster,
            cluster.client() as client,
        ):
            master = psutil.Process(cluster.master.pid)  # type: ignore[union-attr]
            warm = Soak(client, args.window)
            warm.run(plan(args.warmup, args.array, args.singles), progress, "warm-up", args.warmup)
            time.sleep(pause)
            rss_start = peak = rss_mb(master)
            soak = Soak(client, args.window)
            began = time.perf_counter()
            sizes = plan(args.tasks, args.array, args.singles)

            def sampled() -> Iterator[int]:
                nonlocal peak
                for size in sizes:
                    peak = max(peak, rss_mb(master))
                    yield size

            soak.run(sampled(), progress, "soak", args.tasks)
            elapsed = time.perf_counter() - began
            peak = max(peak, rss_mb(master))
            progress.console.print(
                f"{args.tasks} tasks in {elapsed:.0f}s; waiting {pause:.0f}s for the retention"
            )
            time.sleep(pause)
            rss_end = rss_mb(master)
    lost = soak.lost + warm.lost
    print(
        json.dumps(
            {
                "tasks": args.tasks,
                "jobs": soak.submitted_jobs,
                "agents": args.agents,
                "job_retention": args.retention if not missing else None,
                "job_retention_count": args.retention_count if not missing else None,
                "ok": soak.ok,
                "lost": lost,
                "unchecked": soak.unchecked + warm.unchecked,
                "tasks_per_s": round(soak.ok / elapsed, 1),
                "rss_start_mb": round(rss_start, 1),
                "rss_end_mb": round(rss_end, 1),
                "rss_peak_mb": round(peak, 1),
                "rss_growth": round(rss_end / rss_start, 3),
            }
        )
    )
    if lost:
        print(
            f"{lost} tasks did not run to exit code 0:",
            *warm.failures,
            *soak.failures,
            sep="\n  ",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
