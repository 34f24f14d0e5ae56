"""The parallel shell's latency: through the agents, over SSH, and ClusterShell's clush.

    python bench/exec.py --nodes 128

Starts N agents as local processes (a master on loopback) and N sshd instances on loopback
addresses 127.0.0.2... , then times, over at least 5 runs each (medians):

- agent_true_ms: `true` on every node through the agents, from the request to the last
  node's end, with the Python SDK (the command itself, no interpreter start-up);
- agent_hostname_b_ms: `hostname`, gathered and folded as `-b` shows it;
- agent_cli_true_ms: the whole `shoal exec -a -- true` process, Python start-up included;
- ssh_true_ms: `shoal exec --ssh -w node[1-N] -- true`, the whole process;
- clush_true_ms: `clush -w node[1-N] true` on the same hosts, the whole process;
- spawn_floor_ms: spawning and reaping N `true` processes here, no shoal at all.

The agents are stopped before the SSH runs, and each shoal run alternates with a clush run,
so both see the same machine. Prints one JSON line last with those keys, `nodes`,
clush_over_agent (the speed-up) and ssh_over_clush (below 1: shoal's SSH path is faster).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from rich.progress import Progress

from shoal.cli.display import Display, Style
from shoal.shell.protocol import ExecRequest, Selection
from shoal.testing.live import live_cluster
from shoal.testing.sshd import ssh_hosts


def median_ms(fn: Callable[[], object], runs: int) -> float:
    fn()  # warm: first connections, page cache
    times = []
    for _ in range(runs):
        began = time.perf_counter()
        fn()
        times.append((time.perf_counter() - began) * 1000)
    return round(statistics.median(times), 1)


def spawn_floor(count: int) -> None:
    null = [(os.POSIX_SPAWN_OPEN, fd, os.devnull, os.O_RDWR, 0) for fd in (0, 1, 2)]
    pids = [os.posix_spawn("/bin/true", ["true"], {}, file_actions=null) for _ in range(count)]
    for pid in pids:
        os.waitpid(pid, 0)


def checked(args: list[str], env: dict[str, str]) -> None:
    result = subprocess.run(args, env=env, capture_output=True)
    if result.returncode != 0:
        raise SystemExit(f"{args[:4]} failed: {result.stderr.decode()[-500:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=128)
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    n, runs = args.nodes, max(5, args.runs)
    nodeset = f"node[1-{n}]"
    figures: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as root, Progress(transient=True) as progress:
        step = progress.add_task(f"starting {n} agents", total=None)
        with (
            live_cluster(
                Path(root) / "cluster", agents=n, heartbeat_timeout=60, heartbeat_interval=2
            ) as cluster,
            cluster.client() as client,
        ):

            def through_agents(command: str, style: Style | None = None) -> None:
                request = ExecRequest(select=Selection(all=True), command=command)
                events = client.exec(request)
                if style is None:
                    ended = sum(1 for e in events if e.kind == "ended")
                else:
                    display = Display(style, out=io.BytesIO(), err=io.BytesIO())
                    display.show(events)
                    ended = len(display.gather.ended)
                assert ended == n, f"{ended} of {n} nodes answered"

            shoal_cli = [sys.executable, "-m", "shoal", "exec", "-S", "-a", "--", "true"]
            for key, fn in (
                ("agent_true_ms", lambda: through_agents("true")),
                ("agent_hostname_b_ms", lambda: through_agents("hostname", Style(gather=True))),
                ("agent_cli_true_ms", lambda: checked(shoal_cli, cluster.cli_env())),
            ):
                progress.update(step, description=f"timing {key}")
                figures[key] = median_ms(fn, runs)
        # SSH with the agents gone, each shoal run next to a clush run: both see the same machine.
        progress.update(step, description=f"starting {n} sshd")
        with ssh_hosts(Path(root) / "ssh", count=n) as hosts:
            env = {**os.environ, "SHOAL_URL": "http://127.0.0.1:9", "SHOAL_CONFIG": "/nonexistent"}
            shoal_ssh = [
                sys.executable,
                "-m",
                "shoal",
                "exec",
                "--ssh",
                "-S",
                "-o",
                hosts.options,
                "-w",
                nodeset,
                "true",
            ]
            clush = [
                str(Path(sys.executable).with_name("clush")),
                "-S",
                "-o",
                hosts.options,
                "-w",
                nodeset,
                "true",
            ]
            times: dict[str, list[float]] = {"ssh_true_ms": [], "clush_true_ms": []}
            for run in range(runs + 1):
                progress.update(step, description=f"timing ssh and clush, run {run + 1} of {runs + 1}")
                for key, args in (("ssh_true_ms", shoal_ssh), ("clush_true_ms", clush)):
                    began = time.perf_counter()
                    checked(args, env)
                    if run:  # the first run of each warms up
                        times[key].append((time.perf_counter() - began) * 1000)
            figures.update({key: round(statistics.median(t), 1) for key, t in times.items()})
    figures["spawn_floor_ms"] = median_ms(lambda: spawn_floor(n), runs)
    figures["clush_over_agent"] = round(figures["clush_true_ms"] / figures["agent_true_ms"], 1)
    figures["ssh_over_clush"] = round(figures["ssh_true_ms"] / figures["clush_true_ms"], 3)
    print(json.dumps({"nodes": n, "runs": runs, **figures}))


if __name__ == "__main__":
    main()
