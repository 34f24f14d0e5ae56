"""DNS answers from the service registry, checked by parsing the bytes with dnspython: the
pure `Answers` over a registry fed by the master's state machine, then the real server on
127.0.0.1 over UDP and TCP (dnspython and dig), and forwarding to an upstream of our own."""

from __future__ import annotations

import asyncio
import random
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator

import dns.edns
import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import pytest
from dnslib import RR as LibRR
from dnslib import DNSRecord
from dnslib.server import BaseResolver, DNSServer

from shoal.config import MasterSettings
from shoal.master import dns as dns_server
from shoal.master.dns import FORWARD, RECHECK, Answers, serve_dns
from shoal.master.events import FromAgent, Submit
from shoal.master.state import MasterState
from shoal.model import JobSpec, TaskState, Usage
from shoal.services import AGENT_SERVICE, MASTER_SERVICE, Endpoint, Registration
from shoal.testing.sim import sim_node
from shoal.wire import Heartbeat, Register, RunReport, RunReports

A, SRV, SOA, TXT, NS = (
    dns.rdatatype.A,
    dns.rdatatype.SRV,
    dns.rdatatype.SOA,
    dns.rdatatype.TXT,
    dns.rdatatype.NS,
)
WEB = JobSpec(
    name="web",
    command="serve",
    count=3,
    resources={"cpus": 1},
    ports=["http"],
    services=[{"name": "web", "port": "http", "tags": ["v1"]}],
)
MASTER = Endpoint(id="master", service=MASTER_SERVICE, kind="master", address="10.9.9.9", port=8470)


class Cluster:
    """A master's state with nodes n1-n3 (10.0.0.1-3) and what the tests add to it."""

    def __init__(self) -> None:
        self.state = MasterState(heartbeat_timeout=5, masters=[MASTER])
        self.now = 1.0
        self.clock = 100.0
        for i in (1, 2, 3):
            self.state.handle(FromAgent(f"n{i}", Register(node=sim_node(f"n{i}", address=f"10.0.0.{i}")), 1))
        self.answers = Answers(
            self.state.registry,
            ttl=7,
            negative_ttl=3,
            shuffle=random.Random(1).shuffle,
            clock=lambda: self.clock,
        )

    @property
    def registry(self):
        return self.state.registry

    def run(self, spec: JobSpec) -> list:
        """`spec` submitted, placed and running; its tasks."""
        for c in self.state.handle(Submit(1, "alice", spec, self.now)):
            assert getattr(c, "error", None) is None
        tasks = [t for t in self.state.ledger.tasks.values() if t.job_id == max(self.state.ledger.jobs)]
        for task in tasks:
            run = RunReport(run_id=f"{task.id}.0", task_id=task.id, attempt=0, state=TaskState.RUNNING)
            self.state.handle(FromAgent(task.node, RunReports(reports=[run]), self.now))
        return tasks

    def register(self, name: str, count: int, tags: tuple[str, ...] = ()) -> None:
        for i in range(count):
            spec = Registration(
                id=f"{name}-{i}", name=name, address=f"192.0.2.{i + 1}", port=9000 + i, tags=list(tags)
            )
            self.registry.register("bob", spec, self.now)

    def loads(self, **percent: float) -> None:
        for node, load in percent.items():
            self.state.handle(FromAgent(node, Heartbeat(usage=Usage(cpu_percent=load)), self.now))

    def ask(self, name: str, rdtype=A, udp: bool = True, **query) -> dns.message.Message:
        wire = self.wire(name, rdtype, **query)
        reply = self.answers.answer(wire, udp)
        assert isinstance(reply, bytes) and reply[:2] == wire[:2]
        return dns.message.from_wire(reply)

    @staticmethod
    def wire(name: str, rdtype=A, **query) -> bytes:
        return dns.message.make_query(name, rdtype, **query).to_wire()


def records(reply: dns.message.Message, section: str = "answer", rdtype=None) -> list[str]:
    return [
        rdata.to_text()
        for rrset in getattr(reply, section)
        if rdtype is None or rrset.rdtype == rdtype
        for rdata in rrset
    ]


@pytest.fixture
def cluster() -> Cluster:
    return Cluster()


# --- answers ---------------------------------------------------------------------------------


def test_a_records_list_the_passing_endpoints_addresses(cluster: Cluster) -> None:
    cluster.run(WEB)
    reply = cluster.ask("web.service.shoal")
    assert reply.rcode() == dns.rcode.NOERROR and reply.flags & dns.flags.AA
    assert sorted(records(reply)) == ["10.0.0.1", "10.0.0.2", "10.0.0.3"]
    assert reply.answer[0].ttl == 7 and str(reply.question[0].name) == "web.service.shoal."


