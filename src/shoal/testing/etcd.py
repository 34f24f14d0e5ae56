"""Real etcd members on this machine, for tests, benchmarks and `shoal dev --ha`.

    with EtcdCluster(3, tmp_path / "etcd") as etcd:
        gateway = Gateway(etcd.endpoints)     # or `--store {etcd.store_url}` for a master
        etcd.kill(0)                          # SIGKILL, as a crashed machine's member
        etcd.start(0)                         # again, on its data directory: it catches up

Each member (e1, e2, ...) keeps its data in `base_dir/eN/` and logs to `base_dir/eN.log`.
Entering starts a new cluster: data a previous one left in `base_dir` is removed first (its
members knew other ports, so they could not rejoin). `stop` kills every member, and leaving
the block stops them, whatever happened inside.

`spawn` runs a member elsewhere, e.g. inside a network namespace of `shoal.testing.hosts`:

    EtcdCluster(3, root, hosts=[hosts.address(h) for h in names],
                spawn=lambda i, argv, log: hosts.run(names[i], argv, stdout=log, stderr=STDOUT))

The readiness probe is run through `spawn` as well, so it asks each member from where the
member runs.
"""

from __future__ import annotations

import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

from shoal.testing.live import free_port

Spawn = Callable[[int, list[str], IO[bytes]], subprocess.Popen[bytes]]

# Exits 0 once the member at argv[1] says it is healthy (it has a leader and serves reads).
_PROBE = """
import sys, urllib.request
try:
    with urllib.request.urlopen(sys.argv[1] + "/health", timeout=1) as reply:
        sys.exit(0 if b'"health":"true"' in reply.read() else 1)
except Exception:
    sys.exit(1)
"""


def _spawn_here(index: int, argv: list[str], log: IO[bytes]) -> subprocess.Popen[bytes]:
    # A session of its own: a Ctrl-C meant for `shoal dev` does not reach etcd before the
    # masters have resigned through it.
    return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


