"""Real sshd processes on loopback addresses, as SSH-only machines for tests and benchmarks.

    with ssh_hosts(tmp_path, count=4) as hosts:
        hosts.options      # "-F <config>": ssh options that reach node1..node4 with the key
        hosts.names        # ["node1", ..., "node4"]

Host i listens on 127.0.0.(i+1) (every 127/8 address is loopback on Linux), with a host key
and a client key made for the occasion and an ssh_config that maps node names to those
addresses. Nothing listens beyond loopback.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from shoal.testing.live import free_port, wait_for

SSHD = shutil.which("sshd") or "/usr/sbin/sshd"


@dataclass
class SshHosts:
    root: Path
    names: list[str]
    port: int
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def config(self) -> Path:
        return self.root / "ssh_config"

    @property
    def options(self) -> str:
        return f"-F {self.config}"

    def address(self, index: int) -> str:
        return f"127.0.0.{index + 2}"

    def stop(self) -> None:
        for proc in self.processes:
            proc.terminate()
        for proc in self.processes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)


def _keygen(path: Path) -> None:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)


def _listening(address: str, port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((address, port), timeout=0.2):
        return True
    return False


@contextlib.contextmanager
def ssh_hosts(root: Path, count: int, prefix: str = "node") -> Iterator[SshHosts]:
    root.mkdir(parents=True, exist_ok=True)
    hosts = SshHosts(root, [f"{prefix}{i}" for i in range(1, count + 1)], free_port())
    _keygen(root / "host_key")
    _keygen(root / "client_key")
    shutil.copy(root / "client_key.pub", root / "authorized_keys")
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation directory
    hosts.config.write_text(
        "".join(
            f"Host {name}\n  HostName {hosts.address(i)}\n  Port {hosts.port}\n"
            for i, name in enumerate(hosts.names)
        )
        + f"Host *\n  IdentityFile {root / 'client_key'}\n  User {os.environ.get('USER', 'root')}\n"
        "  StrictHostKeyChecking no\n  UserKnownHostsFile /dev/null\n  LogLevel ERROR\n  BatchMode yes\n"
    )
    try:
        for i in range(count):
            hosts.processes.append(
                subprocess.Popen(
                    [
                        SSHD,
                        "-D",
                        "-e",
                        "-f",
                        "/dev/null",
                        "-h",
                        str(root / "host_key"),
                        "-o",
                        f"ListenAddress={hosts.address(i)}:{hosts.port}",
                        "-o",
                        f"AuthorizedKeysFile={root / 'authorized_keys'}",
                        "-o",
                        "PidFile=none",
                        "-o",
                        "StrictModes=no",
                        "-o",
                        "UsePAM=no",
                        "-o",
                        "PermitRootLogin=yes",
                        "-o",
                        "MaxStartups=1000",
                        "-o",
                        "Subsystem=sftp internal-sftp",  # scp speaks SFTP, as Debian's sshd allows
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=open(root / f"sshd-{i + 1}.log", "wb"),  # noqa: SIM115 (the process owns it)
                )
            )
        for i in range(count):
            wait_for(lambda i=i: _listening(hosts.address(i), hosts.port), 15, f"sshd on {hosts.address(i)}")
        yield hosts
    finally:
        hosts.stop()
