"""Workloads: SWF, CSV and JSONL traces read into arrivals, and generated ones."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from shoal.workload import NO_PROCS, NO_RUN_TIME, Arrival, WorkloadError, generate, read, read_swf


def swf(
    job: int,
    submit: float,
    run: float,
    procs: int,
    *,
    requested: int = -1,
    limit: float = -1,
    user: int = 1,
    queue: int = 1,
) -> str:
    """One SWF line: the 18 fields, -1 for those the reader does not use."""
    fields = [job, submit, -1, run, procs, -1, -1, requested, limit, -1, 1, user, -1, -1, queue, -1, -1, -1]
    return " ".join(str(f) for f in fields)


HEADER = ["; Version: 2.2", "; MaxProcs: 64", ";"]


def test_swf_jobs_are_rigid_with_the_requested_time_as_limit() -> None:
    lines = [
        *HEADER,
        swf(7, 1000, 50, 16, limit=60, user=3, queue=2),
        swf(8, 1005, 30, -1, requested=4, user=4, queue=0),  # allocated unknown: requested
        swf(9, 1002, 90, 8, limit=60),  # ran past its limit: cut to it
    ]
    workload = read_swf(lines)
    assert workload.arrivals == [
        Arrival(id=7, submit=0, duration=50, user="u3", queue="q2", time_limit=60, procs=16),
        Arrival(id=9, submit=2, duration=60, user="u1", queue="q1", time_limit=60, procs=8),
        Arrival(id=8, submit=5, duration=30, user="u4", queue="q0", time_limit=None, procs=4),
    ]
    assert (workload.cut, dict(workload.skipped)) == (1, {})


def test_swf_jobs_that_cannot_run_are_counted_by_reason() -> None:
    lines = [swf(1, 0, 10, 8), swf(2, 1, -1, 8), swf(3, 2, 5, -1), swf(4, 3, -1, 0), swf(5, 4, 0, 1)]
    workload = read_swf(lines)
    assert [a.id for a in workload.arrivals] == [1, 5]
    assert dict(workload.skipped) == {NO_RUN_TIME: 2, NO_PROCS: 1}


def test_a_gzipped_swf_reads_like_a_plain_one(tmp_path: Path) -> None:
    text = "\n".join([*HEADER, swf(1, 10, 5, 8, limit=10), swf(2, 20, 5, 8, limit=10)]) + "\n"
    plain = tmp_path / "log.swf"
    plain.write_text(text)
    packed = tmp_path / "log.swf.gz"
    packed.write_bytes(gzip.compress(text.encode()))
    assert read(plain) == read(packed)
    assert [a.submit for a in read(packed).arrivals] == [0, 10]


def test_a_broken_swf_line_is_named(tmp_path: Path) -> None:
    path = tmp_path / "log.swf"
    path.write_text("\n".join([*HEADER, swf(1, 0, 5, 8), "2 3 4"]) + "\n")
    with pytest.raises(WorkloadError, match=r"log\.swf: line 5: 3 fields, SWF has 18"):
        read(path)


def test_an_swf_job_given_twice_is_named() -> None:
    with pytest.raises(WorkloadError, match=r"trace: line 5: job 1 is given twice"):
        read_swf([*HEADER, swf(1, 0, 10, 4), swf(1, 5, 10, 4)])


def test_csv_and_jsonl_traces_read_the_same(tmp_path: Path) -> None:
    csv = tmp_path / "t.csv"
    csv.write_text(
        "id,submit,duration,cpus,mem,count,user,time_limit,procs\n"
        "3,0,10,2,512,3,ann,,\n"
        ",5,4,,,,,,16\n"
        "9,6,30,,,,,20,\n"
    )
    jsonl = tmp_path / "t.jsonl"
    jsonl.write_text(
        "\n".join(
            json.dumps(r)
            for r in [
                {"id": 3, "submit": 0, "duration": 10, "cpus": 2, "mem": 512, "count": 3, "user": "ann"},
                {"submit": 5, "duration": 4, "procs": 16},
                {"id": 9, "submit": 6, "duration": 30, "time_limit": 20},
            ]
        )
    )
    want = [
        Arrival(3, 0, 10, cpus=2, mem=512, count=3, user="ann"),
        Arrival(2, 5, 4, procs=16),  # no id: its record number
        Arrival(9, 6, 20, time_limit=20),  # cut to its limit
    ]
    for path in (csv, jsonl):
        workload = read(path)
        assert (workload.arrivals, workload.cut) == (want, 1)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("submit,duration\n0,ten\n", "record 1"),
        ("submit,duration\n0,1\n2,3,colour\n", "record 2: more values than the header has columns"),
        ("submit,duration,colour\n0,1,red\n", "record 1: unknown columns ['colour']"),
        ("id,submit,duration\n4,0,1\n4,1,1\n", "record 2: id 4 is given twice"),
        ("submit,duration,procs,cpus\n0,1,8,2\n", "record 1: procs and nodes take the place of cpus"),
        ("submit,duration,procs,nodes\n0,1,8,2\n", "record 1: procs and nodes exclude each other"),
        ("submit,duration,nodes\n0,1,0\n", "record 1: nodes must be at least 1"),
        ("submit,cpus\n0,1\n", "record 1: no duration"),
        ("cpus\n1\n", "record 1: no submit and no duration"),
    ],
)
def test_a_bad_trace_names_the_record(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(WorkloadError, match=message.replace("[", r"\[").replace("]", r"\]")):
        read(path)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"submit": 0, "duration": 1}\n\n[1]\n', "record 2: not a JSON object"),
        ("{", "record 1: Expecting"),
        ('{"submit": 0, "duration": 1, "mem": 512.5}\n', "record 1: 512.5 is not a whole number"),
    ],
)
def test_a_bad_jsonl_record_is_named(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(text)
    with pytest.raises(WorkloadError, match=message):
        read(path)


def test_a_trace_is_read_as_far_as_its_first_jobs(tmp_path: Path) -> None:
    path = tmp_path / "log.swf"
    path.write_text(
        "\n".join([swf(1, 0, 1, 1), swf(2, 1, -1, 1), swf(3, 2, 9, 1, limit=5), swf(4, 3, -1, 1)])
    )
    workload = read(path, jobs=2)
    assert [a.id for a in workload.arrivals] == [1, 3]
    assert (dict(workload.skipped), workload.cut) == ({NO_RUN_TIME: 1}, 1)


def test_generated_workloads_are_seeded_and_numbered() -> None:
    a, b = generate(20, seed=4), generate(20, seed=4)
    assert a == b
    assert [x.id for x in a.arrivals] == list(range(1, 21))
    assert generate(20, seed=5) != a
