"""Start-up: how long the `shoal` command and an agent take to start, as whole processes.

    python bench/startup.py --runs 11

- cli_help_ms: `shoal --help` (target <= 150);
- cli_jobs_ms: `shoal jobs` against a live master with one agent and a few jobs, pointed at
  it by SHOAL_URL and SHOAL_TOKEN as the tests do (target <= 200);
- agent_start_ms: `shoal agent` from its spawn until the master lists its node up and
  connected (the master is polled every few milliseconds); agent_start_cpu_ms: the CPU the
  agent process had used at that moment (target <= 300);
- clush_version_ms: `clush --version`, for reference: a Python command that does little
  (left out when clush is not installed).

Each is the median wall time of `--runs` runs after one that warms the page cache, with
beside it (`..._cpu_ms`) the median CPU, user and system, of the process: on a machine
other work shares, the CPU figures move far less than the wall times. The timed processes
run with bytecode caching on, in a cache of this run's own: an installed shoal has its
`.pyc` files, and PYTHONDONTWRITEBYTECODE in the environment would otherwise time the
compiling of shoal's sources on every start. Prints one JSON line last, with the targets
met or not (`targets_met`). Exits 1 when the timed work failed: a command exiting non-zero,
an agent not registering.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psutil
from rich.progress import Progress, TaskID

from shoal.client import Client
from shoal.config import data_home
from shoal.model import JobSpec, NodeStatus, Resources
from shoal.testing.live import LiveCluster, live_cluster

TARGETS = {"cli_help_ms": 150, "cli_jobs_ms": 200, "agent_start_cpu_ms": 300}
REGISTERED_WITHIN = 30.0  # seconds an agent may take to register before the run fails
POLL = 0.005  # seconds between looks at the master's node list while an agent starts


class Failed(Exception):
    """The work a benchmark times did not succeed."""


def shoal_command() -> list[str]:
    """The `shoal` script beside this interpreter, as users run it; else `python -m shoal`."""
    script = Path(sys.executable).with_name("shoal")
    return [str(script)] if script.exists() else [sys.executable, "-m", "shoal"]


def cached_bytecode(env: Mapping[str, str], cache: Path) -> dict[str, str]:
    """`env` with bytecode written to and read from `cache`."""
    child = {k: v for k, v in env.items() if k != "PYTHONDONTWRITEBYTECODE"}
    return {**child, "PYTHONPYCACHEPREFIX": str(cache)}


@dataclass(frozen=True, slots=True)
class Timing:
    wall_ms: float
    cpu_ms: float  # user and system, of the process and any it waited for


def timed_run(args: list[str], env: Mapping[str, str]) -> Timing:
    """The wall and CPU time of one whole process; Failed unless it exits 0."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    began = time.perf_counter()
    result = subprocess.run(args, env=env, capture_output=True)
    wall = (time.perf_counter() - began) * 1000
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if result.returncode != 0:
        raise Failed(f"`{' '.join(args[-2:])}` exited {result.returncode}: {result.stderr.decode()[-500:]}")
    cpu = (after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime) * 1000
    return Timing(wall, cpu)


def timed(
    key: str, runs: int, measure: Callable[[], Timing], advance: Callable[[], None]
) -> dict[str, float]:
    """`key_ms` and `key_cpu_ms`: the medians of `runs` runs after one that warms the page
    cache and the bytecode cache."""
    timings = []
    for run in range(runs + 1):
        timing = measure()
        advance()
        if run:
            timings.append(timing)
    return {
        f"{key}_ms": round(statistics.median(t.wall_ms for t in timings), 1),
        f"{key}_cpu_ms": round(statistics.median(t.cpu_ms for t in timings), 1),
    }


def _registered(client: Client, name: str) -> bool:
    return any(n.name == name and n.status is NodeStatus.UP and n.connected for n in client.nodes())


