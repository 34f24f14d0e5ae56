"""The master's DNS server in a live cluster: a job's service and a registration, asked over
UDP and TCP as a client on the machine would, and with dig."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import dns.message
import dns.query
import dns.rcode
import pytest

from shoal.model import JobSpec, TaskState
from shoal.services import MASTER_SERVICE, Registration
from shoal.testing.live import LiveCluster, live_cluster, wait_for

SLEEPER = JobSpec(
    name="web",
    command="sleep 300",
    count=2,
    resources={"cpus": 0.1},
    ports=["http"],
    services=[{"name": "web", "port": "http", "tags": ["v1"]}],
)


@pytest.fixture
def cluster(tmp_path: Path):
    with live_cluster(tmp_path, agents=2) as c:
        yield c


def ask(cluster: LiveCluster, name: str, rdtype: str = "A", tcp: bool = False) -> dns.message.Message:
    query = dns.message.make_query(name, rdtype)
    send = dns.query.tcp if tcp else dns.query.udp
    return send(query, "127.0.0.1", port=cluster.dns_port, timeout=2)


def srv_records(reply: dns.message.Message) -> set[tuple[int, str]]:
    return {(r.port, str(r.target)) for rrset in reply.answer for r in rrset}


def test_a_job_s_service_and_a_registration_answer_over_dns(cluster: LiveCluster) -> None:
    with cluster.client() as client:
        job = client.submit(SLEEPER)

        def running():
            tasks = client.job(job).tasks
            return all(t.state is TaskState.RUNNING for t in tasks) and tasks

        tasks = wait_for(running, what="the job running")
        expected = {(t.ports["http"], f"{t.node}.node.shoal.") for t in tasks}
        for tcp in (False, True):
            reply = wait_for(
                lambda tcp=tcp: (
                    srv_records(r := ask(cluster, "_web._tcp.service.shoal", "SRV", tcp)) == expected and r
                ),
                what="both endpoints in DNS",
            )
            assert reply.rcode() == dns.rcode.NOERROR and len(reply.additional) == 2
        client.register(Registration(id="db-1", name="db", address="192.0.2.10", port=5432))
        assert [r.to_text() for r in wait_for(lambda: ask(cluster, "db.service.shoal").answer)[0]] == [
            "192.0.2.10"
        ]
        assert ask(cluster, f"{MASTER_SERVICE}.service.shoal").answer
        client.kill(job)
        wait_for(
            lambda: ask(cluster, "web.service.shoal").rcode() == dns.rcode.NXDOMAIN, what="web gone from DNS"
        )


@pytest.mark.skipif(shutil.which("dig") is None, reason="dig is not installed (Debian: bind9-dnsutils)")
def test_dig_finds_the_agents(cluster: LiveCluster) -> None:
    dig = ["dig", "@127.0.0.1", "-p", str(cluster.dns_port), "+short", "+time=2", "+tries=1"]
    agents = subprocess.run(
        [*dig, "shoal-agent.service.shoal", "SRV"], capture_output=True, text=True, timeout=10
    )
    targets = sorted(line.split()[-1] for line in agents.stdout.splitlines())
    assert targets == ["node1.node.shoal.", "node2.node.shoal."]
    node = subprocess.run([*dig, "+tcp", "node1.node.shoal"], capture_output=True, text=True, timeout=10)
    assert len(node.stdout.split()) == 1  # its address