def test_srv_names_each_endpoint_s_node_and_port_with_their_addresses_added(cluster: Cluster) -> None:
    tasks = cluster.run(WEB)
    reply = cluster.ask("web.service.shoal", SRV)
    expected = {f"1 1 {t.ports['http']} {t.node}.node.shoal." for t in tasks}
    assert set(records(reply)) == expected and len(records(reply)) == 3
    extra = {str(rrset.name): [r.to_text() for r in rrset] for rrset in reply.additional}
    assert extra == {f"n{i}.node.shoal.": [f"10.0.0.{i}"] for i in (1, 2, 3)}
    # The same in RFC 2782's form (_tcp: any tag), by tag, and by tag in RFC 2782's form.
    for name in ("_web._tcp.service.shoal", "v1.web.service.shoal", "_web._v1.service.shoal"):
        assert set(records(cluster.ask(name, SRV))) == expected, name
    for name in (
        "v2.web.service.shoal",
        "_web._v2.service.shoal",
        "_web.service.shoal",
        "a.b.web.service.shoal",
    ):
        assert cluster.ask(name, SRV).rcode() == dns.rcode.NXDOMAIN, name


def test_endpoints_without_a_node_are_named_by_their_address_as_consul_does(cluster: Cluster) -> None:
    cluster.register("db", 1)
    reply = cluster.ask("db.service.shoal", SRV)
    assert records(reply) == ["1 1 9000 c0000201.addr.shoal."]
    assert records(reply, "additional") == ["192.0.2.1"]
    assert records(cluster.ask("C0000201.addr.shoal")) == ["192.0.2.1"]
    assert cluster.ask("c00002.addr.shoal").rcode() == dns.rcode.NXDOMAIN
    assert records(cluster.ask(f"{MASTER_SERVICE}.service.shoal")) == ["10.9.9.9"]
    assert sorted(records(cluster.ask(f"{AGENT_SERVICE}.service.shoal"))) == [
        f"10.0.0.{i}" for i in (1, 2, 3)
    ]


def test_nodes_have_names_and_names_any_case(cluster: Cluster) -> None:
    assert records(cluster.ask("n2.node.shoal")) == ["10.0.0.2"]
    cluster.run(WEB)
    reply = cluster.ask("WeB.SERVICE.Shoal")
    assert sorted(records(reply)) == ["10.0.0.1", "10.0.0.2", "10.0.0.3"]
    assert str(reply.question[0].name) == "WeB.SERVICE.Shoal."  # the question as asked
    assert records(cluster.ask("N2.Node.SHOAL")) == ["10.0.0.2"]
    assert cluster.ask("n4.node.shoal").rcode() == dns.rcode.NXDOMAIN
    cluster.state.handle(FromAgent("n4", Register(node=sim_node("n4", address="10.0.0.4")), 2))
    assert records(cluster.ask("n4.node.shoal")) == ["10.0.0.4"]  # not the NXDOMAIN cached


def test_unknown_names_are_nxdomain_and_known_ones_without_the_type_nodata(cluster: Cluster) -> None:
    cluster.run(WEB)
    for name in ("nope.service.shoal", "n9.node.shoal", "what.shoal", "x.y.n1.node.shoal.more.shoal"):
        reply = cluster.ask(name)
        assert reply.rcode() == dns.rcode.NXDOMAIN and reply.answer == [], name
        [soa] = reply.authority
        assert soa.rdtype == SOA and soa.ttl == 3 and soa[0].minimum == 3 and str(soa.name) == "shoal."
    for name, rdtype in [
        ("n1.node.shoal", SRV),
        ("web.service.shoal", TXT),
        ("shoal", A),
        ("service.shoal", A),
    ]:
        reply = cluster.ask(name, rdtype)
        assert (reply.rcode(), reply.answer) == (dns.rcode.NOERROR, []), name
        assert [r.rdtype for r in reply.authority] == [SOA]


def test_the_zone_has_an_soa_and_a_name_server(cluster: Cluster) -> None:
    [soa] = cluster.ask("shoal", SOA).answer
    assert soa[0].minimum == 3 and str(soa[0].mname) == "ns.shoal."
    assert records(cluster.ask("shoal", NS)) == ["ns.shoal."]


