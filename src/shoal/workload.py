"""The workload `shoal sim` replays: jobs as they arrive, generated or read from a trace.

A job either asks for `count` tasks of `cpus` and `mem` each, or is a rigid parallel job of
`procs` processors or `nodes` whole nodes, shaped to the simulated cluster when it is run.
Traces, plain or gzipped (`.gz`):

    SWF    the Standard Workload Format of the Parallel Workloads Archive (`.swf`): one
           job a line, 18 fields, -1 where unknown; `;` lines are header comments
    CSV    id,submit,duration,cpus,mem,count,user,queue,priority,time_limit,procs,nodes
           (a header row naming the columns given; `submit` and `duration` are required)
    JSONL  {"submit": 0.0, "duration": 30, "cpus": 1, "mem": 512, "count": 4, "user": "ann"}

Times are seconds. A run longer than its time limit is cut to it, as the agent would stop it
there. Nothing is dropped silently: jobs a reader skips are counted by reason.
"""

from __future__ import annotations

import csv
import gzip
import json
import random
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

NO_RUN_TIME = "unknown run time"
NO_PROCS = "no processors"
NO_SUBMIT = "unknown submit time"


class WorkloadError(ValueError):
    """A workload that cannot be simulated as given; the message names the job or record."""


@dataclass(frozen=True, slots=True)
class Arrival:
    id: int
    submit: float
    duration: float  # seconds each task runs
    cpus: float = 1.0
    mem: int = 256
    count: int = 1
    user: str = "sim"
    queue: str = "default"
    priority: int = 0
    time_limit: float | None = None
    procs: int | None = None  # a rigid job of this many processors, instead of cpus x count
    nodes: int | None = None  # a rigid job of this many whole nodes

    def __post_init__(self) -> None:
        if self.procs is not None and self.nodes is not None:
            raise ValueError("procs and nodes exclude each other")
        for name in ("procs", "nodes", "count"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.duration < 0:
            raise ValueError("duration must not be negative")
        if self.time_limit is not None and self.time_limit <= 0:
            raise ValueError("time_limit must be positive")

    @property
    def rigid(self) -> bool:
        return self.procs is not None or self.nodes is not None


@dataclass
class Workload:
    arrivals: list[Arrival]
    skipped: Counter[str] = field(default_factory=Counter)  # reason -> jobs left out
    cut: int = 0  # runs cut to their time limit


def read(path: Path, jobs: int | None = None) -> Workload:
    """A trace, its format told by its name (`.swf`, `.jsonl`, otherwise CSV; `.gz` too);
    with `jobs`, only as far as its first `jobs` jobs that can run."""
    name = path.name.removesuffix(".gz")
    with _open(path) as lines:
        if name.endswith(".swf"):
            return read_swf(lines, str(path), jobs)
        if name.endswith(".jsonl"):
            return _records(_jsonl(lines, str(path)), str(path), jobs)
        return _records(csv.DictReader(lines), str(path), jobs)


def _open(path: Path) -> Iterator[str]:
    if path.name.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")  # type: ignore[return-value]
    return path.open(encoding="utf-8")  # type: ignore[return-value]


# --- SWF ----------------------------------------------------------------------------------

_SWF_FIELDS = 18
# 0-based positions of the SWF fields read here
_ID, _SUBMIT, _RUN, _ALLOCATED, _REQUESTED, _LIMIT, _USER, _QUEUE = 0, 1, 3, 4, 7, 8, 11, 14


def read_swf(lines: Iterable[str], source: str = "trace", jobs: int | None = None) -> Workload:
    """Rigid jobs from SWF lines: processors allocated (else requested), the requested
    time as time limit; submit times from the first job's. Jobs with no run time or no
    processors are skipped, and counted."""
    arrivals: list[Arrival] = []
    skipped: Counter[str] = Counter()
    seen: set[int] = set()
    cut = 0
    for number, line in enumerate(lines, start=1):
        if len(arrivals) == jobs:
            break
        if not line.strip() or line.lstrip().startswith(";"):
            continue
        try:
            parsed = _swf_job(line)
            if not isinstance(parsed, str) and parsed[0].id in seen:
                raise ValueError(f"job {parsed[0].id} is given twice")
        except ValueError as e:
            raise WorkloadError(f"{source}: line {number}: {e}") from None
        if isinstance(parsed, str):
            skipped[parsed] += 1
            continue
        arrival, was_cut = parsed
        seen.add(arrival.id)
        cut += was_cut
        arrivals.append(arrival)
    return Workload(_from_first(arrivals), skipped, cut)


def _swf_job(line: str) -> tuple[Arrival, bool] | str:
    """One SWF line as an arrival (and whether its run was cut), or why it is skipped."""
    fields = line.split()
    if len(fields) != _SWF_FIELDS:
        raise ValueError(f"{len(fields)} fields, SWF has {_SWF_FIELDS}")
    values = [float(f) for f in fields]
    submit, run = values[_SUBMIT], values[_RUN]
    procs = int(values[_ALLOCATED]) if values[_ALLOCATED] > 0 else int(values[_REQUESTED])
    if submit < 0:
        return NO_SUBMIT
    if run < 0:
        return NO_RUN_TIME
    if procs <= 0:
        return NO_PROCS
    limit = values[_LIMIT] if values[_LIMIT] > 0 else None
    arrival = Arrival(
        id=int(values[_ID]),
        submit=submit,
        duration=_cut(run, limit),
        user=_named("u", values[_USER]),
        queue=_named("q", values[_QUEUE]),
        time_limit=limit,
        procs=procs,
    )
    return arrival, arrival.duration < run


def _named(prefix: str, number: float) -> str:
    return f"{prefix}{int(number)}" if number >= 0 else "unknown"


def _cut(run: float, limit: float | None) -> float:
    return min(run, limit) if limit is not None else run


def _from_first(arrivals: list[Arrival]) -> list[Arrival]:
    """In submission order (ties as read), times from the first submission."""
    ordered = sorted(arrivals, key=lambda a: a.submit)
    origin = ordered[0].submit if ordered else 0.0
    return [replace(a, submit=a.submit - origin) for a in ordered]


# --- CSV and JSONL ------------------------------------------------------------------------


def _whole(value: object) -> int:
    """An integer field: a JSON 512.5 is refused, not cut to 512."""
    number = float(value)  # type: ignore[arg-type]
    if not number.is_integer():
        raise ValueError(f"{value!r} is not a whole number")
    return int(number)


_TYPES: dict[str, Callable[[str], object]] = {
    "id": _whole,
    "submit": float,
    "duration": float,
    "cpus": float,
    "mem": _whole,
    "count": _whole,
    "user": str,
    "queue": str,
    "priority": _whole,
    "time_limit": float,
    "procs": _whole,
    "nodes": _whole,
}
_REQUIRED = ("submit", "duration")
_PER_TASK = {"cpus", "mem", "count"}


def _jsonl(lines: Iterable[str], source: str) -> Iterator[Mapping[str | None, object]]:
    for number, line in enumerate((line for line in lines if line.strip()), start=1):
        try:
            record = json.loads(line)
        except ValueError as e:
            raise WorkloadError(f"{source}: record {number}: {e}") from None
        if not isinstance(record, dict):
            raise WorkloadError(f"{source}: record {number}: not a JSON object")
        yield record


def _records(rows: Iterable[Mapping[str | None, object]], source: str, jobs: int | None) -> Workload:
    """Arrivals from records of named fields; the record number is the default id."""
    arrivals: list[Arrival] = []
    seen: set[int] = set()
    cut = 0
    for number, row in enumerate(rows, start=1):
        if len(arrivals) == jobs:
            break
        try:
            arrival, was_cut = _record(row, number)
            if arrival.id in seen:
                raise ValueError(f"id {arrival.id} is given twice")
        except (TypeError, ValueError) as e:
            raise WorkloadError(f"{source}: record {number}: {e}") from None
        seen.add(arrival.id)
        cut += was_cut
        arrivals.append(arrival)
    return Workload(sorted(arrivals, key=lambda a: a.submit), cut=cut)


def _record(row: Mapping[str | None, object], number: int) -> tuple[Arrival, bool]:
    if None in row:  # csv puts values past the header's columns there
        raise ValueError("more values than the header has columns")
    unknown = set(row) - set(_TYPES)
    if unknown:
        raise ValueError(f"unknown columns {sorted(map(str, unknown))}")
    values = {k: _TYPES[k](v) for k, v in row.items() if v not in (None, "")}  # type: ignore[arg-type]
    if missing := [name for name in _REQUIRED if name not in values]:
        raise ValueError(f"no {' and no '.join(missing)}")
    if ("procs" in values or "nodes" in values) and _PER_TASK & set(values):
        raise ValueError("procs and nodes take the place of cpus, mem and count")
    values.setdefault("id", number)
    run, limit = values.get("duration"), values.get("time_limit")
    if isinstance(run, float) and isinstance(limit, float) and run > limit:
        values["duration"] = limit
        return Arrival(**values), True  # type: ignore[arg-type]
    return Arrival(**values), False  # type: ignore[arg-type]


# --- generated ----------------------------------------------------------------------------


def generate(
    jobs: int,
    seed: int = 0,
    rate: float = 1.0,
    mean_duration: float = 60.0,
    users: Iterable[str] = ("ann", "bob", "cy"),
    queues: Iterable[str] = ("default",),
) -> Workload:
    """A seeded synthetic workload: Poisson arrivals at `rate` jobs/s, exponential durations."""
    rng = random.Random(seed)
    users, queues = list(users), list(queues)
    now = 0.0
    arrivals = []
    for number in range(1, jobs + 1):
        now += rng.expovariate(rate)
        arrivals.append(
            Arrival(
                id=number,
                submit=round(now, 3),
                duration=round(max(1.0, rng.expovariate(1 / mean_duration)), 1),
                cpus=rng.choice([0.5, 1, 1, 2, 4]),
                mem=rng.choice([256, 512, 1024, 4096]),
                count=rng.choice([1, 1, 1, 2, 4, 8]),
                user=rng.choice(users),
                queue=rng.choice(queues),
                priority=rng.choice([0, 0, 0, 5]),
            )
        )
    return Workload(arrivals)
