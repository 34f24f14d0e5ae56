"""Job history: what a run used, measured as it ends and kept with its task, and the pages of
ended tasks `GET /v1/history` answers (pure: property tests over ledgers of any shape)."""

from __future__ import annotations

import asyncio
import resource
import sys
import typing
from pathlib import Path

import pytest
import typer
from hypothesis import given, settings
from hypothesis import strategies as st
from test_master_state import register, submit

from shoal.agent.cgroups import Cgroups
from shoal.agent.runner import Runner
from shoal.agent.state import AgentState, Exited, FromMaster, Spawned
from shoal.agent.usage import Spent, spent
from shoal.agent.users import Users
from shoal.cli.durations import moment
from shoal.master.events import FromAgent, Persist
from shoal.master.history import EndState, Query, page
from shoal.master.ledger import Ledger
from shoal.master.state import MasterState
from shoal.model import TASK_RECORD, TERMINAL, JobRecord, JobSpec, Resources, TaskRecord, TaskState
from shoal.testing.sim import sim_node
from shoal.wire import Launch, RunReport, RunReports, RunSpec, decode, encode

# --- what a run used, measured when it ends ----------------------------------------------


def _rusage(user: float, system: float, maxrss_kib: int) -> resource.struct_rusage:
    return resource.struct_rusage((user, system, maxrss_kib, *[0] * 13))


def test_an_ended_runs_figures_come_from_its_cgroup_v2(tmp_path: Path) -> None:
    group = tmp_path / "1.0.0"
    group.mkdir()
    (group / "cpu.stat").write_text("usage_usec 2500000\nuser_usec 2000000\nsystem_usec 500000\n")
    (group / "memory.peak").write_text(f"{100 * 2**20 + 1}\n")
    # The cgroup speaks for every process of the run; the reaped one's rusage only for itself.
    assert spent(Cgroups(2, (tmp_path,)), "1.0.0", _rusage(0.1, 0.1, 1024)) == Spent(2.5, 101)


def test_figures_a_cgroup_v1_lacks_come_from_the_reaped_process(tmp_path: Path) -> None:
    cpu, memory = tmp_path / "cpu", tmp_path / "memory"
    (memory / "1.0.0").mkdir(parents=True)
    (cpu / "1.0.0").mkdir(parents=True)  # no cpuacct here: the controllers are mounted apart
    (memory / "1.0.0" / "memory.max_usage_in_bytes").write_text(str(64 * 2**20))
    groups = Cgroups(1, (cpu, memory))
    assert spent(groups, "1.0.0", _rusage(1.25, 0.25, 4096)) == Spent(1.5, 64)
    (cpu / "1.0.0" / "cpuacct.usage").write_text("3000000000")
    assert spent(groups, "1.0.0", _rusage(1.25, 0.25, 4096)) == Spent(3.0, 64)


def test_without_cgroups_or_a_reaped_process_nothing_is_made_up(tmp_path: Path) -> None:
    assert spent(None, "1.0.0", _rusage(0.5, 0.25, 2049)) == Spent(0.75, 3)  # KiB, rounded up
    assert spent(None, "1.0.0", None) == Spent()  # adopted after a restart: not the agent's child
    (tmp_path / "1.0.0").mkdir()
    (tmp_path / "1.0.0" / "cpu.stat").write_text("garbage")
    assert spent(Cgroups(2, (tmp_path,)), "1.0.0", None) == Spent()


def test_a_run_reports_the_cpu_and_memory_its_process_tree_used(tmp_path: Path) -> None:
    burn = (
        "import time\nx = b'1' * (48 << 20)\n"
        "end = time.process_time() + 0.4\nwhile time.process_time() < end: pass"
    )
    # A child the shell waited for: its figures count too.
    command = ["sh", "-c", '"$0" -c "$1"; true', sys.executable, burn]

    async def main() -> Spent:
        done: asyncio.Future[Spent] = asyncio.get_running_loop().create_future()
        runner = Runner(tmp_path, lambda run, code, used: done.set_result(used), None, Users(None, True))
        runner.spawn(RunSpec(run_id="1.0.0", task_id="1.0", attempt=0, argv=command, resources=Resources()))
        return await asyncio.wait_for(done, 20)

    used = asyncio.run(main())
    assert used.cpu_seconds is not None and 0.35 <= used.cpu_seconds < 10
    assert used.peak_mem is not None and 48 <= used.peak_mem < 512


def test_the_agent_reports_what_an_ended_run_used() -> None:
    agent = AgentState(sim_node("n1"))
    spec = RunSpec(run_id="1.0.0", task_id="1.0", attempt=0, argv=["true"], resources=Resources())
    agent.handle(FromMaster(Launch(runs=[spec]), 0.0), Spawned("1.0.0", 42, 1.0, 0.1))
    commands = agent.handle(Exited("1.0.0", -9, 2.0, None, 1.5, 96))
    (report,) = next(c for c in commands if hasattr(c, "frame")).frame.reports
    assert (report.state, report.exit_code, report.cpu_seconds, report.peak_mem) == (
        TaskState.FAILED,
        -9,
        1.5,
        96,
    )


