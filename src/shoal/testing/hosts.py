"""Hosts in network namespaces, joined by one bridge, for tests that cut the network.

    with Hosts(3) as hosts:                       # h1, h2, h3
        server = hosts.run("h1", ["python3", "-m", "http.server", "8000"])
        hosts.address("h1")                       # "10.213.47.1"
        hosts.isolate("h1")                       # h1 reaches nobody, nobody reaches h1
        hosts.cut("h2", "h3")                     # only the path between h2 and h3
        hosts.delay("h2", 200, loss_percent=1)    # netem on h2's leg (needs sch_netem)
        hosts.heal("h1"); hosts.heal_all()

The layout, all made with iproute2 and none of it in the root namespace (the machine's own
network is never touched):

    namespace <tag>-hN   lo up; eth0 (one veth leg) with address N of the subnet
    namespace <tag>-br   bridge br0 with the other legs, named hN, as its ports

`<tag>` is `shoal-<pid>-<random>`, so parallel runs never clash and `clean_leftovers()` can
remove what a crashed run left behind (its pid no longer alive). Both veth legs are created
directly inside their namespaces, so deleting the namespaces deletes every link.

Faults, and why each is made the way it is:
- isolate(h): h's port on the bridge goes down. Its frames go nowhere: connections time out,
  as across a real partition.
- cut(a, b): a permanent neighbour entry for the peer's address, pointing at a MAC nobody
  has, in both a and b. Frames between them are flooded by the bridge and dropped by every
  host, so the pair sees silent loss (timeouts) while everyone else is untouched. No packet
  filter is needed (nftables and iptables are often absent), and unlike a blackhole or
  prohibit route it does not fail fast with a local error a real partition never gives.
- delay(h, ms, loss_percent): a netem qdisc on h's own leg (egress from h), so every round
  trip to or from h grows by ms. Kernels without sch_netem raise NetemUnavailable; see
  `netem_available()`.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import re
import secrets
import signal
import subprocess
from typing import Any

DEFAULT_SUBNET = "10.213.47.0/24"
PREFIX = "shoal-"
BRIDGE = "br0"
LEG = "eth0"
NOWHERE_MAC = "02:00:5e:00:de:ad"  # locally administered; no host in the set has it
_TAG = re.compile(rf"^{PREFIX}(\d+)-[0-9a-f]+-")


class NetemUnavailable(RuntimeError):
    """The kernel has no netem qdisc (CONFIG_NET_SCH_NETEM), so delay and loss cannot be made."""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10)
    if check and result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {result.stderr.strip()}")
    return result


def _namespaces() -> list[str]:
    result = _ip("netns", "list", check=False)
    return [line.split()[0] for line in result.stdout.splitlines() if line.strip()]


def _kill_namespace(name: str) -> None:
    """SIGKILL whatever still runs in the namespace, then delete it (and its links)."""
    for pid in _ip("netns", "pids", name, check=False).stdout.split():
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)
    _ip("netns", "del", name, check=False)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_leftovers() -> list[str]:
    """Delete the namespaces (and kill the processes) of earlier runs whose pid is gone."""
    removed = []
    for name in _namespaces():
        match = _TAG.match(name)
        if match and not _alive(int(match.group(1))):
            _kill_namespace(name)
            removed.append(name)
    return removed


def netns_problem() -> str | None:
    """Why network namespaces cannot be used here, or None when they can."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    probe = f"{PREFIX}{os.getpid()}-0-probe"
    try:
        _ip("netns", "add", probe)
        _ip("-n", probe, "link", "add", "p0", "type", "veth", "peer", "name", "p1")
    except (OSError, RuntimeError, subprocess.TimeoutExpired) as exc:
        return f"ip netns is unusable here: {exc}"
    finally:
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            _ip("netns", "del", probe, check=False)
    return None


def require_netns() -> None:
    """Skip the calling test, with the reason, when network namespaces are unusable."""
    import pytest

    if problem := netns_problem():
        pytest.skip(problem)


def netem_available() -> bool:
    """Whether the kernel can add a netem qdisc (tried on loopback in a throwaway namespace)."""
    probe = f"{PREFIX}{os.getpid()}-0-netem"
    try:
        _ip("netns", "add", probe)
        return _ip("-n", probe, "link", "set", "lo", "up", check=False).returncode == 0 and (
            subprocess.run(
                ["ip", "netns", "exec", probe, "tc", "qdisc", "add", "dev", "lo", "root", "netem"],
                capture_output=True,
                timeout=10,
            ).returncode
            == 0
        )
    except (OSError, RuntimeError, subprocess.TimeoutExpired):
        return False
    finally:
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            _ip("netns", "del", probe, check=False)


