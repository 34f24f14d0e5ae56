"""Discovery through the master's DNS on a real cluster: `dig` and dnspython see a service's
passing replicas (A and SRV), large answers truncate over UDP and come whole over TCP, and a
client that resolves before every call sees no failed request while its service is moved
(make-before-break) or drained."""

from __future__ import annotations

import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import dns.exception
import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import httpx
import pytest

from shoal.model import JobSpec
from shoal.services import Registration
from shoal.testing.live import LiveCluster, live_cluster, wait_for

pytestmark = pytest.mark.timeout(120)

SERVER = """
import http.server, os, time
class Answer(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        time.sleep(0.005)
        self.send_response(200)
        self.send_header("content-length", "2")
        self.end_headers()
        self.wfile.write(b"ok")
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer(("127.0.0.1", int(os.environ["SHOAL_PORT_HTTP"])), Answer).serve_forever()
"""


def web(tmp_path: Path, **fields: object) -> JobSpec:
    script = tmp_path / "server.py"
    script.write_text(SERVER)
    return JobSpec.model_validate(
        {
            "name": "web",
            "command": [sys.executable, str(script)],
            "ports": ["http"],
            "resources": {"cpus": 0.1, "mem": 64},
            "services": [
                {"name": "web", "port": "http", "tags": ["v1"], "check": {"http": "http/", "interval": 0.2}}
            ],
            **fields,
        }
    )


def ask(cluster: LiveCluster, name: str, kind: str = "A", tcp: bool = False) -> dns.message.Message:
    query = dns.message.make_query(name, kind)
    send = dns.query.tcp if tcp else dns.query.udp
    return send(query, "127.0.0.1", port=cluster.dns_port, timeout=2)


def srv(cluster: LiveCluster, name: str) -> list[tuple[str, int]]:
    """(address, port) of each SRV record, in the answer's order."""
    answer = ask(cluster, name, "SRV")
    addresses = {str(r.name): r[0].address for r in answer.additional if r.rdtype == dns.rdatatype.A}
    return [(addresses[str(r.target)], r.port) for rrset in answer.answer for r in rrset]


def dig(cluster: LiveCluster, *args: str) -> list[str]:
    out = subprocess.run(
        ["dig", "@127.0.0.1", "-p", str(cluster.dns_port), "+short", "+time=2", *args],
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.split()


def test_dig_and_dnspython_see_the_passing_replicas(tmp_path: Path) -> None:
    with live_cluster(tmp_path, agents=3) as cluster, cluster.client() as client:
        job = client.submit(web(tmp_path, count=3, max_per_node=1))
        wait_for(lambda: len(srv(cluster, "web.service.shoal")) == 3, what="three replicas in DNS")
        ports = sorted(t.ports["http"] for t in client.job(job).tasks)
        assert sorted(port for _, port in srv(cluster, "_web._v1.service.shoal")) == ports
        # The replicas share this machine's address: one A record (an RRset holds no duplicates).
        assert dig(cluster, "web.service.shoal") == dig(cluster, "v1.web.service.shoal") == ["127.0.0.1"]
        words = dig(cluster, "_web._tcp.service.shoal", "SRV")  # priority weight port target, each
        records = [words[i : i + 4] for i in range(0, len(words), 4)]
        assert sorted(int(port) for _, _, port, _ in records) == ports
        assert {target for *_, target in records} == {f"node{i}.node.shoal." for i in (1, 2, 3)}
        assert dig(cluster, "node2.node.shoal") == ["127.0.0.1"]
        missing = ask(cluster, "nothing.service.shoal")
        assert missing.rcode() == dns.rcode.NXDOMAIN
        nodata = ask(cluster, "web.service.shoal", "AAAA")
        assert nodata.rcode() == dns.rcode.NOERROR and not nodata.answer and nodata.authority
        assert ask(cluster, "example.com").rcode() == dns.rcode.REFUSED


def test_answers_too_large_for_udp_truncate_and_come_whole_over_tcp(tmp_path: Path) -> None:
    with live_cluster(tmp_path, agents=1) as cluster, cluster.client() as client:
        for i in range(60):
            client.register(Registration(id=f"db{i}", name="db", address=f"10.9.0.{i + 1}", port=5432))
        udp = ask(cluster, "db.service.shoal", "SRV")
        assert udp.flags & dns.flags.TC
        whole = ask(cluster, "db.service.shoal", "SRV", tcp=True)
        assert not whole.flags & dns.flags.TC
        assert sum(len(rrset) for rrset in whole.answer) == 60


class Caller:
    """Resolves `web` through DNS (SRV) and calls one of its endpoints, every 20 ms (any of
    them, not the first: every replica is called, the one about to stop too)."""

    def __init__(self, cluster: LiveCluster) -> None:
        self.cluster = cluster
        self.failures: list[str] = []
        self.calls = 0
        self.seen: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run)

    def __enter__(self) -> Caller:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        with httpx.Client(timeout=5) as http:
            while not self._stop.is_set():
                self.calls += 1
                try:
                    address, port = random.choice(srv(self.cluster, "web.service.shoal"))
                    self.seen.add(port)
                    response = http.get(f"http://{address}:{port}/")
                    if response.status_code != 200:
                        self.failures.append(f"{port}: {response.status_code}")
                except (httpx.HTTPError, OSError, IndexError, dns.exception.DNSException) as e:
                    self.failures.append(f"{type(e).__name__}: {e}")
                time.sleep(0.02)


def test_no_request_fails_while_a_service_moves_make_before_break(tmp_path: Path) -> None:
    with live_cluster(tmp_path, agents=2) as cluster, cluster.client() as client:
        job = client.submit(web(tmp_path, migrate="make-before-break", shutdown_delay=1.0))
        wait_for(lambda: srv(cluster, "web.service.shoal"), what="the service in DNS")
        [task] = client.job(job).tasks
        with Caller(cluster) as caller:
            time.sleep(0.5)
            client.drain(task.node)
            wait_for(lambda: client.task(task.id).node != task.node, timeout=30, what="the move")
            time.sleep(3)  # past the old copy's stop
        assert caller.failures == [] and caller.calls > 50 and len(caller.seen) == 2


def test_no_request_fails_while_a_node_of_a_replicated_service_drains(tmp_path: Path) -> None:
    with live_cluster(tmp_path, agents=3) as cluster, cluster.client() as client:
        job = client.submit(web(tmp_path, count=2, max_per_node=1, shutdown_delay=1.0))
        wait_for(lambda: len(srv(cluster, "web.service.shoal")) == 2, what="two replicas in DNS")
        drained = client.job(job).tasks[0].node
        with Caller(cluster) as caller:
            time.sleep(0.5)
            client.drain(drained)
            wait_for(
                lambda: (
                    len(srv(cluster, "web.service.shoal")) == 2
                    and all(t.node != drained for t in client.job(job).tasks)
                ),
                timeout=30,
                what="both replicas serving off the drained node",
            )
            time.sleep(2)
        assert caller.failures == [] and caller.calls > 50 and len(caller.seen) == 3  # the replacement too
