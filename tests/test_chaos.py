"""A short chaos run on network-namespace hosts (`shoal.testing.chaos`): three masters on
three etcd members, agents on hosts of their own, a steady workload, and three leader
kills, an etcd member killed, the leader cut from etcd and an agent's host isolated for
less than the heartbeat timeout. Nothing acknowledged may be lost, no task may run twice or
more often than its restart policy allows, every leader kill is followed by new work
accepted and started, the framework hears every task it launched end, and the registry
gives the service's running task."""

from __future__ import annotations

from pathlib import Path

import pytest

from shoal.model import Attempt, JobSpec, JobState, RestartPolicy, TaskState
from shoal.testing.chaos import (
    CUT_LEADER_ETCD,
    ISOLATE_AGENT,
    KILL_ETCD,
    KILL_LEADER,
    ChaosConfig,
    run_chaos,
)
from shoal.testing.chaos_checks import Submission, overlapping, read_history, verdict
from shoal.testing.hosts import clean_leftovers, require_netns
from shoal.views import JobView, TaskView

PLAN = (KILL_LEADER, KILL_ETCD, KILL_LEADER, CUT_LEADER_ETCD, ISOLATE_AGENT, KILL_LEADER)


@pytest.mark.timeout(240)
def test_a_short_chaos_run_loses_nothing_and_runs_nothing_twice(tmp_path) -> None:
    require_netns()
    clean_leftovers()
    # Short pauses between faults: the workload goes on through every fault and its settling.
    config = ChaosConfig(seed=3, plan=PLAN, long_jobs=1, end_timeout=60, pause=(0.2, 0.6))
    result = run_chaos(config, tmp_path)
    evidence = "\n".join(result.problems)
    assert result.faults == {KILL_LEADER: 3, KILL_ETCD: 1, CUT_LEADER_ETCD: 1, ISOLATE_AGENT: 1}
    assert result.acknowledged > 0 and result.complete > 0
    assert (result.lost, result.duplicates, result.repeated_runs) == (0, 0, 0), evidence
    assert result.over_restarted == 0, evidence
    assert result.unended_runs == 0, evidence
    assert result.framework_tasks > 0 and result.framework_unended == 0, evidence
    assert result.service_wrong == 0, evidence
    assert result.invariants == ""
    assert len(result.failovers) == 3
    assert all(f.submit_s is not None and f.launch_s is not None for f in result.failovers), result.failovers


# --- the checks on their own: what the records say ---------------------------------------


def _history(tmp_path: Path, node: str, *lines: str) -> Path:
    path = tmp_path / f"{node}.log"
    path.write_text("".join(f"{line}\n" for line in lines))
    return path


def _job(job_id: int, task: TaskView, attempts: int = 3) -> JobView:
    spec = JobSpec(command="true", restart=RestartPolicy(attempts=attempts))
    return JobView(
        id=job_id,
        name="",
        owner="admin",
        state=JobState.COMPLETE,
        submitted_at=0.0,
        spec=spec,
        counts={},
        tasks=[task],
    )


def test_runs_of_one_task_overlap_only_when_one_starts_before_the_other_ends(tmp_path) -> None:
    files = {
        "node1": _history(
            tmp_path, "node1", "start 1.0 0 10.0 0", "end 1.0 0 20.0 143", "start 2.0 0 10.0 0"
        ),
        "node2": _history(tmp_path, "node2", "start 1.0 1 20.5 0", "end 1.0 1 30.0 0", "start 2.0 1 15.0 0"),
    }
    runs = read_history(files)
    assert [(r.task_id, r.attempt, r.node, r.start, r.end) for r in runs] == [
        ("1.0", 0, "node1", 10.0, 20.0),
        ("2.0", 0, "node1", 10.0, None),
        ("1.0", 1, "node2", 20.5, 30.0),
        ("2.0", 1, "node2", 15.0, None),
    ]
    assert [(a.task_id, a.attempt, b.attempt) for a, b in overlapping(runs)] == [("2.0", 0, 1)]


def test_a_run_killed_with_sigkill_ends_when_its_agent_saw_it_end_and_a_lost_one_never(tmp_path) -> None:
    # Attempt 0 noted no end (SIGKILL); its agent reported it killed before attempt 1 started.
    killed = Attempt(attempt=0, node="node1", state=TaskState.FAILED, exit_code=-9, finished_at=19.0)
    first = TaskView(id="1.0", job_id=1, index=0, state=TaskState.FINISHED, attempt=1, node="node2",
                     finished_at=30.0, history=[killed])  # fmt: skip
    # Attempt 0 of 2.0 noted no end either, but the master only believed it lost.
    lost = Attempt(attempt=0, node="node1", state=TaskState.LOST, finished_at=19.0)
    second = TaskView(id="2.0", job_id=2, index=0, state=TaskState.FINISHED, attempt=1, node="node2",
                      finished_at=30.0, history=[lost])  # fmt: skip
    files = {
        "node1": _history(tmp_path, "node1", "start 1.0 0 10.0 0", "start 2.0 0 10.0 0"),
        "node2": _history(
            tmp_path,
            "node2",
            "start 1.0 1 20.0 0",
            "end 1.0 1 30.0 0",
            "start 2.0 1 20.0 0",
            "end 2.0 1 30.0 0",
        ),
    }
    submissions = [Submission("array", 0.0, 1.0, 1), Submission("array", 0.0, 1.0, 2)]
    found = verdict(submissions, {1: _job(1, first), 2: _job(2, second)}, read_history(files), set())
    assert (found.unended_runs, found.duplicates, found.false_lost, found.lost_reports) == (2, 1, 1, 1)
    assert found.lost == found.over_restarted == 0
    assert any("task 2.0 ran twice at once" in p for p in found.problems), found.problems