class Hosts:
    """N hosts h1..hN, each a network namespace with one leg on a shared bridge."""

    def __init__(self, count: int, subnet: str = DEFAULT_SUBNET, name: str = "h") -> None:
        network = ipaddress.ip_network(subnet)
        if count < 1 or count > network.num_addresses - 2:
            raise ValueError(f"{count} hosts do not fit in {subnet}")
        self.tag = f"{PREFIX}{os.getpid()}-{secrets.token_hex(3)}"
        self.names = [f"{name}{i}" for i in range(1, count + 1)]
        self.prefixlen = network.prefixlen
        self._addresses = {h: str(network.network_address + i) for i, h in enumerate(self.names, 1)}
        self._made: list[str] = []  # namespaces created, in order
        self._processes: list[subprocess.Popen[Any]] = []
        self._isolated: set[str] = set()
        self._cuts: set[frozenset[str]] = set()
        self._delayed: set[str] = set()

    # -- set-up and tear-down --

    def __enter__(self) -> Hosts:
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def namespace(self, host: str) -> str:
        if host not in self._addresses:
            raise KeyError(f"no host {host!r}; the hosts are {', '.join(self.names)}")
        return f"{self.tag}-{host}"

    @property
    def bridge_namespace(self) -> str:
        return f"{self.tag}-br"

    def _add_namespace(self, name: str) -> None:
        _ip("netns", "add", name)
        self._made.append(name)
        _ip("-n", name, "link", "set", "lo", "up")

    def _build(self) -> None:
        br = self.bridge_namespace
        self._add_namespace(br)
        _ip("-n", br, "link", "add", BRIDGE, "type", "bridge")
        _ip("-n", br, "link", "set", BRIDGE, "up")
        for host in self.names:
            ns = self.namespace(host)
            self._add_namespace(ns)
            # both legs are born inside their namespaces: nothing ever sits in the root one
            _ip("link", "add", LEG, "netns", ns, "type", "veth", "peer", "name", host, "netns", br)
            _ip("-n", br, "link", "set", host, "master", BRIDGE)
            _ip("-n", br, "link", "set", host, "up")
            _ip("-n", ns, "addr", "add", f"{self._addresses[host]}/{self.prefixlen}", "dev", LEG)
            _ip("-n", ns, "link", "set", LEG, "up")

    def close(self) -> None:
        """Kill every process started (whole process groups), then delete every namespace."""
        for proc in self._processes:
            # Only groups whose leader is unreaped: a reaped one's pid may be another's now.
            # Whatever outlived its leader dies with the namespace below.
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
        for proc in self._processes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
        for name in reversed(self._made):
            with contextlib.suppress(OSError, subprocess.TimeoutExpired):
                _kill_namespace(name)
        self._made.clear()

    # -- using hosts --

    def address(self, host: str) -> str:
        self.namespace(host)  # a clear error for an unknown host
        return self._addresses[host]

    def run(self, host: str, argv: list[str], **popen_kwargs: Any) -> subprocess.Popen[Any]:
        """Start argv inside the host, in a process group of its own that cleanup kills."""
        popen_kwargs.setdefault("start_new_session", True)
        proc = subprocess.Popen(["ip", "netns", "exec", self.namespace(host), *argv], **popen_kwargs)
        self._processes.append(proc)
        return proc

    # -- faults --

    def isolate(self, host: str) -> None:
        """Cut the host off from every other: its port on the bridge goes down."""
        self.namespace(host)
        _ip("-n", self.bridge_namespace, "link", "set", host, "down")
        self._isolated.add(host)

    def cut(self, a: str, b: str) -> None:
        """Only the path between a and b fails (silently), in both directions."""
        if a == b:
            raise ValueError("a host cannot be cut from itself")
        for here, peer in ((a, b), (b, a)):
            ns, peer_address = self.namespace(here), self.address(peer)
            _ip(
                "-n",
                ns,
                "neigh",
                "replace",
                peer_address,
                "lladdr",
                NOWHERE_MAC,
                "dev",
                LEG,
                "nud",
                "permanent",
            )
        self._cuts.add(frozenset((a, b)))

    def delay(self, host: str, ms: float, loss_percent: float = 0) -> None:
        """Every packet leaving the host waits ms (and loss_percent of them are lost)."""
        args = ["delay", f"{ms}ms"] + (["loss", f"{loss_percent}%"] if loss_percent else [])
        tc = ["ip", "netns", "exec", self.namespace(host), "tc", "qdisc", "replace", "dev", LEG, "root"]
        result = subprocess.run([*tc, "netem", *args], capture_output=True, text=True, timeout=10)
        if result.returncode != 0:
            if "unknown" in result.stderr.lower():
                raise NetemUnavailable(f"tc netem: {result.stderr.strip()}")
            raise RuntimeError(f"tc netem on {host}: {result.stderr.strip()}")
        self._delayed.add(host)

    def heal(self, *hosts: str) -> None:
        """heal(h) undoes h's isolation and delay and every cut touching h; heal(a, b) the cut
        between a and b only."""
        if len(hosts) == 2:
            self._heal_cut(frozenset(hosts))
            return
        (host,) = hosts
        if host in self._isolated:
            _ip("-n", self.bridge_namespace, "link", "set", host, "up")
            self._isolated.discard(host)
        if host in self._delayed:
            subprocess.run(
                ["ip", "netns", "exec", self.namespace(host), "tc", "qdisc", "del", "dev", LEG, "root"],
                capture_output=True,
                timeout=10,
            )
            self._delayed.discard(host)
        for pair in [p for p in self._cuts if host in p]:
            self._heal_cut(pair)

    def _heal_cut(self, pair: frozenset[str]) -> None:
        if pair not in self._cuts:
            return
        for here in pair:
            (peer,) = pair - {here}
            _ip("-n", self.namespace(here), "neigh", "del", self.address(peer), "dev", LEG, check=False)
        self._cuts.discard(pair)

    def heal_all(self) -> None:
        for host in self.names:
            self.heal(host)
