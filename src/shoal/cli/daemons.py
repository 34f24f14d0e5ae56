"""Long-running commands: `shoal master`, `shoal agent`, and `shoal dev` (both at once).

What only one command uses is imported inside it: the server stacks (uvicorn, FastAPI,
websockets) by the daemon that runs them, httpx and the tables by `shoal dev`, so that an
agent starts on what it needs and nothing more.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from shoal.cli.errors import fail, friendly
from shoal.clientfile import DEFAULT_PORT, ClientConfig, save_client_config
from shoal.config import AgentSettings, MasterSettings, load_settings, shared_host_ports

if TYPE_CHECKING:
    import ssl

ConfigOpt = Annotated[Path | None, typer.Option("--config", help="a TOML file of settings", dir_okay=False)]


def _logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # At DEBUG, websockets logs every header of a handshake: the cluster token among them.
    logging.getLogger("websockets").setLevel(logging.INFO)
    # httpx logs each request at INFO: every renewal of a master's lease in etcd.
    for chatty in ("httpx", "httpcore"):
        logging.getLogger(chatty).setLevel(logging.WARNING)


@friendly
def master(
    host: Annotated[str | None, typer.Option(help="address to listen on [127.0.0.1]")] = None,
    port: Annotated[int | None, typer.Option(help=f"port to listen on [{DEFAULT_PORT}]")] = None,
    state_dir: Annotated[Path | None, typer.Option(help="where the store and tokens live")] = None,
    heartbeat_timeout: Annotated[
        float | None, typer.Option(help="seconds of silence before a node is down [10]")
    ] = None,
    store: Annotated[
        str | None,
        typer.Option(help="sqlite, or etcd://HOST:PORT,... for one of several masters [sqlite]"),
    ] = None,
    name: Annotated[str | None, typer.Option(help="this master's name among several [ADDRESS:PORT]")] = None,
    advertise: Annotated[
        str | None, typer.Option(help="the IPv4 address others reach this master at [the host's]")
    ] = None,
    tls_dir: Annotated[
        Path | None, typer.Option(help="the cluster CA and this master's certificate [STATE_DIR/tls]")
    ] = None,
    insecure: Annotated[
        bool | None, typer.Option("--insecure", help="plain HTTP, no TLS: for a throwaway cluster")
    ] = None,
    config: ConfigOpt = None,
    verbose: Annotated[bool, typer.Option("-v", "--verbose")] = False,
) -> None:
    """Run the master: the API, the ledger and the scheduler."""
    from shoal.master.api import create_app
    from shoal.master.opening import unreachable_address
    from shoal.master.serving import serve

    _logging(verbose)
    settings = load_settings(
        MasterSettings,
        config,
        host=host,
        port=port,
        state_dir=state_dir,
        heartbeat_timeout=heartbeat_timeout,
        store=store,
        name=name,
        advertise=advertise,
        tls_dir=tls_dir,
        insecure=insecure,
    )
    if why := unreachable_address(settings):
        raise fail(why, "e.g. --host 0.0.0.0 --advertise 10.0.0.5")
    logging.getLogger("shoal.master").info(
        "state in %s; the admin token is in admin.token there%s",
        settings.state_dir,
        ", the cluster token in cluster.token" if settings.insecure else "",
    )
    serve(create_app(settings), settings)


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
    token: Annotated[
        str | None, typer.Option(help="the cluster token, for a master on plain http (SHOAL_CLUSTER_TOKEN)")
    ] = None,
    ca: Annotated[Path | None, typer.Option(help="the cluster CA's certificate, ca.pem (https)")] = None,
    bootstrap_token: Annotated[
        str | None,
        typer.Option(help="joins this node once, for a certificate of its own (SHOAL_BOOTSTRAP_TOKEN)"),
    ] = None,
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
        ca=ca,
        bootstrap_token=bootstrap_token,
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


def _wait_for_master(
    url: str, token: str, proc: subprocess.Popen[bytes], verify: ssl.SSLContext | bool, timeout: float = 20.0
) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise fail(
                f"the master exited with status {proc.returncode}", "is the port already in use? try --port"
            )
        try:
            if httpx.get(
                f"{url}/v1/whoami", headers={"Authorization": f"Bearer {token}"}, timeout=1, verify=verify
            ).is_success:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise fail(f"the master did not answer at {url} within {timeout:g}s")


@friendly
def dev(
    agents: Annotated[int, typer.Option(min=1, max=64, help="how many local agents")] = 3,
    port: Annotated[
        int, typer.Option(help="the master's port (with --ha: the first master's)")
    ] = DEFAULT_PORT,
    dns_port: Annotated[
        int | None, typer.Option(help="the master's DNS port, UDP and TCP [8600, or any free; 0: any free]")
    ] = None,
    ha: Annotated[
        bool, typer.Option("--ha", help="3 etcd members and 3 masters, one leading (needs etcd-server)")
    ] = False,
    state_dir: Annotated[Path, typer.Option(help="where the dev cluster keeps its state")] = Path(
        ".shoal-dev"
    ),
    insecure: Annotated[
        bool, typer.Option("--insecure", help="plain HTTP; agents join with the cluster token")
    ] = False,
) -> None:
    """A master and local agents in one command; Ctrl-C stops them all."""
    from rich.panel import Panel

    from shoal.cli.render import out

    state_dir = state_dir.resolve()
    state_dir.mkdir(parents=True, exist_ok=True)
    admin = _token_file(state_dir / "admin.token")
    masters = [f"m{i + 1}" for i in range(_MASTERS)] if ha else ["master"]
    ca = None if insecure else _certificates(state_dir, masters)
    verify = True if ca is None else _trusting(ca)
    scheme = "http" if insecure else "https"
    env = {
        **os.environ,
        "SHOAL_ADMIN_TOKEN": admin,
        "SHOAL_CLUSTER_TOKEN": _token_file(state_dir / "cluster.token"),
        "SHOAL_REBALANCE": "spread",  # dev clusters even their load out
        "SHOAL_ALLOW_ROOT": "true",  # a throwaway cluster: its tasks may run as root
    }
    env.pop("SHOAL_INSECURE", None)  # the masters are told, by a flag
    dns = _dns_port(dns_port)
    node_dirs = [state_dir / f"node{i}" for i in range(1, agents + 1)]
    procs: list[subprocess.Popen[bytes]] = []
    restarts: dict[int, Callable[[], subprocess.Popen[bytes]]] = {}
    with contextlib.ExitStack() as stack:
        if ha:
            urls = _several_masters(stack, state_dir, port, dns, env, procs, restarts, insecure)
            url = ",".join(urls)
            _wait_for_leader(urls, admin, procs, verify)
        else:
            url = f"{scheme}://127.0.0.1:{port}"
            procs.append(_master_process(port, dns, state_dir / "master", env, *_plain(insecure)))
            _wait_for_master(url, admin, procs[0], verify)
        try:
            agent_env = env if ca is None else _joining(env, url, admin, ca, agents)
            for index, node_dir in enumerate(node_dirs):
                procs.append(
                    subprocess.Popen(
                        [
                            *_SHOAL,
                            "agent",
                            "--master",
                            url,
                            "--name",
                            node_dir.name,
                            "--state-dir",
                            str(node_dir),
                        ]
                        + ["--utilization", "tasks"],  # the agents share this machine
                        env={**agent_env, "SHOAL_PORT_RANGE": json.dumps(shared_host_ports(index, agents))},
                    )
                )
            config_path = save_client_config(ClientConfig(url=url, token=admin, ca=str(ca or "")))
            dig = f"dig @127.0.0.1 -p {dns} shoal-agent.service.shoal"
            lines = [
                *(f"master   {u}" for u in url.split(",")),
                f"docs     {url.split(',')[0]}/docs",
                f"DNS      127.0.0.1:{dns} UDP and TCP  ({dig})",
                f"token    {admin}  (admin)",
                f"CA       {ca}  (the client file's ca)" if ca else "TLS      none: plain HTTP (--insecure)",
                f"client   {config_path}",
                f"agents   {', '.join(d.name for d in node_dirs)}",
                "",
                "try      shoal nodes · shoal run -- hostname · shoal submit job.toml · shoal jobs",
            ]
            if ha:
                lines[2] += "; only the leader serves DNS: `shoal service shoal-master` gives its port"
                lines.append("         shoal masters; pkill -9 -f 'name m1' (the leader); shoal masters")
            out.print(Panel.fit("\n".join(lines), title="shoal dev --ha" if ha else "shoal dev"))
            _wait_any(procs, restarts)
        finally:
            _stop(procs, node_dirs)


_SHOAL = [sys.executable, "-m", "shoal"]
_MASTERS = 3  # with --ha: etcd members, and masters


def _master_process(
    port: int, dns: int, state_dir: Path, env: dict[str, str], *extra: str
) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [*_SHOAL, "master", "--port", str(port), "--state-dir", str(state_dir), *extra],
        env={**env, "SHOAL_DNS_PORT": str(dns)},
    )


def _several_masters(
    stack: contextlib.ExitStack,
    state_dir: Path,
    port: int,
    dns: int,
    env: dict[str, str],
    procs: list[subprocess.Popen[bytes]],
    restarts: dict[int, Callable[[], subprocess.Popen[bytes]]],
    insecure: bool,
) -> list[str]:
    """Three etcd members, then three masters on them (ports port..port+2); their URLs.
    Only the leader serves DNS, on `dns`; each master has a port of its own for it, as a
    leader elsewhere would, so the first master's is `dns`. `restarts` gets, by index in
    `procs`, how to start each master again, as a supervisor would when one dies."""
    import shutil

    from shoal.master.dns import free_dns_port
    from shoal.testing.etcd import EtcdCluster

    if shutil.which("etcd") is None:
        raise fail("etcd is not installed", "apt-get install etcd-server (Debian), then run this again")
    etcd = stack.enter_context(EtcdCluster(_MASTERS, state_dir / "etcd"))
    urls = []
    for i in range(_MASTERS):
        name = f"m{i + 1}"
        restarts[len(procs)] = functools.partial(
            _master_process,
            port + i,
            dns if i == 0 else free_dns_port(),
            state_dir / name,
            env,
            *("--store", etcd.store_url, "--name", name, *_plain(insecure)),
        )
        procs.append(restarts[len(procs)]())
        urls.append(f"{'http' if insecure else 'https'}://127.0.0.1:{port + i}")
    return urls


def _wait_for_leader(
    urls: list[str], token: str, procs: list[subprocess.Popen[bytes]], verify: ssl.SSLContext | bool
) -> None:
    """Until one of the masters at `urls` leads and answers."""
    import httpx

    deadline = time.monotonic() + 30
    headers = {"Authorization": f"Bearer {token}"}
    while time.monotonic() < deadline:
        if dead := [p for p in procs if p.poll() is not None]:
            raise fail(f"a master exited with status {dead[0].returncode}", "are the ports free? try --port")
        for url in urls:
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{url}/v1/whoami", headers=headers, timeout=1, verify=verify).is_success:
                    return
        time.sleep(0.1)
    raise fail("no master was elected within 30s", "see the masters' logs above")


def _plain(insecure: bool) -> list[str]:
    return ["--insecure"] if insecure else []


def _certificates(state_dir: Path, masters: list[str]) -> Path:
    """The dev cluster's authority and its masters' certificates, made at its first start
    and kept in each master's state directory; the CA's certificate."""
    from shoal import tls

    files = [tls.TlsFiles(state_dir / name / "tls") for name in masters]
    tls.init_cluster_files(files, tls.master_names([]))
    return files[0].ca_cert


def _trusting(ca: Path) -> ssl.SSLContext:
    from shoal.trust import master_context

    return master_context(ca)


def _joining(env: dict[str, str], url: str, admin: str, ca: Path, agents: int) -> dict[str, str]:
    """The agents' environment for a TLS master: the CA, and a bootstrap token for as many
    nodes, good for an hour (an agent that joined before needs none: it has a certificate
    of its own), in place of the cluster token."""
    from shoal.client import Client
    from shoal.model import Role

    with Client(url, admin, ca=ca) as client:
        made = client.create_token("dev-nodes", Role.USER, kind="bootstrap", ttl=3600, uses=agents)
    joining = {"SHOAL_CA": str(ca), "SHOAL_BOOTSTRAP_TOKEN": made.token}
    return {k: v for k, v in env.items() if k != "SHOAL_CLUSTER_TOKEN"} | joining


def _dns_port(wanted: int | None) -> int:
    """`wanted` (0: any free port); without it, the master's setting (8600 unless
    SHOAL_DNS_PORT says) if that port is free, else any free one: dev clusters side by side."""
    from shoal.master.dns import free_dns_port

    if wanted is not None:
        return wanted or free_dns_port()
    return free_dns_port(prefer=MasterSettings().dns_port)


def _wait_any(
    procs: list[subprocess.Popen[bytes]], restarts: dict[int, Callable[[], subprocess.Popen[bytes]]]
) -> None:
    """Until Ctrl-C or SIGTERM, or a process exits: the processes of `restarts` (the masters
    of --ha) are started again, the others stop the cluster."""
    from shoal.cli.render import out

    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        while True:
            time.sleep(0.2)
            for i, proc in enumerate(procs):
                if proc.poll() is None:
                    continue
                what = " ".join(map(str, proc.args[2:4]))
                if i not in restarts:
                    raise fail(f"`{what}` exited with status {proc.returncode}; stopping")
                out.print(f"`{what}` exited with status {proc.returncode}; starting it again")
                procs[i] = restarts[i]()
    except KeyboardInterrupt:
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
