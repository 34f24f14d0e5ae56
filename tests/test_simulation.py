"""`shoal sim`: workloads through the real master and agents on a virtual clock, the report,
and the command."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import pytest

from shoal.core.scheduler import Policy, QueuePolicy
from shoal.simulation import (
    UNFIT,
    Cluster,
    Shape,
    job_spec,
    map_queues,
    parse_queue_map,
    seconds,
    shape,
    simulate,
)
from shoal.workload import Arrival, Workload, WorkloadError, generate

FIFO = Policy(queues={"default": QueuePolicy(order="fifo")})


def rigid(
    id: int, submit: float, run: float, procs: int, limit: float | None = None, **kw: object
) -> Arrival:
    return Arrival(id=id, submit=submit, duration=run, procs=procs, time_limit=limit, **kw)  # type: ignore[arg-type]


# --- shapes and queues ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("arrival", "want"),
    [
        (rigid(1, 0, 5, 8), Shape(1, 8.0, 0, False)),
        (rigid(1, 0, 5, 12), Shape(2, 6.0, 0, True)),
        (rigid(1, 0, 5, 3), Shape(1, 3.0, 0, False)),
        (Arrival(1, 0, 5, nodes=3), Shape(3, 8.0, 0, True)),
        (Arrival(1, 0, 5, cpus=2, mem=512, count=4), Shape(4, 2.0, 512, False)),
    ],
)
def test_a_job_is_shaped_to_nodes_of_8_cpus(arrival: Arrival, want: Shape) -> None:
    assert shape(arrival, 8) == want


def test_a_rigid_job_sleeps_for_its_run_to_the_last_digit() -> None:
    spec = job_spec(rigid(1, 0, 2077, 24, limit=5400, queue="q3"), 8)
    assert (spec.command, spec.count, spec.resources.cpus, spec.resources.mem) == ("sleep 2077.0", 3, 8, 0)
    assert (spec.gang, spec.time_limit, spec.queue) == (True, 5400, "q3")
    assert seconds(1e-05) == "0.00001" and seconds(1e16) == "10000000000000000"
    assert float(seconds(0.1 + 0.2)) == 0.1 + 0.2


def test_every_queue_of_a_trace_is_configured_or_mapped() -> None:
    workload = Workload([rigid(1, 0, 1, 1, queue="q1"), rigid(2, 0, 1, 1, queue="q2"), rigid(3, 0, 1, 1)])
    with pytest.raises(WorkloadError, match=r"queues q1, q2 are not configured: map them with --queue q1="):
        map_queues(workload, {"default"}, {})
    mapped = map_queues(workload, {"default", "batch"}, parse_queue_map(["q1=batch", "*=default"]))
    assert [a.queue for a in mapped.arrivals] == ["batch", "default", "default"]
    with pytest.raises(WorkloadError, match="maps to nowhere, not configured"):
        map_queues(workload, {"default"}, {"*": "nowhere"})
    with pytest.raises(WorkloadError, match="expected SRC=DST"):
        parse_queue_map(["q1"])


def test_a_job_the_cluster_could_never_hold_is_an_error_or_skipped() -> None:
    workload = Workload([rigid(1, 0, 1, 8), rigid(2, 0, 1, 24), rigid(3, 1, 1, 16)])
    cluster = Cluster(nodes=2, cpus=8, mem=1024)
    with pytest.raises(
        WorkloadError, match="job 2 never fits the cluster: 3 tasks of 8 cpus must start together"
    ):
        simulate(workload, cluster, FIFO)
    report = simulate(workload, cluster, FIFO, skip_unfit=True)
    assert (report.jobs, report.skipped) == (2, {UNFIT: 1})


# --- runs -----------------------------------------------------------------------------------


def test_a_small_run_has_exact_waits_and_figures() -> None:
    # Two nodes of 2 cpus; four 2-cpu jobs of 10 s at 0: two run at once, two wait 10 s.
    arrivals = [
        Arrival(i, 0, 10, cpus=2, mem=0, user=u) for i, u in enumerate(["ann", "ann", "bob", "bob"], 1)
    ]
    report = simulate(Workload(arrivals), Cluster(2, 2, 4096), FIFO)
    assert (report.jobs, report.tasks, report.failed, report.preemptions) == (4, 4, 0, 0)
    assert (report.makespan, report.utilization) == (20, 1.0)
    assert [(r.start, r.end) for r in report.runs] == [(0, 10), (0, 10), (10, 20), (10, 20)]
    w = report.wait
    assert (w.wait_mean, w.wait_p50, w.wait_max, w.slowdown_mean) == (5, 5, 10, 1.5)
    assert set(report.by_user) == {"ann", "bob"} and report.by_queue["default"].jobs == 4


def test_a_rigid_job_spans_nodes_as_a_gang() -> None:
    # 16 processors on nodes of 8: both nodes at once, after the 4-processor job ends.
    arrivals = [rigid(1, 0, 5, 4, limit=5), rigid(2, 1, 7, 16, limit=7)]
    report = simulate(Workload(arrivals), Cluster(2, 8, 1024), FIFO)
    first, second = report.runs
    assert (second.start, second.end, second.cpus, second.nodes) == (5, 12, 16, ("node1", "node2"))
    assert report.utilization == round((4 * 5 + 16 * 7) / (16 * 12), 4)
    assert report.late_heads == 0 and second.promised == 5
    assert report.failed == 0  # runs as long as their limits: stopped there or ended, as traced


def test_priorities_preempt_in_the_simulation_too() -> None:
    arrivals = [Arrival(1, 0, 30, cpus=2), Arrival(2, 0, 30, cpus=2), Arrival(3, 5, 5, cpus=2, priority=9)]
    report = simulate(Workload(arrivals), Cluster(2, 2, 4096), Policy(queues={"default": QueuePolicy()}))
    assert report.preemptions == 1 and report.failed == 0


def test_the_same_workload_gives_the_same_figures() -> None:
    runs = [simulate(generate(40, seed=7, rate=1.0, mean_duration=20), Cluster(4, 4, 8192)) for _ in range(2)]
    assert runs[0].summary() == runs[1].summary()
    assert runs[0].runs == runs[1].runs


# --- the command ----------------------------------------------------------------------------


def shoal_sim(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "shoal", "sim", *args], capture_output=True, text=True, timeout=120
    )


def test_the_command_prints_json_writes_jobs_and_draws_a_plot(tmp_path: Path) -> None:
    trace = tmp_path / "t.jsonl"
    trace.write_text(
        "\n".join(json.dumps({"submit": i, "duration": 5, "cpus": 1, "user": f"u{i % 2}"}) for i in range(10))
    )
    png, jobs = tmp_path / "out.png", tmp_path / "jobs.jsonl"
    run = shoal_sim(
        *("--nodes", "2", "--cpus", "2", "--trace", str(trace)),
        *("--plot", str(png), "--jobs-out", str(jobs), "--json"),
    )
    assert run.returncode == 0, run.stderr
    figures = json.loads(run.stdout.strip().splitlines()[-1])
    assert figures["tasks"] == 10 and set(figures["by_user"]) == {"u0", "u1"}
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    records = [json.loads(line) for line in jobs.read_text().splitlines()]
    assert [r["id"] for r in records] == list(range(1, 11))
    assert set(records[0]) == {"id", "user", "queue", "submit", "start", "end", "cpus", "nodes"}


def test_the_command_reads_swf_and_says_how_to_map_its_queues(tmp_path: Path) -> None:
    lines = [f"{i} {10 * i} -1 5 8 -1 -1 8 10 -1 1 {i % 3} -1 -1 {i % 2} -1 -1 -1" for i in range(1, 7)]
    trace = tmp_path / "log.swf.gz"
    trace.write_bytes(gzip.compress(("; a header\n" + "\n".join(lines) + "\n").encode()))
    refused = shoal_sim("--nodes", "2", "--trace", str(trace))
    assert refused.returncode == 2
    assert "q0, q1 are not configured" in refused.stderr and "--queue" in refused.stderr
    run = shoal_sim("--nodes", "2", "--trace", str(trace), "--queue", "*=default", "--jobs", "4", "--json")
    assert run.returncode == 0, run.stderr
    figures = json.loads(run.stdout.strip().splitlines()[-1])
    assert (figures["jobs"], figures["wait"]["wait_max"], figures["late_heads"]) == (4, 0, 0)