def test_frames_and_records_from_before_the_figures_load_without_them() -> None:
    old = RunReport(run_id="1.0.0", task_id="1.0", attempt=0, state=TaskState.FINISHED)
    assert decode(encode(RunReports(reports=[old]))).reports[0].cpu_seconds is None
    stored = (
        b'{"id":"1.0","job_id":1,"index":0,"state":"finished",'
        b'"history":[{"attempt":0,"node":"n1","state":"failed"}]}'
    )
    task = TASK_RECORD.validate_json(stored)
    assert task.cpu_seconds is None and task.peak_mem is None and task.history[0].peak_mem is None
    with pytest.raises(ValueError):
        RunReport.model_validate({**old.model_dump(), "cpu_seconds": float("nan")})


def test_the_master_keeps_a_runs_figures_with_its_task_and_its_attempts() -> None:
    state = MasterState()
    register(state, "n1")
    job, _ = submit(state, resources={"cpus": 1}, restart={"attempts": 1, "delay": 0})
    run = dict(task_id=f"{job}.0", state=TaskState.RUNNING)
    state.handle(FromAgent("n1", RunReports(reports=[RunReport(run_id=f"{job}.0.0", attempt=0, **run)]), 1))
    failed = RunReport(
        run_id=f"{job}.0.0",
        task_id=f"{job}.0",
        attempt=0,
        state=TaskState.FAILED,
        exit_code=1,
        cpu_seconds=2.0,
        peak_mem=10,
    )
    commands = state.handle(FromAgent("n1", RunReports(reports=[failed]), 2))
    task = state.ledger.tasks[f"{job}.0"]
    assert (task.state, task.attempt, task.cpu_seconds, task.peak_mem) == (TaskState.ASSIGNED, 1, None, None)
    assert (task.history[0].cpu_seconds, task.history[0].peak_mem) == (2.0, 10)
    assert task in next(c for c in commands if isinstance(c, Persist)).tasks
    state.handle(FromAgent("n1", RunReports(reports=[RunReport(run_id=f"{job}.0.1", attempt=1, **run)]), 3))
    done = RunReport(
        run_id=f"{job}.0.1",
        task_id=f"{job}.0",
        attempt=1,
        state=TaskState.FINISHED,
        exit_code=0,
        cpu_seconds=3.5,
        peak_mem=20,
    )
    state.handle(FromAgent("n1", RunReports(reports=[done]), 4))
    assert (task.state, task.cpu_seconds, task.peak_mem) == (TaskState.FINISHED, 3.5, 20)
    (row,) = page(state.ledger, Query()).entries
    assert (row.attempts, row.cpu_seconds, row.peak_mem, row.exit_code, row.node) == (2, 3.5, 20, 0, "n1")
    assert (row.started_at, row.finished_at, row.submitted_at) == (3, 4, 0)


def test_a_signal_is_named_apart_from_an_exit_status() -> None:
    state = MasterState()
    register(state, "n1")
    job, _ = submit(state, resources={"cpus": 1}, count=2)
    reports = [
        RunReport(run_id=f"{job}.0.0", task_id=f"{job}.0", attempt=0, state=TaskState.FAILED, exit_code=-9),
        RunReport(run_id=f"{job}.1.0", task_id=f"{job}.1", attempt=0, state=TaskState.FAILED, exit_code=3),
    ]
    state.handle(FromAgent("n1", RunReports(reports=reports), 1))
    rows = page(state.ledger, Query()).entries
    assert [(r.exit_code, r.signal, r.state) for r in rows] == [
        (None, "SIGKILL", TaskState.FAILED),
        (3, None, TaskState.FAILED),
    ]


def test_the_states_history_takes_are_the_end_states() -> None:
    assert set(typing.get_args(EndState)) == {s.value for s in TERMINAL}


def test_moments_are_durations_ago_or_iso_times() -> None:
    assert moment("1h", 10_000.0) == 6400.0
    assert moment("90", 10_000.0) == 9910.0
    assert moment("2024-05-01T12:00:00+00:00", 0.0) == 1714564800.0
    with pytest.raises(typer.BadParameter):
        moment("yesterday", 0.0)


# --- pages of ended tasks, over ledgers of any shape --------------------------------------

OWNERS = ("alice", "bob", "carol")
NODES = ("n1", "n2", None)
STATES = (TaskState.PENDING, *sorted(TERMINAL, key=lambda s: s.value))


