"""The parallel shell's latency: through the agents, over SSH, and ClusterShell's clush.

    python bench/exec.py --nodes 128

Starts N agents as local processes (a master on loopback) and N sshd instances on loopback
addresses 127.0.0.2... , then times, over at least 5 runs each (medians):

- agent_true_ms: `true` on every node through the agents, from the request to the last
  node's end, with the Python SDK (the command itself, no interpreter start-up);
- agent_hostname_b_ms: `hostname`, gathered and folded as `-b` shows it, with the SDK;
- agent_cli_true_ms: the whole `shoal exec -a -- true` process, Python start-up included:
  what a user at a shell meets;
- clush_true_ms: the whole `clush -w node[1-N] true` process on the sshd hosts;
- ssh_true_ms: the whole `shoal exec --ssh -w node[1-N] -- true` process on the same hosts;
- spawn_floor_ms: spawning and reaping N `true` processes here, no shoal at all.

The three whole-process commands run in turn, run after run (cli, clush, ssh, cli, ...),
so all three see the same machine (the agents are up, idle, throughout). The ratios, each
defined so that ABOVE 1 MEANS SHOAL IS FASTER than clush:

- clush_over_cli = clush_true_ms / agent_cli_true_ms: the whole `clush` process over the
  whole `shoal exec -a` process, the figure a user meets;
- clush_over_agent = clush_true_ms / agent_true_ms: over the SDK call alone (no Python
  start-up), what a program using `shoal.client` meets;
- clush_over_ssh = clush_true_ms / ssh_true_ms: shoal's own SSH path against clush's.

Agents share this machine's cores, so they start in batches (`--batch`, default four per
core), each registered before the next starts, with `--utilization tasks` and a heartbeat
every `--heartbeat` seconds; the run stops with an error naming how many registered if they
are not all up within `--start-timeout` seconds. Prints one JSON line last with the keys
above, `nodes` and `runs`.
"""

from __future__ import annotations

import argparse
import contextlib
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
    cores = os.cpu_count() or 1
    parser.add_argument("--batch", type=int, default=4 * cores, help="agents started at a time")
    parser.add_argument("--heartbeat", type=float, default=5.0, help="seconds between an agent's heartbeats")
    parser.add_argument(
        "--start-timeout",
        type=float,
        default=None,
        help="seconds for all agents to register (default: 60 + 6 per agent per core)",
    )
    args = parser.parse_args()
    n, runs = args.nodes, max(5, args.runs)
    start_timeout = args.start_timeout or 60 + 6.0 * n / cores
    nodeset = f"node[1-{n}]"
    figures: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as root, Progress(transient=True) as progress:
        started = time.perf_counter()
        bar = progress.add_task(f"agents registered (batches of {args.batch})", total=n)

        def registered(up: int, total: int) -> None:
            progress.update(bar, completed=up)

        stack = contextlib.ExitStack()
        try:
            cluster = stack.enter_context(
                live_cluster(
                    Path(root) / "cluster",
                    agents=n,
                    heartbeat_timeout=max(60.0, 12 * args.heartbeat),
                    heartbeat_interval=args.heartbeat,
                    agent_batch=args.batch,
                    start_timeout=start_timeout,
                    registered=registered,
                )
            )
        except (TimeoutError, RuntimeError) as e:
            stack.close()
            raise SystemExit(f"the agents did not all start: {e}") from None
        progress.remove_task(bar)
        progress.console.print(f"{n} agents registered in {time.perf_counter() - started:.0f}s")
        step = progress.add_task(f"starting {n} sshd", total=None)
        with stack, cluster.client() as client, ssh_hosts(Path(root) / "ssh", count=n) as hosts:

            def through_agents(command: str, style: Style | None = None) -> None:
                request = ExecRequest(select=Selection(all=True), command=command)
                events = client.exec(request)
                if style is None:
                    ended = sum(1 for e in events if e.kind == "ended")
                else:
                    display = Display(style, out=io.BytesIO(), err=io.BytesIO())
                    display.show(events)
                    ended = len(display.gather.ended)
                if ended != n:
                    raise SystemExit(f"`{command}` through the agents: {ended} of {n} nodes answered")

            for key, fn in (
                ("agent_true_ms", lambda: through_agents("true")),
                ("agent_hostname_b_ms", lambda: through_agents("hostname", Style(gather=True))),
            ):
                progress.update(step, description=f"timing {key}")
                figures[key] = median_ms(fn, runs)
            # The whole processes, one after another, run after run: all see the same machine.
            no_master = {**os.environ, "SHOAL_URL": "http://127.0.0.1:9", "SHOAL_CONFIG": "/nonexistent"}
            shoal = [sys.executable, "-m", "shoal", "exec", "-S"]
            commands = {
                "agent_cli_true_ms": ([*shoal, "-a", "--", "true"], cluster.cli_env()),
                "clush_true_ms": (
                    [str(Path(sys.executable).with_name("clush")), "-S", "-o", hosts.options]
                    + ["-w", nodeset, "true"],
                    no_master,
                ),
                "ssh_true_ms": ([*shoal, "--ssh", "-o", hosts.options, "-w", nodeset, "true"], no_master),
            }
            times: dict[str, list[float]] = {key: [] for key in commands}
            for run in range(runs + 1):
                progress.update(step, description=f"timing cli, clush and ssh, run {run + 1} of {runs + 1}")
                for key, (argv, env) in commands.items():
                    began = time.perf_counter()
                    checked(argv, env)
                    if run:  # the first run of each warms up
                        times[key].append((time.perf_counter() - began) * 1000)
            figures.update({key: round(statistics.median(t), 1) for key, t in times.items()})
    figures["spawn_floor_ms"] = median_ms(lambda: spawn_floor(n), runs)
    clush = figures["clush_true_ms"]
    figures["clush_over_cli"] = round(clush / figures["agent_cli_true_ms"], 2)
    figures["clush_over_agent"] = round(clush / figures["agent_true_ms"], 2)
    figures["clush_over_ssh"] = round(clush / figures["ssh_true_ms"], 3)
    print(json.dumps({"nodes": n, "runs": runs, **figures}))


if __name__ == "__main__":
    main()
