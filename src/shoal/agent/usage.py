"""What the node and each of its runs use now: psutil, and the runs' cgroups where there are.

A run's CPU time and memory come from its own cgroup when the agent has cgroup v2 (every
process the command forked is in it), otherwise from the run's process tree (psutil): what
a child that left the tree used is then missed.

When a run ends, `spent` says what it used in all, for its report and the job history: its
cgroup's CPU time and memory high-water mark where the groups keep them, else what the
kernel told of the run's process when it was reaped (wait4: the CPU time of it and of every
process it waited for, and the largest resident set among them).
"""

from __future__ import annotations

import contextlib
import math
import os
import resource
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import psutil

from shoal.agent.cgroups import Cgroups
from shoal.model import RunUsage, Usage

_MIB = 1024 * 1024


class Meter:
    """Measures the node and its runs, heartbeat after heartbeat.

    `host` utilization is the machine's (psutil). `tasks` is what this agent's runs use over
    the cpus it offers: the figure to use when several agents share one machine (`shoal
    dev`, tests), where the machine's would be every agent's at once."""

    def __init__(self, cgroups: Cgroups | None, utilization: Literal["host", "tasks"], cpus: float) -> None:
        self.cgroups = cgroups
        self.utilization = utilization
        self.cpus = cpus
        self._before: tuple[float, dict[str, float]] | None = None  # when, cpu seconds by run
        psutil.cpu_percent(interval=None)  # the first reading only starts the measurement

    def measure(self, runs: Mapping[str, int]) -> Usage:
        """The node's CPU % since the last call, memory in use, 1-minute load, and each run's
        use (`runs`: run id -> pid)."""
        used = {run: u for run, pid in runs.items() if (u := _run(run, pid, self.cgroups)) is not None}
        host = psutil.cpu_percent(interval=None)
        now = time.monotonic()
        cpu = host if self.utilization == "host" else self._tasks_percent(used, now)
        self._before = (now, {run: u.cpu_seconds for run, u in used.items()})
        return Usage(
            cpu_percent=round(cpu, 2),
            mem_used=psutil.virtual_memory().used // _MIB,
            load1=os.getloadavg()[0],
            runs=used,
        )

    def _tasks_percent(self, used: Mapping[str, RunUsage], now: float) -> float:
        if self._before is None or now <= self._before[0] or self.cpus <= 0:
            return 0.0
        then, seconds = self._before
        busy = sum(max(0.0, u.cpu_seconds - seconds.get(run, 0.0)) for run, u in used.items())
        return min(100.0, 100 * busy / (now - then) / self.cpus)


def _run(run: str, pid: int, cgroups: Cgroups | None) -> RunUsage | None:
    if cgroups is not None and cgroups.version == 2:
        with contextlib.suppress(OSError, ValueError):
            return _from_cgroup(cgroups.bases[0] / run)
    return _from_processes(pid)


def _from_cgroup(group: os.PathLike[str]) -> RunUsage:
    stat = dict(line.split() for line in open(os.path.join(group, "cpu.stat")).read().splitlines())
    memory = int(open(os.path.join(group, "memory.current")).read())
    return RunUsage(cpu_seconds=int(stat["usage_usec"]) / 1e6, rss=memory // _MIB)


def _from_processes(pid: int) -> RunUsage | None:
    try:
        top = psutil.Process(pid)
        tree = [top, *top.children(recursive=True)]
    except psutil.Error:
        return None
    cpu = rss = 0.0
    for proc in tree:
        with contextlib.suppress(psutil.Error):
            times = proc.cpu_times()
            cpu += times.user + times.system + times.children_user + times.children_system
            rss += proc.memory_info().rss
    return RunUsage(cpu_seconds=round(cpu, 3), rss=int(rss // _MIB))


@dataclass(frozen=True, slots=True)
class Spent:
    """What a run used in all, measured when it ended (None: could not be)."""

    cpu_seconds: float | None = None
    peak_mem: int | None = None  # MiB, rounded up: the most memory it held at once


def spent(cgroups: Cgroups | None, run: str, rusage: resource.struct_rusage | None) -> Spent:
    """What `run`, just ended, used: read from its groups before they are removed, each figure
    they lack taken from `rusage` (its process's, when the agent reaped it; None if adopted)."""
    cpu = peak = None
    if cgroups is not None:
        with contextlib.suppress(ValueError):  # a file not as the kernel writes it
            cpu, peak = _group_totals(cgroups, run)
    if rusage is not None:
        cpu = cpu if cpu is not None else round(rusage.ru_utime + rusage.ru_stime, 6)
        peak = peak if peak is not None else math.ceil(rusage.ru_maxrss / 1024)  # KiB on Linux
    return Spent(cpu, peak)


def _group_totals(cgroups: Cgroups, run: str) -> tuple[float | None, int | None]:
    """cgroup v2: cpu.stat's usage_usec and memory.peak (Linux 5.19); v1: cpuacct.usage where
    the cpu hierarchy has the cpuacct controller too, and memory.max_usage_in_bytes."""
    if cgroups.version == 2:
        group = cgroups.bases[0] / run
        stat = _read(group / "cpu.stat")
        usage = dict(line.split() for line in stat.splitlines()).get("usage_usec") if stat else None
        cpu = int(usage) / 1e6 if usage is not None else None
        peak = _read(group / "memory.peak")
    else:
        cpu_group, memory_group = (base / run for base in cgroups.bases)
        nanoseconds = _read(cpu_group / "cpuacct.usage")
        cpu = int(nanoseconds) / 1e9 if nanoseconds else None
        peak = _read(memory_group / "memory.max_usage_in_bytes")
    return cpu, (math.ceil(int(peak) / _MIB) if peak else None)


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip() or None
    except (OSError, ValueError):
        return None
