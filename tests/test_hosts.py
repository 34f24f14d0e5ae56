"""Hosts in network namespaces: reachability, faults and cleanup, with real namespaces.

Every host runs a tiny TCP echo server; a check is a one-shot client in one host that
connects to another's address, sends a byte and waits for it back (1 s timeout)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from shoal.testing.hosts import Hosts, clean_leftovers, netem_available, require_netns

PORT = 7007
SERVER = f"""
import socket, threading
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", {PORT})); s.listen(64); print("ready", flush=True)
def echo(c):
    with c:
        while data := c.recv(64): c.sendall(data)
while True: threading.Thread(target=echo, args=(s.accept()[0],), daemon=True).start()
"""
CLIENT = f"""
import socket, sys, time
start = time.monotonic()
try:
    with socket.create_connection((sys.argv[1], {PORT}), timeout=1.0) as c:
        c.sendall(b"x"); assert c.recv(1) == b"x"
except OSError:
    sys.exit(1)
print(round((time.monotonic() - start) * 1000, 1))
"""


@pytest.fixture
def hosts():
    require_netns()
    clean_leftovers()
    with Hosts(3) as hosts:
        for host in hosts.names:
            server = hosts.run(host, [sys.executable, "-c", SERVER], stdout=subprocess.PIPE, text=True)
            assert server.stdout.readline().strip() == "ready"
        yield hosts


def reach(hosts: Hosts, *pairs: tuple[str, str]) -> dict[tuple[str, str], float | None]:
    """Round-trip ms for each (from, to) pair, or None when it could not connect; all at once."""
    clients = {
        (a, b): hosts.run(
            a, [sys.executable, "-c", CLIENT, hosts.address(b)], stdout=subprocess.PIPE, text=True
        )
        for a, b in pairs
    }
    results = {}
    for pair, proc in clients.items():
        out, _ = proc.communicate(timeout=10)
        results[pair] = float(out) if proc.returncode == 0 else None
    return results


def reachable(hosts: Hosts, *pairs: tuple[str, str]) -> dict[tuple[str, str], bool]:
    return {pair: ms is not None for pair, ms in reach(hosts, *pairs).items()}


ALL = [(a, b) for a in ("h1", "h2", "h3") for b in ("h1", "h2", "h3") if a != b]


def test_every_host_reaches_every_other(hosts):
    assert hosts.address("h1") != hosts.address("h2")
    assert reachable(hosts, *ALL) == dict.fromkeys(ALL, True)


def test_isolate_cuts_one_host_off_and_heal_restores(hosts):
    hosts.isolate("h1")
    assert reachable(hosts, *ALL) == {pair: "h1" not in pair for pair in ALL}
    hosts.heal("h1")
    assert reachable(hosts, *ALL) == dict.fromkeys(ALL, True)


def test_cut_blocks_only_that_pair(hosts):
    hosts.cut("h1", "h2")
    cut = {("h1", "h2"), ("h2", "h1")}
    assert reachable(hosts, *ALL) == {pair: pair not in cut for pair in ALL}
    hosts.heal("h1", "h2")
    assert reachable(hosts, *ALL) == dict.fromkeys(ALL, True)


def test_heal_all_undoes_every_fault(hosts):
    hosts.isolate("h3")
    hosts.cut("h1", "h2")
    hosts.heal_all()
    assert reachable(hosts, *ALL) == dict.fromkeys(ALL, True)


def test_delay_adds_latency_and_heal_removes_it(hosts):
    if not netem_available():
        pytest.skip("the kernel has no netem qdisc (CONFIG_NET_SCH_NETEM), so no delay can be made")
    hosts.delay("h2", 200)
    (slow,) = reach(hosts, ("h1", "h2")).values()
    assert slow is not None and slow > 150
    hosts.heal("h2")
    (fast,) = reach(hosts, ("h1", "h2")).values()
    assert fast is not None and fast < 100


def running(pid: int) -> bool:
    """Alive and not a zombie (an orphan killed with its group waits for init to reap it)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_cleanup_leaves_no_namespace_or_process_even_when_the_body_raises():
    require_netns()
    pids = []
    with pytest.raises(RuntimeError, match="midway"), Hosts(2) as hosts:
        tag = hosts.tag
        for host in hosts.names:
            pids.append(hosts.run(host, ["sleep", "600"]).pid)
            # a grandchild in the same process group goes too
            pids.append(int(hosts.run(host, ["sh", "-c", "sleep 600 & echo $!"],
                                      stdout=subprocess.PIPE, text=True).stdout.readline()))  # fmt: skip
        raise RuntimeError("midway")
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert tag not in listed
    assert [pid for pid in pids if running(pid)] == []


def test_clean_leftovers_removes_namespaces_of_dead_runs_only():
    require_netns()
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = f"shoal-{dead.pid}-abc123-h1"
    subprocess.run(["ip", "netns", "add", stale], check=True)
    with Hosts(1) as hosts:
        assert stale in clean_leftovers()
        listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        assert stale not in listed
        assert hosts.namespace("h1") in listed  # ours: this process is alive