class EtcdCluster:
    """`size` etcd members; `hosts` is every member's address or a list of one per member,
    `ports` a (client, peer) pair per member (default: free ports). Heartbeat and election
    timeouts (ms) are etcd's own unless given. `timeout`: seconds a member has to answer."""

    def __init__(
        self,
        size: int,
        base_dir: Path,
        hosts: list[str] | str = "127.0.0.1",
        ports: list[tuple[int, int]] | None = None,
        spawn: Spawn | None = None,
        heartbeat_ms: int | None = None,
        election_ms: int | None = None,
        timeout: float = 20.0,
    ) -> None:
        self.base_dir = base_dir
        self.hosts = [hosts] * size if isinstance(hosts, str) else list(hosts)
        self.ports = ports or [(free_port(), free_port()) for _ in range(size)]
        if len(self.hosts) != size or len(self.ports) != size:
            raise ValueError(f"{size} members need {size} hosts and {size} port pairs")
        self.names = [f"e{i + 1}" for i in range(size)]
        self.timeout = timeout
        self._spawn = spawn or _spawn_here
        self._tuning = [
            *(["--heartbeat-interval", str(heartbeat_ms)] if heartbeat_ms else []),
            *(["--election-timeout", str(election_ms)] if election_ms else []),
        ]
        self._token = f"shoal-{secrets.token_hex(6)}"  # never mistaken for another cluster's
        self._procs: list[subprocess.Popen[bytes] | None] = [None] * size

    @property
    def endpoints(self) -> list[str]:
        """The members' client URLs."""
        return [f"http://{h}:{c}" for h, (c, _) in zip(self.hosts, self.ports, strict=True)]

    @property
    def store_url(self) -> str:
        """What a master's `--store` takes: etcd://host:port,host:port,..."""
        return "etcd://" + ",".join(f"{h}:{c}" for h, (c, _) in zip(self.hosts, self.ports, strict=True))

    def __enter__(self) -> EtcdCluster:
        try:
            self.base_dir.mkdir(parents=True, exist_ok=True)
            for name in self.names:
                shutil.rmtree(self.base_dir / name, ignore_errors=True)
            for i in range(len(self.names)):
                self._launch(i)
            self._wait(range(len(self.names)))
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()

    def _argv(self, i: int) -> list[str]:
        etcd = shutil.which("etcd")
        if etcd is None:
            raise RuntimeError("etcd is not installed: apt-get install etcd-server (or `make test`)")
        host, (client, peer) = self.hosts[i], self.ports[i]
        cluster = ",".join(
            f"{name}=http://{h}:{p}"
            for name, h, (_, p) in zip(self.names, self.hosts, self.ports, strict=True)
        )
        return [
            etcd,
            *("--name", self.names[i], "--data-dir", str(self.base_dir / self.names[i])),
            *("--listen-client-urls", f"http://{host}:{client}"),
            *("--advertise-client-urls", f"http://{host}:{client}"),
            *("--listen-peer-urls", f"http://{host}:{peer}"),
            *("--initial-advertise-peer-urls", f"http://{host}:{peer}"),
            *("--initial-cluster", cluster, "--initial-cluster-state", "new"),
            *("--initial-cluster-token", self._token),
            # A member cut off and back must not force a raft election that stalls every
            # write (and so the masters' leases): it first asks whether it could win one.
            "--pre-vote",
            *self._tuning,
        ]

    def _log(self, i: int) -> Path:
        return self.base_dir / f"{self.names[i]}.log"

    def _launch(self, i: int) -> None:
        with open(self._log(i), "ab") as log:  # the child keeps its own descriptor
            self._procs[i] = self._spawn(i, self._argv(i), log)

    def _healthy(self, i: int) -> bool:
        with open(self._log(i), "ab") as log:
            probe = self._spawn(i, [sys.executable, "-c", _PROBE, self.endpoints[i]], log)
        try:
            return probe.wait(timeout=10) == 0
        except subprocess.TimeoutExpired:
            probe.kill()
            probe.wait()
            return False

    def _wait(self, members: range | list[int]) -> None:
        """Until every one of `members` is healthy; RuntimeError, with the end of its log, for
        one that exits or is not within the timeout."""
        waiting = list(members)
        deadline = time.monotonic() + self.timeout
        while waiting:
            for i in list(waiting):
                proc = self._procs[i]
                if proc is not None and proc.poll() is not None:
                    raise self._failed(i, f"exited with code {proc.returncode}")
                if self._healthy(i):
                    waiting.remove(i)
            if waiting and time.monotonic() > deadline:
                raise self._failed(waiting[0], f"did not answer within {self.timeout:.0f}s")
            if waiting:
                time.sleep(0.1)

    def _failed(self, i: int, what: str) -> RuntimeError:
        lines = self._log(i).read_text(errors="replace").splitlines()
        return RuntimeError(
            f"etcd member {self.names[i]} ({self.endpoints[i]}) {what}; the end of its log"
            f" {self._log(i)}:\n" + "\n".join(lines[-12:])
        )

    def kill(self, i: int, sig: int = signal.SIGKILL) -> None:
        """Send member i `sig` and wait for it to exit."""
        proc = self._procs[i]
        if proc is not None and proc.poll() is None:
            proc.send_signal(sig)
            proc.wait(timeout=30)
        self._procs[i] = None

    def start(self, i: int) -> None:
        """Start member i again on its data directory, and wait until it answers."""
        if (proc := self._procs[i]) is not None and proc.poll() is None:
            raise RuntimeError(f"etcd member {self.names[i]} is running")
        self._launch(i)
        self._wait([i])

    def stop(self) -> None:
        """Kill every member still running."""
        for i, proc in enumerate(self._procs):
            if proc is not None and proc.poll() is None:
                proc.kill()
            if proc is not None:
                proc.wait(timeout=30)
            self._procs[i] = None
