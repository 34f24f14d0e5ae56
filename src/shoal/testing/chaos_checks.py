"""What really ran in a chaos run, and what it says: pure reading of the records the run
leaves (the tasks' histories, the masters' logs, what the client was told and what the final
leader holds), no process and no network.

A history line, appended by the task itself (see `shoal.testing.chaos`):

    start <task id> <attempt> <wall-clock time> 0
    end   <task id> <attempt> <wall-clock time> <exit status>

The verdict counts, each with its evidence in `problems`:
- lost: a job the client was told it had (an id came back) that the final leader does not
  have, or has not ended;
- duplicates: two runs of one task id at the same time, on any hosts (a run with no end runs
  on for ever); repeated_runs: one run id (task, attempt) started twice;
- over_restarted: a task that ran more attempts than 1 + its job's restart.attempts;
- false_lost: a LOST report (a task's current state or an earlier attempt) whose run noted
  its end after the report, or never: it ran on while the master believed it gone;
- unended_runs: runs that noted a start and no end: killed with SIGKILL (then the end its
  agent saw, as the final leader records it, stands in for the note), or still running.
"""

from __future__ import annotations

import datetime
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from shoal.model import JobState, TaskState
from shoal.views import JobView

ENDED = (JobState.COMPLETE, JobState.FAILED, JobState.KILLED)
_ELECTED = re.compile(r"^(\S+ \S+) INFO shoal\.master: elected leader \(fencing token (\d+)\)")


@dataclass
class Submission:
    kind: str
    sent: float  # wall clock, as the histories' times
    acked: float | None = None
    job_id: int | None = None  # None: unacknowledged (the call failed; it may exist or not)
    error: str = ""


@dataclass
class Run:
    task_id: str
    attempt: int
    node: str
    start: float
    end: float | None = None
    code: int | None = None

    @property
    def job_id(self) -> int:
        return int(self.task_id.split(".", 1)[0])

    def __str__(self) -> str:
        end = f"{self.end:.3f}" if self.end is not None else "never"
        return f"attempt {self.attempt} on {self.node} [{self.start:.3f} .. {end}]"


@dataclass(frozen=True)
class Fault:
    kind: str
    at: float  # wall clock when it was injected
    target: str = ""  # the master, member, host or link it hit


@dataclass(frozen=True)
class Failover:
    leader: str  # the master killed
    submit_s: float | None  # SIGKILL -> the first submission a new leader accepted
    launch_s: float | None  # SIGKILL -> the first start of a task of a job submitted after it


@dataclass
class Verdict:
    acknowledged: int = 0
    complete: int = 0  # acknowledged jobs that ended complete
    kept_unacknowledged: int = 0  # jobs on the final leader whose submission's call failed
    lost: int = 0
    duplicates: int = 0
    repeated_runs: int = 0
    over_restarted: int = 0
    false_lost: int = 0
    lost_reports: int = 0
    unended_runs: int = 0
    problems: list[str] = field(default_factory=list)


def read_history(files: dict[str, Path]) -> list[Run]:
    """Every run the histories (node -> file) hold, in the order they started on each node."""
    runs: list[Run] = []
    running: dict[tuple[str, str, int], Run] = {}
    for node, path in sorted(files.items()):
        for line in path.read_text().splitlines() if path.exists() else []:
            kind, task_id, attempt, at, code = line.split()
            key = (node, task_id, int(attempt))
            if kind == "start":
                running[key] = Run(task_id, int(attempt), node, float(at))
                runs.append(running[key])
            elif (run := running.pop(key, None)) is not None:
                run.end, run.code = float(at), int(code)
    return runs


def overlapping(runs: list[Run]) -> list[tuple[Run, Run]]:
    """Pairs of runs of one task id that ran at the same time."""
    by_task: dict[str, list[Run]] = defaultdict(list)
    for run in runs:
        by_task[run.task_id].append(run)
    pairs = []
    for same in by_task.values():
        same.sort(key=lambda r: r.start)
        for i, first in enumerate(same):
            end = first.end if first.end is not None else float("inf")
            pairs.extend((first, later) for later in same[i + 1 :] if later.start < end)
    return pairs


def verdict(
    submissions: list[Submission], views: dict[int, JobView], runs: list[Run], launched: set[int]
) -> Verdict:
    """What the records say, once every job had its time to end; `views`: the final leader's
    view of every job it has, by id; `launched`: the jobs a framework launched."""
    found = Verdict()
    acked = {s.job_id: s for s in submissions if s.job_id is not None}
    found.acknowledged = len(acked)
    found.kept_unacknowledged = len(set(views) - set(acked) - launched)
    for job_id, s in sorted(acked.items()):
        view = views.get(job_id)
        if view is not None and view.state is JobState.COMPLETE:
            found.complete += 1
        if view is None or view.state not in ENDED:
            found.lost += 1
            state = "missing" if view is None else view.state.value
            found.problems.append(f"job {job_id} ({s.kind}, acknowledged at {s.acked:.3f}) is {state}")
    _unnoted_ends(found, views, runs)
    _runs(found, runs)
    _attempts(found, views, runs)
    _lost_reports(found, views, runs)
    return found