@contextmanager
def agent_process(cluster: LiveCluster, name: str, env: Mapping[str, str]) -> Iterator[psutil.Popen]:
    """`shoal agent` as a node of its own; killed, and its node's runs stopped, on leaving."""
    args = [
        *shoal_command(),
        "agent",
        "--master",
        cluster.url,
        "--name",
        name,
        "--state-dir",
        str(cluster.root / name),
        "--cpus",
        "1",
        "--mem",
        "512",
        "--utilization",
        "tasks",
    ]
    with open(cluster.root / f"{name}.log", "wb") as log:
        proc = psutil.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait(10)


def agent_start(cluster: LiveCluster, client: Client, name: str, env: Mapping[str, str]) -> Timing:
    """An agent from its spawn to its node being up; its CPU then."""
    began = time.perf_counter()
    with agent_process(cluster, name, env) as proc:
        deadline = time.monotonic() + REGISTERED_WITHIN
        while not _registered(client, name):
            if proc.poll() is not None:
                raise Failed(f"agent {name} exited {proc.returncode}; see {cluster.root / name}.log")
            if time.monotonic() > deadline:
                raise Failed(f"agent {name} did not register within {REGISTERED_WITHIN:g}s")
            time.sleep(POLL)
        wall = (time.perf_counter() - began) * 1000
        cpu = proc.cpu_times()
        return Timing(wall, (cpu.user + cpu.system + cpu.children_user + cpu.children_system) * 1000)


def some_jobs(cluster: LiveCluster, count: int = 3) -> None:
    """A few ended jobs, so that `shoal jobs` has a table to show."""
    with cluster.client() as client:
        for index in range(count):
            job = client.submit(JobSpec(name=f"job{index}", command=["true"], resources=Resources(cpus=0.1)))
            if client.wait(job, poll=0.05, timeout=30).state.value != "complete":
                raise Failed(f"job {job} did not complete")


def measure(runs: int, progress: Progress, step: TaskID, root: Path) -> dict[str, float]:
    env = cached_bytecode(os.environ, root / "pycache")
    shoal = shoal_command()
    tick = functools.partial(progress.advance, step)
    figures: dict[str, float] = {}
    progress.update(step, description="shoal --help")
    figures.update(timed("cli_help", runs, lambda: timed_run([*shoal, "--help"], env), tick))
    if clush := shutil.which("clush", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"):
        progress.update(step, description="clush --version")
        figures.update(timed("clush_version", runs, lambda: timed_run([clush, "--version"], env), tick))
    progress.update(step, description="starting a master and an agent")
    with live_cluster(root / "cluster", agents=1, heartbeat_timeout=30) as cluster:
        some_jobs(cluster)
        cli_env = cached_bytecode(cluster.cli_env(), root / "pycache")
        progress.update(step, description="shoal jobs")
        figures.update(timed("cli_jobs", runs, lambda: timed_run([*shoal, "jobs"], cli_env), tick))
        progress.update(step, description="agent start to registration")
        agent_env = cached_bytecode(cluster.env, root / "pycache")
        with cluster.client() as client:
            names = iter(f"starter{n}" for n in range(runs + 1))

            def start() -> Timing:
                return agent_start(cluster, client, next(names), agent_env)

            figures.update(timed("agent_start", runs, start, tick))
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=11, help="timed runs of each (medians)")
    args = parser.parse_args()
    runs = max(3, args.runs)
    # The cluster's files go where an agent keeps its own by default (see bench/e2e.py).
    data_home().mkdir(parents=True, exist_ok=True)
    with (
        tempfile.TemporaryDirectory(dir=data_home(), prefix="bench-") as root,
        Progress(transient=True) as progress,
    ):
        step = progress.add_task("start-up", total=4 * (runs + 1))
        try:
            figures = measure(runs, progress, step, Path(root))
        except Failed as e:
            progress.stop()
            print(f"startup: {e}", file=sys.stderr)
            return 1
    met = all(figures[key] <= target for key, target in TARGETS.items())
    print(json.dumps({"runs": runs, **figures, "targets": TARGETS, "targets_met": met}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
