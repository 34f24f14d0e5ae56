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

Prints one JSON line last with those keys, `nodes`, and clush_over_agent (the speed-up).
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
    with tempfile.TemporaryDirectory() as root, Progress(transient=True) as progress:
        step = progress.add_task(f"starting {n} agents and {n} sshd", total=None)
        (Path(root) / "cluster").mkdir()
        with (
            live_cluster(
                Path(root) / "cluster", agents=n, heartbeat_timeout=60, heartbeat_interval=2
            ) as cluster,
            ssh_hosts(Path(root) / "ssh", count=n) as hosts,
            cluster.client() as client,
        ):
            figures: dict[str, float] = {}

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

            env = cluster.cli_env()
            shoal = [sys.executable, "-m", "shoal", "exec"]
            clush = [str(Path(sys.executable).with_name("clush")), "-o", hosts.options, "-w", nodeset, "true"]
            cases: list[tuple[str, Callable[[], object]]] = [
                ("agent_true_ms", lambda: through_agents("true")),
                ("agent_hostname_b_ms", lambda: through_agents("hostname", Style(gather=True))),
                ("agent_cli_true_ms", lambda: checked([*shoal, "-S", "-a", "--", "true"], env)),
                (
                    "ssh_true_ms",
                    lambda: checked([*shoal, "--ssh", "-S", "-o", hosts.options, "-w", nodeset, "true"], env),
                ),
                ("clush_true_ms", lambda: checked([*clush[:1], "-S", *clush[1:]], env)),
                ("spawn_floor_ms", lambda: spawn_floor(n)),
            ]
            progress.update(step, description="timing", total=len(cases), completed=0)
            for key, fn in cases:
                progress.update(step, description=f"timing {key}")
                figures[key] = median_ms(fn, runs)
                progress.advance(step)
    figures["clush_over_agent"] = round(figures["clush_true_ms"] / figures["agent_true_ms"], 1)
    print(json.dumps({"nodes": n, "runs": runs, **figures}))


if __name__ == "__main__":
    main()
