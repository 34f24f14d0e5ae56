"""`shoal sim`: traces in, the real scheduler on a virtual clock, figures and a plot out."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from shoal.core.scheduler import Policy, QueuePolicy
from shoal.simulation import Arrival, generate, load_trace, simulate


def test_csv_and_jsonl_traces_read_the_same(tmp_path: Path) -> None:
    csv = tmp_path / "t.csv"
    csv.write_text("submit,duration,cpus,mem,count,user\n0,10,2,512,3,ann\n5,4,1,,,\n")
    jsonl = tmp_path / "t.jsonl"
    jsonl.write_text(
        '{"submit": 5, "duration": 4, "cpus": 1}\n'
        '{"submit": 0, "duration": 10, "cpus": 2, "mem": 512, "count": 3, "user": "ann"}\n'
    )
    want = [Arrival(0, 10, 2, 512, 3, "ann"), Arrival(5, 4, 1)]
    assert load_trace(csv) == want
    assert load_trace(jsonl) == want


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("submit,duration\n0,ten\n", "record 1"),
        ("submit,duration,colour\n0,1,red\n", "unknown columns ['colour']"),
    ],
)
def test_a_bad_trace_names_the_record(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_trace(path)


def test_a_small_run_waits_as_expected() -> None:
    # two nodes of 2 cpus; four 2-cpu tasks of 10 s at once: two run, two wait 10 s
    arrivals = [Arrival(submit=0, duration=10, cpus=2, user=u) for u in ("ann", "ann", "bob", "bob")]
    report = simulate(arrivals, nodes=2, cpus=2, mem=4096, sample_every=1.0)
    assert (report.jobs, report.tasks, report.preemptions) == (4, 4, 0)
    assert 19 <= report.makespan <= 22
    waits = report.wait_by_queue["default"]
    assert waits["p50"] < 10.5 and 9.5 <= waits["p99"] <= 10.5
    assert report.mean_utilization > 0.85


def test_priorities_preempt_in_the_simulation_too() -> None:
    arrivals = [Arrival(0, 30, cpus=2), Arrival(0, 30, cpus=2), Arrival(5, 5, cpus=2, priority=9)]
    report = simulate(arrivals, nodes=2, cpus=2, mem=4096, policy=Policy(queues={"default": QueuePolicy()}))
    assert report.preemptions == 1


def test_the_same_seed_gives_the_same_figures() -> None:
    runs = [
        simulate(generate(40, seed=7, rate=1.0, mean_duration=20), nodes=4, cpus=4, mem=8192, seed=3)
        for _ in range(2)
    ]
    assert runs[0].summary() == runs[1].summary()


def test_the_command_prints_json_and_draws_a_plot(tmp_path: Path) -> None:
    trace = tmp_path / "t.jsonl"
    trace.write_text(
        "\n".join(json.dumps({"submit": i, "duration": 5, "cpus": 1, "user": f"u{i % 2}"}) for i in range(10))
    )
    png = tmp_path / "out.png"
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "shoal",
            "sim",
            "--nodes",
            "2",
            "--cpus",
            "2",
            "--trace",
            str(trace),
            "--plot",
            str(png),
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    figures = json.loads(run.stdout.strip().splitlines()[-1])
    assert figures["tasks"] == 10 and set(figures["wait_by_user"]) == {"u0", "u1"}
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
