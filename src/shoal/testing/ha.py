"""Several masters on etcd, with agents, on 127.0.0.1: a `LiveCluster` that survives its leader.

    with ha_cluster(tmp_path, masters=3, agents=2) as cluster:
        leader = cluster.leader()              # "m2"
        cluster.kill_master(leader)            # SIGKILL; another is elected within seconds
        cluster.start_master_named(leader)     # back, as a follower

Clients and agents are given every master's URL and follow the leader themselves.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
from collections.abc import Iterator, Mapping
from pathlib import Path

from shoal.testing.etcd import EtcdCluster
from shoal.testing.live import LiveCluster, free_port, wait_for
from shoal.tls import TlsFiles
from shoal.views import MasterView


class HaCluster(LiveCluster):
    def __init__(self, root: Path, etcd: EtcdCluster, masters: int, agents: int, **kwargs: object) -> None:
        super().__init__(root, agents, **kwargs)  # type: ignore[arg-type]
        self.etcd = etcd
        self.names = [f"m{i + 1}" for i in range(masters)]
        self.ports = {name: free_port() for name in self.names}
        self.dns_ports = {name: free_port() for name in self.names}  # each leader serves DNS
        self.urls = {name: f"{self.scheme}://127.0.0.1:{port}" for name, port in self.ports.items()}
        self.tls_files = TlsFiles(root / self.names[0] / "tls")  # the authority's: the first master's
        self.ca = str(self.tls_files.ca_cert) if self.tls else None
        self.url = ",".join(self.urls.values())
        self.masters: dict[str, subprocess.Popen[bytes]] = {}

    def start_master(self) -> None:
        for name in self.names:
            self.start_master_named(name)
        with self.client() as c:
            wait_for(c.whoami, what="a leader answering")

    def start_master_named(self, name: str) -> None:
        self.ensure_tls(TlsFiles(self.root / name / "tls"))
        self.masters[name] = self._spawn(
            name,
            "master",
            *("--port", str(self.ports[name]), "--state-dir", str(self.root / name)),
            *("--heartbeat-timeout", str(self.heartbeat_timeout)),
            *("--store", self.etcd.store_url, "--name", name),
            env={**self.master_env, "SHOAL_DNS_PORT": str(self.dns_ports[name])},
        )

    def daemons(self) -> list[subprocess.Popen[bytes]]:
        return list(self.masters.values())

    def listing(self) -> list[MasterView]:
        with self.client() as c:
            return c.masters()

    def leader(self, timeout: float = 15.0) -> str:
        """The name of the master that leads, once one does."""
        found = wait_for(
            lambda: next((m.name for m in self.listing() if m.leader), None), timeout, "a leader"
        )
        return str(found)

    def kill_master(self, name: str | None = None, sig: int = signal.SIGKILL) -> None:  # type: ignore[override]
        proc = self.masters.pop(name or self.leader())
        proc.send_signal(sig)
        proc.wait(10)

    def stop(self) -> None:
        for proc in self.masters.values():
            if proc.poll() is None:
                proc.kill()
        for proc in self.masters.values():
            proc.wait(10)
        self.master = None
        super().stop()


@contextlib.contextmanager
def ha_cluster(
    root: Path,
    masters: int = 3,
    agents: int = 2,
    etcd_members: int = 1,
    heartbeat_timeout: float = 6.0,
    heartbeat_interval: float = 0.3,
    master_settings: Mapping[str, str] | None = None,
    tls: bool = False,
) -> Iterator[HaCluster]:
    """A started cluster of `masters` masters on `etcd_members` etcd members, and agents;
    `tls`: HTTPS, a certificate per master from one authority."""
    root.mkdir(parents=True, exist_ok=True)
    with EtcdCluster(etcd_members, root / "etcd") as etcd:
        cluster = HaCluster(
            root,
            etcd,
            masters,
            agents,
            heartbeat_timeout=heartbeat_timeout,
            heartbeat_interval=heartbeat_interval,
            master_settings=master_settings,
            tls=tls,
        )
        try:
            cluster.start()
            yield cluster
        finally:
            cluster.stop()