def test_names_outside_the_zone_are_refused_or_forwarded(cluster: Cluster) -> None:
    reply = cluster.ask("example.com")
    assert reply.rcode() == dns.rcode.REFUSED and str(reply.question[0].name) == "example.com."
    assert not reply.flags & dns.flags.AA  # not ours to answer
    forwarding = Answers(cluster.registry, forward=True)
    assert forwarding.answer(cluster.wire("example.com")) is FORWARD
    assert forwarding.answer(cluster.wire("shoal-agent.service.shoal")) is not FORWARD


def test_a_udp_answer_too_big_is_truncated_and_whole_over_tcp_or_with_edns(cluster: Cluster) -> None:
    cluster.register("big", 40)  # 40 A records: 16 bytes each, over 512 in all
    reply = cluster.ask("big.service.shoal")
    assert reply.flags & dns.flags.TC and reply.answer == [] and len(reply.question) == 1
    assert len(records(cluster.ask("big.service.shoal", udp=False))) == 40
    reply = cluster.ask("big.service.shoal", use_edns=0, payload=4096)
    assert not reply.flags & dns.flags.TC and len(records(reply)) == 40
    assert reply.edns == 0 and reply.payload == 4096
    small = cluster.ask("big.service.shoal", use_edns=0, payload=256)  # below 512: 512 holds
    assert small.flags & dns.flags.TC and small.edns == 0


def test_additional_records_that_do_not_fit_are_left_out_without_truncation(cluster: Cluster) -> None:
    cluster.register("mid", 11)  # 11 SRV records fit in 512 bytes; with their A records they do not
    reply = cluster.ask("mid.service.shoal", SRV)
    assert not reply.flags & dns.flags.TC
    assert (len(records(reply)), reply.additional) == (11, [])
    assert len(records(cluster.ask("mid.service.shoal", SRV, udp=False), "additional")) == 11


def test_malformed_queries_get_formerr_or_nothing_and_never_an_exception(cluster: Cluster) -> None:
    answers = cluster.answers
    header = bytes.fromhex("abcd0100 0001 0000 0000 0000".replace(" ", ""))
    reply = answers.answer(header + b"\x07trunc")  # a question cut short
    assert isinstance(reply, bytes)
    parsed = dns.message.from_wire(reply)
    assert (parsed.id, parsed.rcode(), parsed.flags & dns.flags.QR) == (
        0xABCD,
        dns.rcode.FORMERR,
        dns.flags.QR,
    )
    assert answers.answer(b"\x01\x02\x03") is None  # not even a header
    response = dns.message.make_response(dns.message.make_query("web.service.shoal", A)).to_wire()
    assert answers.answer(response) is None  # never answer an answer
    two = dns.message.make_query("a.shoal", A)
    two.question.append(dns.message.make_query("b.shoal", A).question[0])
    assert dns.message.from_wire(answers.answer(two.to_wire())).rcode() == dns.rcode.FORMERR
    update = bytearray(cluster.wire("web.service.shoal"))
    update[2] |= 5 << 3  # opcode UPDATE
    assert dns.message.from_wire(answers.answer(bytes(update))).rcode() == dns.rcode.NOTIMP
    rng = random.Random(7)
    good = cluster.wire("web.service.shoal", SRV, use_edns=0)
    for _ in range(3000):
        noise = bytearray(good)
        for _ in range(rng.randint(1, 6)):
            noise[rng.randrange(len(noise))] = rng.randrange(256)
        junk = bytes(noise[: rng.randint(0, len(noise))]) if rng.random() < 0.3 else bytes(noise)
        for udp in (True, False):
            answers.answer(junk, udp)
            answers.answer(rng.randbytes(rng.randint(0, 80)), udp)


def test_edns_versions_above_zero_are_badvers(cluster: Cluster) -> None:
    reply = cluster.ask("web.service.shoal", use_edns=1)
    assert reply.rcode() == dns.rcode.BADVERS


def test_the_least_loaded_nodes_come_first(cluster: Cluster) -> None:
    cluster.run(WEB)
    cluster.loads(n1=85, n2=5, n3=45)
    for _ in range(6):  # every variant
        assert records(cluster.ask("web.service.shoal")) == ["10.0.0.2", "10.0.0.3", "10.0.0.1"]
        assert [r.split()[-1] for r in records(cluster.ask("web.service.shoal", SRV))] == [
            "n2.node.shoal.",
            "n3.node.shoal.",
            "n1.node.shoal.",
        ]
    # Loads move without the index moving: an answer is checked again once it is RECHECK old.
    for _ in range(5):
        cluster.loads(n1=0, n2=100, n3=0)
    assert records(cluster.ask("web.service.shoal"))[0] == "10.0.0.2"  # cached
    cluster.clock += RECHECK + 0.01
    assert records(cluster.ask("web.service.shoal"))[-1] == "10.0.0.2"