def _unnoted_ends(found: Verdict, views: dict[int, JobView], runs: list[Run]) -> None:
    """A run killed with SIGKILL notes no end: it ended when its agent saw it end, as the final
    leader records, if it does (else it runs on, as far as anyone can tell)."""
    ends = {
        (task.id, e.attempt): e
        for view in views.values()
        for task in view.tasks
        for e in [*task.history, task]
        if e.finished_at is not None
    }
    for run in runs:
        if run.end is not None:
            continue
        found.unended_runs += 1
        seen = ends.get((run.task_id, run.attempt))
        # A LOST record is the master's belief, not an end anyone saw: it proves nothing.
        if seen is not None and seen.state is not TaskState.LOST and run.node == seen.node:
            run.end, run.code = seen.finished_at, seen.exit_code
            why = f"its agent saw it end at {run.end:.3f} ({seen.message})"
        else:
            why = "nor did any master see it end"
        found.problems.append(f"task {run.task_id}, {run}, noted no end; {why}")


def _runs(found: Verdict, runs: list[Run]) -> None:
    pairs = overlapping(runs)
    found.duplicates = len(pairs)
    found.problems.extend(f"task {a.task_id} ran twice at once: {a} and {b}" for a, b in pairs)
    first: dict[tuple[str, int], Run] = {}
    for run in runs:
        if (earlier := first.setdefault((run.task_id, run.attempt), run)) is not run:
            found.repeated_runs += 1
            found.problems.append(f"run {run.task_id}.{run.attempt} started twice: {earlier} and {run}")


def _attempts(found: Verdict, views: dict[int, JobView], runs: list[Run]) -> None:
    attempts: dict[str, set[int]] = defaultdict(set)
    for run in runs:
        attempts[run.task_id].add(run.attempt)
    for task_id, seen in sorted(attempts.items()):
        view = views.get(int(task_id.split(".", 1)[0]))
        allowed = 1 + view.spec.restart.attempts if view is not None else None
        if allowed is not None and len(seen) > allowed:
            found.over_restarted += 1
            found.problems.append(f"task {task_id} ran attempts {sorted(seen)}; its policy allows {allowed}")


def _lost_reports(found: Verdict, views: dict[int, JobView], runs: list[Run]) -> None:
    by_run = {(r.task_id, r.attempt): r for r in runs}
    for view in views.values():
        for task in view.tasks:
            reports = [
                (a.attempt, a.finished_at, a.message) for a in task.history if a.state is TaskState.LOST
            ]
            if task.state is TaskState.LOST:
                reports.append((task.attempt, task.finished_at, task.message))
            for attempt, at, message in reports:
                found.lost_reports += 1
                run = by_run.get((task.id, attempt))
                if run is not None and at is not None and (run.end is None or run.end > at):
                    found.false_lost += 1
                    found.problems.append(
                        f"task {task.id} attempt {attempt} reported LOST at {at:.3f} ({message})"
                        f" but ran on: {run}"
                    )


def failovers(kills: list[Fault], submissions: list[Submission], runs: list[Run]) -> list[Failover]:
    """For each leader kill, until the next: the first acceptance and the first start of work
    submitted after it."""
    found = []
    for i, kill in enumerate(kills):
        until = kills[i + 1].at if i + 1 < len(kills) else float("inf")
        acks = [s.acked for s in submissions if s.acked is not None and kill.at < s.acked < until]
        jobs = {s.job_id for s in submissions if s.job_id is not None and kill.at <= s.sent < until}
        starts = [r.start for r in runs if r.job_id in jobs]
        submit = round(min(acks) - kill.at, 3) if acks else None
        found.append(Failover(kill.target, submit, round(min(starts) - kill.at, 3) if starts else None))
    return found


def elections(logs: list[Path]) -> list[float]:
    """When a master was elected, from the masters' logs (their local-time stamps), in order."""
    found = []
    for path in logs:
        for line in path.read_text(errors="replace").splitlines() if path.exists() else []:
            if match := _ELECTED.match(line):
                stamp = datetime.datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f")
                found.append(stamp.timestamp())
    return sorted(found)


def by_fault(faults: list[Fault], times: list[float]) -> dict[str, int]:
    """How many of `times` fall from each fault to the next, summed by kind of fault."""
    counts = dict.fromkeys((f.kind for f in faults), 0)
    for i, fault in enumerate(faults):
        until = faults[i + 1].at if i + 1 < len(faults) else float("inf")
        counts[fault.kind] += sum(1 for at in times if fault.at <= at < until)
    return counts