@st.composite
def ledgers(draw: st.DrawFn) -> tuple[list[JobRecord], list[TaskRecord]]:
    jobs, tasks = [], []
    for job_id in range(1, draw(st.integers(0, 12)) + 1):
        count = draw(st.integers(1, 4))
        submitted = float(draw(st.integers(0, 50)))
        owner = draw(st.sampled_from(OWNERS))
        jobs.append(
            JobRecord(
                id=job_id, owner=owner, spec=JobSpec(command="true", count=count), submitted_at=submitted
            )
        )
        for index in range(count):
            state = draw(st.sampled_from(STATES))
            ended = submitted + draw(st.integers(0, 50)) if state.terminal else None
            node = draw(st.sampled_from(NODES)) if state.terminal else None
            tasks.append(
                TaskRecord(
                    id=f"{job_id}.{index}",
                    job_id=job_id,
                    index=index,
                    state=state,
                    node=node,
                    finished_at=ended,
                )
            )
    return jobs, tasks


queries = st.builds(
    Query,
    owner=st.sampled_from((None, *OWNERS)),
    states=st.sampled_from(
        (TERMINAL, frozenset({TaskState.FINISHED}), frozenset({TaskState.FAILED, TaskState.LOST}))
    ),
    since=st.sampled_from((None, 0.0, 25.0, 60.0)),
    until=st.sampled_from((None, 30.0, 75.0)),
    node=st.sampled_from((None, "n1", "n2")),
)


def expected(jobs: list[JobRecord], tasks: list[TaskRecord], query: Query) -> list[str]:
    """The rows `query` asks for, found the slow way: every task of every job, looked at."""
    by_id = {t.id: t for t in tasks}
    rows = []
    for job in sorted(jobs, key=lambda j: -j.id):
        if query.owner not in (None, job.owner):
            continue
        for index in range(job.spec.count):
            task = by_id[f"{job.id}.{index}"]
            ended = task.finished_at
            if (
                task.state in query.states
                and (query.node is None or task.node == query.node)
                and (query.since is None or (ended is not None and ended >= query.since))
                and (query.until is None or (ended is not None and ended < query.until))
            ):
                rows.append(task.id)
    return rows


class CountingTasks(dict):
    """A ledger's tasks, counting the look-ups a page makes."""

    looked = 0

    def get(self, key, default=None):
        self.looked += 1
        return super().get(key, default)


@given(ledgers(), queries, st.integers(1, 5), st.integers(1, 12))
@settings(max_examples=300, deadline=None)
def test_pages_followed_to_the_end_list_exactly_the_ended_tasks_asked_for(shape, query, limit, scan) -> None:
    jobs, tasks = shape
    ledger = Ledger(jobs=jobs, tasks=tasks)
    ledger.tasks = counting = CountingTasks(ledger.tasks)
    listed: list[str] = []
    after = None
    for _ in range(len(tasks) + len(jobs) + 2):  # every page looks at one job or task at least
        counting.looked = 0
        got = page(ledger, query, after, limit, scan)
        assert len(got.entries) <= limit and counting.looked <= scan
        listed += [e.task_id for e in got.entries]
        if got.next is None:
            break
        job_id, index = map(int, got.next.split("."))
        after = (job_id, index)
    else:
        pytest.fail("the pages never ended")
    assert listed == expected(jobs, tasks, query)


@given(ledgers(), queries, st.integers(1, 4), st.data())
@settings(max_examples=200, deadline=None)
def test_a_cursor_stays_good_while_jobs_come_and_are_forgotten(shape, query, limit, data) -> None:
    jobs, tasks = shape
    wanted = expected(jobs, tasks, query)
    ledger = Ledger(jobs=jobs, tasks=tasks)
    listed: list[str] = []
    after = None
    kept = {j.id for j in jobs}
    for _ in range(len(tasks) + 2):
        got = page(ledger, query, after, limit)
        listed += [e.task_id for e in got.entries]
        if got.next is None:
            break
        job_id, index = map(int, got.next.split("."))
        after = (job_id, index)
        # Between two pages, some jobs are forgotten and a new one comes (after the cursor, it
        # is not listed): the next page is read from the ledger as it is then.
        kept -= set(data.draw(st.lists(st.sampled_from(sorted(kept)), max_size=2))) if kept else set()
        newer = JobRecord(id=len(jobs) + 1, owner="alice", spec=JobSpec(command="x"), submitted_at=0)
        ended = TaskRecord(
            id=f"{newer.id}.0", job_id=newer.id, index=0, state=TaskState.FINISHED, finished_at=40
        )
        rest = [t for t in tasks if t.job_id in kept] + [ended]
        ledger = Ledger(jobs=[j for j in jobs if j.id in kept] + [newer], tasks=rest)
    assert len(listed) == len(set(listed))
    assert [t for t in wanted if t in listed] == listed  # in order, nothing else
    assert {t for t in wanted if int(t.split(".")[0]) in kept} <= set(listed)
