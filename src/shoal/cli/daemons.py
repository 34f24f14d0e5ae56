"""Long-running commands: `shoal master`, `shoal agent`, and `shoal dev` (both at once).

What only one command uses is imported inside it: the server stacks (uvicorn, FastAPI,
websockets) by the daemon that runs them, httpx and the tables by `shoal dev`, so that an
agent starts on what it needs and nothing more.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated

import typer

from shoal.cli.errors import fail, friendly
from shoal.clientfile import DEFAULT_PORT, ClientConfig, save_client_config
from shoal.config import AgentSettings, MasterSettings, load_settings, shared_host_ports

ConfigOpt = Annotated[Path | None, typer.Option("--config", help="a TOML file of settings", dir_okay=False)]


def _logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # At DEBUG, websockets logs every header of a handshake: the cluster token among them.
    logging.getLogger("websockets").setLevel(logging.INFO)


@friendly
def master(
    host: Annotated[str | None, typer.Option(help="address to listen on [127.0.0.1]")] = None,
    port: Annotated[int | None, typer.Option(help=f"port to listen on [{DEFAULT_PORT}]")] = None,
    state_dir: Annotated[Path | None, typer.Option(help="where the store and tokens live")] = None,
    heartbeat_timeout: Annotated[
        float | None, typer.Option(help="seconds of silence before a node is down [10]")
    ] = None,
    config: ConfigOpt = None,
    verbose: Annotated[bool, typer.Option("-v", "--verbose")] = False,
) -> None:
    """Run the master: the API, the ledger and the scheduler."""
    import uvicorn

    from shoal.master.api import create_app

    _logging(verbose)
    settings = load_settings(
        MasterSettings, config, host=host, port=port, state_dir=state_dir, heartbeat_timeout=heartbeat_timeout
    )
    logging.getLogger("shoal.master").info(
        "state in %s; the admin and cluster tokens are in admin.token and cluster.token there",
        settings.state_dir,
    )
    uvicorn.run(
        create_app(settings), host=settings.host, port=settings.port, log_level="warning", access_log=False
    )


def _pairs(what: str, pairs: list[str]) -> dict[str, str]:
    found = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise fail(f"{what} {pair!r} is not KEY=VALUE", code=2)
        found[key] = value
    return found


def _resources(pairs: list[str]) -> dict[str, float]:
    amounts = {}
    for key, value in _pairs("resource", pairs).items():
        try:
            amounts[key] = float(value)
        except ValueError:
            raise fail(f"resource {key}: {value!r} is not a number", code=2) from None
    return amounts


@friendly
def agent(
    master: Annotated[str | None, typer.Option(help="the master's URL")] = None,
    token: Annotated[str | None, typer.Option(help="the cluster token (better: SHOAL_CLUSTER_TOKEN)")] = None,
    name: Annotated[str | None, typer.Option(help="this node's name [hostname]")] = None,
    state_dir: Annotated[Path | None, typer.Option(help="where the task table and sandboxes live")] = None,
    label: Annotated[list[str], typer.Option(help="KEY=VALUE, repeatable")] = [],  # noqa: B006
    resource: Annotated[
        list[str], typer.Option(help="a custom resource to offer, NAME=AMOUNT (licenses=4); repeatable")
    ] = [],  # noqa: B006
    cpus: Annotated[float | None, typer.Option(help="cpus to offer [all]")] = None,
    mem: Annotated[int | None, typer.Option(help="MiB of memory to offer [all]")] = None,
    heartbeat_interval: Annotated[float | None, typer.Option(help="seconds between heartbeats [1]")] = None,
    utilization: Annotated[
        str | None,
        typer.Option(help="host: the machine's CPU use; tasks: its tasks' (agents sharing a host)"),
    ] = None,
    config: ConfigOpt = None,
    verbose: Annotated[bool, typer.Option("-v", "--verbose")] = False,
) -> None:
    """Run an agent: register this node with the master and run the tasks it is given."""
    import uvloop  # a faster event loop: an agent's turn costs less CPU on a busy node

    from shoal.agent.server import Agent

    _logging(verbose)
    settings = load_settings(
        AgentSettings,
        config,
        master=master,
        cluster_token=token,
        name=name,
        state_dir=state_dir,
        labels=_pairs("label", label) or None,
        resources=_resources(resource) or None,
        cpus=cpus,
        mem=mem,
        heartbeat_interval=heartbeat_interval,
        utilization=utilization,
    )
    os.chdir(Path.home())  # where parallel-shell commands start, as after an SSH login
    try:
        uvloop.run(Agent(settings).run())
    except KeyboardInterrupt:
        pass


def _token_file(path: Path) -> str:
    from shoal.files import write_secret
    from shoal.master.auth import new_token

    if not path.exists():
        write_secret(path, new_token() + "\n")
    return path.read_text().strip()


def _wait_for_master(url: str, token: str, proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise fail(
                f"the master exited with status {proc.returncode}", "is the port already in use? try --port"
            )
        try:
            if httpx.get(
                f"{url}/v1/whoami", headers={"Authorization": f"Bearer {token}"}, timeout=1
            ).is_success:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise fail(f"the master did not answer at {url} within {timeout:g}s")


@friendly
def dev(
    agents: Annotated[int, typer.Option(min=1, max=64, help="how many local agents")] = 3,
    port: Annotated[int, typer.Option(help="the master's port")] = DEFAULT_PORT,
    dns_port: Annotated[
        int | None, typer.Option(help="the master's DNS port, UDP and TCP [8600, or any free; 0: any free]")
    ] = None,
    state_dir: Annotated[Path, typer.Option(help="where the dev cluster keeps its state")] = Path(
        ".shoal-dev"
    ),
) -> None:
    """A master and local agents in one command; Ctrl-C stops them all."""
    from rich.panel import Panel

    from shoal.cli.render import out

    state_dir = state_dir.resolve()
    state_dir.mkdir(parents=True, exist_ok=True)
    admin = _token_file(state_dir / "admin.token")
    env = {
        **os.environ,
        "SHOAL_ADMIN_TOKEN": admin,
        "SHOAL_CLUSTER_TOKEN": _token_file(state_dir / "cluster.token"),
    }
    url = f"http://127.0.0.1:{port}"
    dns = _dns_port(dns_port)
    shoal = [sys.executable, "-m", "shoal"]
    procs = [
        subprocess.Popen(
            [*shoal, "master", "--port", str(port), "--state-dir", str(state_dir / "master")],
            # dev clusters even their load out
            env={**env, "SHOAL_REBALANCE": "spread", "SHOAL_DNS_PORT": str(dns)},
        )
    ]
    node_dirs = [state_dir / f"node{i}" for i in range(1, agents + 1)]
    try:
        _wait_for_master(url, admin, procs[0])
        for index, node_dir in enumerate(node_dirs):
            procs.append(
                subprocess.Popen(
                    [*shoal, "agent", "--master", url, "--name", node_dir.name, "--state-dir", str(node_dir)]
                    + ["--utilization", "tasks"],  # the agents share this machine
                    env={**env, "SHOAL_PORT_RANGE": json.dumps(shared_host_ports(index, agents))},
                )
            )
        config_path = save_client_config(ClientConfig(url=url, token=admin))
        out.print(
            Panel.fit(
                f"API      {url}/v1\n"
                f"docs     {url}/docs\n"
                f"DNS      127.0.0.1:{dns} UDP and TCP  (dig @127.0.0.1 -p {dns} shoal-agent.service.shoal)\n"
                f"token    {admin}  (admin)\n"
                f"client   {config_path}\n"
                f"agents   {', '.join(d.name for d in node_dirs)}\n\n"
                "try      shoal nodes · shoal run -- hostname · shoal submit job.toml · shoal jobs",
                title="shoal dev",
            )
        )
        _wait_any(procs)
    finally:
        _stop(procs, node_dirs)


def _dns_port(wanted: int | None) -> int:
    """`wanted` (0: any free port); without it, the master's setting (8600 unless
    SHOAL_DNS_PORT says) if that port is free, else any free one: dev clusters side by side."""
    from shoal.master.dns import free_dns_port

    if wanted is not None:
        return wanted or free_dns_port()
    return free_dns_port(prefer=MasterSettings().dns_port)


def _wait_any(procs: list[subprocess.Popen[bytes]]) -> None:
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        while all(p.poll() is None for p in procs):
            time.sleep(0.2)
        dead = next(p for p in procs if p.poll() is not None)
        raise fail(f"`{' '.join(map(str, dead.args[2:4]))}` exited with status {dead.returncode}; stopping")
    except KeyboardInterrupt:
        from shoal.cli.render import out

        out.print("stopping the dev cluster")


def _stop(procs: list[subprocess.Popen[bytes]], node_dirs: list[Path]) -> None:
    from shoal.agent.server import stop_runs

    for proc in reversed(procs):
        if proc.poll() is None:
            proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    for node_dir in node_dirs:
        stop_runs(node_dir)