def test_ties_are_spread_over_their_endpoints(cluster: Cluster) -> None:
    cluster.register("api", 6)
    firsts = {records(cluster.ask("api.service.shoal"))[0] for _ in range(16)}
    assert len(firsts) >= 3
    for _ in range(8):
        reply = cluster.ask("api.service.shoal", SRV, udp=False)
        assert sorted(records(reply)) == sorted(
            f"1 1 {9000 + i} c00002{i + 1:02x}.addr.shoal." for i in range(6)
        )
        assert len(records(reply, "additional")) == 6


def test_cached_answers_follow_the_registry(cluster: Cluster) -> None:
    cluster.register("db", 1)
    assert records(cluster.ask("db.service.shoal")) == ["192.0.2.1"]
    cluster.register("db", 2)
    assert sorted(records(cluster.ask("db.service.shoal"))) == ["192.0.2.1", "192.0.2.2"]
    cluster.registry.deregister("db-0")
    cluster.registry.deregister("db-1")
    assert cluster.ask("db.service.shoal").rcode() == dns.rcode.NXDOMAIN


# --- the server on sockets ---------------------------------------------------------------------


class Loop:
    """An event loop in a thread, as the master's."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(10)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


@pytest.fixture
def loop() -> Iterator[Loop]:
    loop = Loop()
    yield loop
    loop.stop()


def serve(loop: Loop, cluster: Cluster, **settings):
    config = MasterSettings(host="127.0.0.1", dns_port=0, dns_ttl=7, **settings)
    return loop.run(serve_dns(cluster.registry, config))


def test_the_server_answers_over_udp_and_tcp_and_survives_garbage(loop: Loop, cluster: Cluster) -> None:
    cluster.run(WEB)
    cluster.register("big", 40)
    server = serve(loop, cluster)
    try:
        query = dns.message.make_query("web.service.shoal", SRV)
        assert len(dns.query.udp(query, "127.0.0.1", port=server.port, timeout=2).answer[0]) == 3
        assert len(dns.query.tcp(query, "127.0.0.1", port=server.port, timeout=2).answer[0]) == 3
        big = dns.message.make_query("big.service.shoal", A)
        assert dns.query.udp(big, "127.0.0.1", port=server.port, timeout=2).flags & dns.flags.TC
        assert len(dns.query.tcp(big, "127.0.0.1", port=server.port, timeout=2).answer[0]) == 40
        # Garbage over UDP and TCP; the server goes on answering.
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            for junk in (b"", b"\x00", b"\xff" * 11, random.Random(3).randbytes(300)):
                s.sendto(junk, ("127.0.0.1", server.port))
        with socket.create_connection(("127.0.0.1", server.port), timeout=2) as s:
            s.sendall(b"\x00\x05hello")
            assert s.recv(100) == b""  # closed: no header to answer
        # Several queries on one TCP connection.
        with socket.create_connection(("127.0.0.1", server.port), timeout=2) as s:
            for name in ("n1.node.shoal", "n2.node.shoal", "nope.service.shoal"):
                wire = Cluster.wire(name)
                s.sendall(len(wire).to_bytes(2, "big") + wire)
            replies = [dns.message.from_wire(_framed(s)) for _ in range(3)]
        assert [r.rcode() for r in replies] == [0, 0, dns.rcode.NXDOMAIN]
        assert records(replies[1]) == ["10.0.0.2"]
        assert dns.query.udp(query, "127.0.0.1", port=server.port, timeout=2).rcode() == 0
    finally:
        loop.run(server.close())


def _framed(s: socket.socket) -> bytes:
    size = int.from_bytes(_exactly(s, 2), "big")
    return _exactly(s, size)


def _exactly(s: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = s.recv(size - len(data))
        assert chunk, "closed"
        data += chunk
    return data


@pytest.mark.skipif(shutil.which("dig") is None, reason="dig is not installed (Debian: bind9-dnsutils)")
def test_dig_reads_the_answers(loop: Loop, cluster: Cluster) -> None:
    tasks = cluster.run(WEB)
    server = serve(loop, cluster)
    try:
        dig = ["dig", "@127.0.0.1", "-p", str(server.port), "+short", "+time=2", "+tries=1"]
        srv = subprocess.run([*dig, "web.service.shoal", "SRV"], capture_output=True, text=True, timeout=10)
        assert set(srv.stdout.split("\n")) - {""} == {
            f"1 1 {t.ports['http']} {t.node}.node.shoal." for t in tasks
        }
        a = subprocess.run([*dig, "_web._tcp.service.shoal"], capture_output=True, text=True, timeout=10)
        assert sorted(a.stdout.split()) == ["10.0.0.1", "10.0.0.2", "10.0.0.3"]
        tcp = subprocess.run([*dig, "+tcp", "n3.node.shoal"], capture_output=True, text=True, timeout=10)
        assert tcp.stdout.split() == ["10.0.0.3"]
    finally:
        loop.run(server.close())


class Upstream(BaseResolver):
    """A resolver of our own on 127.0.0.1 that knows one name."""

    def resolve(self, request: DNSRecord, handler) -> DNSRecord:
        reply = request.reply()
        if str(request.q.qname) == "example.test.":
            reply.add_answer(*LibRR.fromZone("example.test. 60 A 192.0.2.77"))
        return reply


@pytest.fixture
def upstream() -> Iterator[int]:
    udp = DNSServer(Upstream(), port=0, address="127.0.0.1")
    port = udp.server.server_address[1]
    tcp = DNSServer(Upstream(), port=port, address="127.0.0.1", tcp=True)
    udp.start_thread()
    tcp.start_thread()
    yield port
    udp.stop()
    tcp.stop()


def test_names_outside_the_zone_go_to_the_upstream(loop: Loop, cluster: Cluster, upstream: int) -> None:
    server = serve(loop, cluster, dns_upstream=f"127.0.0.1:{upstream}")
    try:
        query = dns.message.make_query("example.test", A)
        for ask in (dns.query.udp, dns.query.tcp):
            reply = ask(query, "127.0.0.1", port=server.port, timeout=3)
            assert records(reply) == ["192.0.2.77"], ask
        inside = dns.query.udp(
            dns.message.make_query("n1.node.shoal", A), "127.0.0.1", port=server.port, timeout=2
        )
        assert records(inside) == ["10.0.0.1"] and inside.flags & dns.flags.RA
    finally:
        loop.run(server.close())


def test_an_upstream_that_does_not_answer_gives_servfail(loop: Loop, cluster: Cluster) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:  # bound, never answers
        silent.bind(("127.0.0.1", 0))
        server = serve(loop, cluster, dns_upstream=f"127.0.0.1:{silent.getsockname()[1]}")
        try:
            query = dns.message.make_query("example.test", A)
            assert (
                dns.query.udp(query, "127.0.0.1", port=server.port, timeout=5).rcode() == dns.rcode.SERVFAIL
            )
            # Over TCP nothing listens there: refused at once.
            assert (
                dns.query.tcp(query, "127.0.0.1", port=server.port, timeout=5).rcode() == dns.rcode.SERVFAIL
            )
        finally:
            loop.run(server.close())


def test_idle_tcp_connections_are_closed_and_their_number_is_capped(
    loop: Loop, cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(dns_server, "TCP_IDLE", 0.3)
    monkeypatch.setattr(dns_server, "TCP_CLIENTS", 2)
    server = serve(loop, cluster)
    try:
        address = ("127.0.0.1", server.port)
        with (
            socket.create_connection(address, timeout=3) as a,
            socket.create_connection(address, timeout=3) as b,
        ):
            wire = Cluster.wire("n1.node.shoal")
            a.sendall(len(wire).to_bytes(2, "big") + wire)
            assert records(dns.message.from_wire(_framed(a))) == ["10.0.0.1"]
            with socket.create_connection(address, timeout=3) as c:
                assert c.recv(10) == b""  # a third, while two are open: closed at once
            assert a.recv(10) == b"" and b.recv(10) == b""  # silent for 0.3 s: closed
        with socket.create_connection(address, timeout=3) as d:  # room again
            d.sendall(len(wire).to_bytes(2, "big") + wire)
            assert records(dns.message.from_wire(_framed(d))) == ["10.0.0.1"]
    finally:
        loop.run(server.close())


def test_tcp_queries_may_come_split_or_together(loop: Loop, cluster: Cluster) -> None:
    server = serve(loop, cluster)
    try:
        framed = [
            len(w).to_bytes(2, "big") + w for w in map(Cluster.wire, ("n1.node.shoal", "n3.node.shoal"))
        ]
        with socket.create_connection(("127.0.0.1", server.port), timeout=3) as s:
            s.sendall(framed[0][:1])  # half a length
            time.sleep(0.05)
            s.sendall(framed[0][1:9])
            time.sleep(0.05)
            s.sendall(framed[0][9:] + framed[1])  # the rest, and the next query whole
            replies = [dns.message.from_wire(_framed(s)) for _ in range(2)]
        assert [records(r) for r in replies] == [["10.0.0.1"], ["10.0.0.3"]]
    finally:
        loop.run(server.close())
