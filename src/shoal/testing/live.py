"""A live cluster for tests and benchmarks: a real master and real agents on 127.0.0.1.

    with live_cluster(tmp_path, agents=2) as cluster:        # tls=True: HTTPS, agents join
                                                             # with a bootstrap token
        client = cluster.client()
        ...
        cluster.kill_agent("node1")      # SIGKILL, as a crashed machine's agent
        cluster.restart_master()         # SIGKILL, then start again on the same store

Each process logs to a file in the cluster's directory; `stop` leaves no process behind,
tasks included.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

from shoal.agent.server import stop_runs
from shoal.client import Client, Unreachable
from shoal.config import shared_host_ports
from shoal.master.auth import new_token
from shoal.model import NodeStatus, Role
from shoal.tls import TlsFiles


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(done: Callable[[], object], timeout: float = 15.0, what: str = "condition") -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(Unreachable):
            if value := done():
                return value
        time.sleep(0.05)
    raise TimeoutError(f"{what} not reached within {timeout}s")


class LiveCluster:
    def __init__(
        self,
        root: Path,
        agents: int,
        heartbeat_timeout: float,
        heartbeat_interval: float,
        master_settings: Mapping[str, str] | None = None,
        agent_batch: int | None = None,
        start_timeout: float | None = None,
        registered: Callable[[int, int], None] | None = None,
        agent_settings: Mapping[str, str] | None = None,
        tls: bool = False,
        agent_metrics: bool = False,
    ) -> None:
        self.root = root
        self.agent_batch = agent_batch
        self.start_timeout = start_timeout
        self.registered = registered
        self.port = free_port()
        self.tls = tls
        self.scheme = "https" if tls else "http"
        self.url = f"{self.scheme}://127.0.0.1:{self.port}"
        # The authority and the (first) master's certificate; clients and agents trust its ca.pem.
        self.tls_files = TlsFiles(root / "master" / "tls")
        self.ca = str(self.tls_files.ca_cert) if tls else None
        self._bootstrap_token: str | None = None
        self.dns_port = free_port()  # the master's DNS server, UDP and TCP
        self.admin_token = new_token()
        self.cluster_token = new_token()
        self.heartbeat_timeout = heartbeat_timeout
        self.heartbeat_interval = heartbeat_interval
        self.agent_names = [f"node{i}" for i in range(1, agents + 1)]
        self.master: subprocess.Popen[bytes] | None = None
        self.agents: dict[str, subprocess.Popen[bytes]] = {}
        # Settings of the master, and of every agent, as SHOAL_* variables: {"offer_timeout": "2"}.
        self.master_env = {
            "SHOAL_DNS_PORT": str(self.dns_port),
            **({} if tls else {"SHOAL_INSECURE": "1"}),  # plain HTTP: else the master wants TLS
            **{f"SHOAL_{k.upper()}": v for k, v in (master_settings or {}).items()},
        }
        self.agent_env = {f"SHOAL_{k.upper()}": v for k, v in (agent_settings or {}).items()}
        # With agent_metrics, each agent serves GET /metrics on a port of its own, on loopback,
        # to this token (the master's metrics token too, once `metrics_token()` has made it).
        self.agent_metrics = agent_metrics
        self.metrics_ports: dict[str, int] = {}
        self._metrics_token: str | None = None

    @property
    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "SHOAL_ADMIN_TOKEN": self.admin_token,
            "SHOAL_CLUSTER_TOKEN": self.cluster_token,
            "SHOAL_ALLOW_ROOT": "true",  # tests run as root; agent_settings may say otherwise
        }

    def _spawn(
        self,
        name: str,
        *args: str,
        env: Mapping[str, str] | None = None,
        base: Mapping[str, str] | None = None,
    ) -> subprocess.Popen[bytes]:
        """`shoal ARGS` logging to NAME.log, with `env` over `base` (default: `self.env`)."""
        log = open(self.root / f"{name}.log", "ab")  # noqa: SIM115 - the child holds it
        with log:
            return subprocess.Popen(
                [sys.executable, "-m", "shoal", *args],
                env={**(self.env if base is None else base), **(env or {})},
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def client(self, token: str | None = None) -> Client:
        return Client(self.url, token or self.admin_token, ca=self.ca)

    def cli_env(self, token: str | None = None) -> dict[str, str]:
        """The environment that points the `shoal` command at this cluster."""
        return {
            **os.environ,
            "SHOAL_URL": self.url,
            "SHOAL_TOKEN": token or self.admin_token,
            "SHOAL_CONFIG": str(self.root / "none.toml"),
            **({"SHOAL_CA": self.ca} if self.ca else {}),
        }

    def cli(
        self, *args: str, token: str | None = None, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        """Run `shoal ARGS` against this cluster; its exit code, stdout and stderr."""
        return subprocess.run(
            [sys.executable, "-m", "shoal", *args],
            env=self.cli_env(token),
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    # --- the master -----------------------------------------------------------------------

    def ensure_tls(self, files: TlsFiles) -> None:
        """The authority (the first master's) and a certificate for the master of `files`,
        made once, as `shoal tls init` and `shoal tls cert` would; nothing without TLS."""
        from shoal import tls

        if self.tls:
            tls.init_cluster_files(list(dict.fromkeys([self.tls_files, files])), tls.master_names([]))

    def metrics_token(self) -> str:
        """A metrics token (GET /metrics alone), made through the API at the first call."""
        if self._metrics_token is None:
            with self.client() as c:
                self._metrics_token = c.create_token("prometheus", Role.READER, kind="metrics").token
        return self._metrics_token

    def bootstrap_token(self) -> str:
        """A token agents join a TLS cluster with, made through the API at the first call."""
        if self._bootstrap_token is None:
            with self.client() as c:
                made = c.create_token("agents", Role.USER, kind="bootstrap", ttl=24 * 3600)
            self._bootstrap_token = made.token
        return self._bootstrap_token

    def agent_environment(self) -> dict[str, str]:
        """What tells an agent how to join: the cluster token on plain HTTP; on TLS, the CA
        and a bootstrap token, and no cluster token."""
        if not self.tls:
            return dict(self.env)
        joining = {"SHOAL_CA": str(self.ca), "SHOAL_BOOTSTRAP_TOKEN": self.bootstrap_token()}
        return {k: v for k, v in self.env.items() if k != "SHOAL_CLUSTER_TOKEN"} | joining

    def start_master(self) -> None:
        self.ensure_tls(self.tls_files)
        self.master = self._spawn(
            "master",
            "master",
            "--port",
            str(self.port),
            "--state-dir",
            str(self.root / "master"),
            "--heartbeat-timeout",
            str(self.heartbeat_timeout),
            env=self.master_env,
        )
        with self.client() as c:
            wait_for(c.whoami, what="the master answering")

    def daemons(self) -> list[subprocess.Popen[bytes]]:
        """The master processes (etcd's members not included)."""
        return [self.master] if self.master is not None else []

    def kill_master(self, sig: int = signal.SIGKILL) -> None:
        assert self.master is not None
        self.master.send_signal(sig)
        self.master.wait(10)

    def restart_master(self) -> None:
        self.kill_master()
        self.start_master()

    # --- agents ---------------------------------------------------------------------------

    def agent_dir(self, name: str) -> Path:
        return self.root / name

    def start_agent(self, name: str) -> None:
        self.agents[name] = self._spawn(
            name,
            "agent",
            "--master",
            self.url,
            "--name",
            name,
            "--state-dir",
            str(self.agent_dir(name)),
            "--heartbeat-interval",
            str(self.heartbeat_interval),
            "--cpus",
            "2",
            "--mem",
            "2048",
            "--label",
            f"agent={name}",
            "--utilization",
            "tasks",  # the agents share this machine: each measures its own tasks
            env={
                **self.agent_env,
                "SHOAL_PORT_RANGE": json.dumps(self.port_range(name)),
                **self._metrics_env(name),
            },
            base=self.agent_environment(),
        )

    def _metrics_env(self, name: str) -> dict[str, str]:
        if not self.agent_metrics:
            return {}
        port = self.metrics_ports.setdefault(name, free_port())
        return {"SHOAL_METRICS_PORT": str(port), "SHOAL_METRICS_TOKEN": self.metrics_token()}

    def port_range(self, name: str) -> tuple[int, int]:
        """The agent's own range of ports for its tasks, as `shoal dev` gives."""
        return shared_host_ports(self.agent_names.index(name), len(self.agent_names))

    def kill_agent(self, name: str, sig: int = signal.SIGKILL) -> None:
        proc = self.agents.pop(name)
        proc.send_signal(sig)
        proc.wait(10)

    def start_agents(
        self,
        names: list[str],
        batch: int | None = None,
        timeout: float | None = None,
        registered: Callable[[int, int], None] | None = None,
    ) -> None:
        """Start the agents `names`, `batch` at a time (default: all at once), each batch
        registered and up before the next starts: a hundred Python processes starting
        together on two cores all take longer than any sensible deadline. `registered(up,
        total)` is called as they come up; TimeoutError after `timeout` seconds in all,
        naming how many registered; RuntimeError as soon as an agent process exits."""
        batch = max(1, batch or len(names))
        limit = timeout if timeout is not None else 15.0 + 0.5 * len(names)  # shared cores
        began = time.monotonic()
        wanted = set(names)
        up: set[str] = set()
        with self.client() as c:
            for first in range(0, len(names), batch):
                chunk = names[first : first + batch]
                for name in chunk:
                    self.start_agent(name)
                while not set(chunk) <= up:
                    time.sleep(0.2)
                    with contextlib.suppress(Unreachable):
                        nodes = c.nodes()
                        up = {n.name for n in nodes if n.status is NodeStatus.UP and n.connected} & wanted
                    if registered is not None:
                        registered(len(up), len(names))
                    if dead := [n for n in chunk if self.agents[n].poll() is not None]:
                        log = (self.root / f"{dead[0]}.log").read_text(errors="replace").splitlines()
                        raise RuntimeError(
                            f"agent {dead[0]} exited with code {self.agents[dead[0]].returncode}"
                            f" ({len(dead)} of this batch did; {len(up)} of {len(names)} registered);"
                            " the end of its log:\n" + "\n".join(log[-8:])
                        )
                    if (elapsed := time.monotonic() - began) > limit:
                        raise TimeoutError(
                            f"{len(up)} of {len(names)} agents registered after {elapsed:.0f}s"
                            f" (the deadline); their logs are in {self.root}"
                        )

    def wait_nodes_up(self, names: list[str] | None = None, timeout: float = 15.0) -> None:
        want = set(names or self.agents)
        with self.client() as c:
            wait_for(
                lambda: want <= {n.name for n in c.nodes() if n.status is NodeStatus.UP and n.connected},
                timeout,
                f"nodes {sorted(want)} up",
            )

    # --- all ------------------------------------------------------------------------------

    def start(self) -> None:
        self.start_master()
        self.start_agents(self.agent_names, self.agent_batch, self.start_timeout, self.registered)

    def stop(self) -> None:
        procs = [*self.agents.values(), *([self.master] if self.master else [])]
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
        for proc in procs:
            proc.wait(10)
        for name in self.agent_names:
            stop_runs(self.agent_dir(name))


@contextlib.contextmanager
def live_cluster(
    root: Path,
    agents: int = 2,
    heartbeat_timeout: float = 2.0,
    heartbeat_interval: float = 0.3,
    master_settings: Mapping[str, str] | None = None,
    agent_batch: int | None = None,
    start_timeout: float | None = None,
    registered: Callable[[int, int], None] | None = None,
    agent_settings: Mapping[str, str] | None = None,
    tls: bool = False,
    agent_metrics: bool = False,
) -> Iterator[LiveCluster]:
    """A started cluster; `agent_batch`, `start_timeout` and `registered` as in `start_agents`;
    `master_settings` and `agent_settings` as SHOAL_* variables ({"fsync": "false"}); `tls`:
    HTTPS with the cluster's own authority, agents joining with a bootstrap token;
    `agent_metrics`: each agent serves its metrics (`metrics_ports`, `metrics_token()`)."""
    root.mkdir(parents=True, exist_ok=True)
    cluster = LiveCluster(
        root,
        agents,
        heartbeat_timeout,
        heartbeat_interval,
        master_settings,
        agent_batch,
        start_timeout,
        registered,
        agent_settings,
        tls,
        agent_metrics,
    )
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
