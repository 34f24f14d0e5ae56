"""What the node and each of its runs use now: psutil, and the runs' cgroups where there are.

A run's CPU time and memory come from its own cgroup when the agent has cgroup v2 (every
process the command forked is in it), otherwise from the run's process tree (psutil): what
a child that left the tree used is then missed.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Mapping
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
