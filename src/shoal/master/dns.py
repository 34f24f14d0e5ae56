"""The master's DNS server: names under `shoal.` answered from the service registry, on UDP
and TCP, on the master's event loop.

    NAME.service.shoal          A, SRV   the passing endpoints of service NAME
    TAG.NAME.service.shoal      A, SRV   only those with tag TAG
    _NAME._TAG.service.shoal    A, SRV   RFC 2782's form of the same; `_tcp` means any tag
    NODE.node.shoal             A        the node's address
    HEX.addr.shoal              A        the IPv4 address HEX spells (7f000001: 127.0.0.1)
    shoal                       SOA, NS  the zone

Answers, as Consul gives them (names in any case; the question echoed as asked):
- A records give each address once; SRV records each endpoint: priority 1, weight 1, its
  port, and as target its node's name or, for an endpoint without a node (a registration,
  a master), its address as Consul spells it (`0a000001.addr.shoal`), with the targets' A
  records added. Endpoints come in `Registry.ordered` order: least loaded nodes first.
- A service without a passing endpoint (with that tag) is no name: NXDOMAIN, as in Consul.
  A name without records of the type asked is NODATA (NOERROR, no answer). Both carry the
  zone's SOA, whose TTL and minimum are the negative TTL; answers carry `dns_ttl`.
- A name outside `shoal.` is REFUSED or, with an upstream, forwarded over the transport it
  came on and the upstream's answer relayed (SERVFAIL when none comes in time).
- A UDP answer fits in 512 bytes, or in what the query's EDNS0 record offers (at most 4096):
  the additional records go first (no truncation, RFC 2181 9), then every record, with the
  TC bit set: the client asks again over TCP, where answers are whole.
- A packet whose header reads but whose rest does not is answered FORMERR; one without a
  header, or a response, is not answered. Other opcodes: NOTIMP; EDNS versions above 0: BADVERS.

Speed: each answer is kept packed, keyed by the query's bytes after its id (a reply is the
query's id and the packed rest), made afresh when its service's index moves (a node's: the
agents'); a service's in `VARIANTS` orders taken in turn, so ties spread. Node loads move
without an index: an answer older than `RECHECK` seconds has its order checked again.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import random
import socket
import struct
import time
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass, field, replace

from dnslib import CLASS, EDNS0, NS, OPCODE, QTYPE, RCODE, RR, SOA, SRV, A, DNSHeader, DNSLabel, DNSRecord

from shoal.config import MasterSettings
from shoal.master.registry import Registry
from shoal.services import AGENT_SERVICE, Endpoint

log = logging.getLogger("shoal.master.dns")

__all__ = ["FORWARD", "Answers", "DnsServer", "failure", "free_dns_port", "serve_dns"]

ZONE = b"shoal"
PLAIN_UDP = 512  # bytes a UDP answer may take when the query has no EDNS0 record
MAX_UDP = 4096  # the most a query's EDNS0 record may raise that to, and what ours offers
VARIANTS = 4  # orders a service's answer is packed in, taken in turn
RECHECK = 0.25  # seconds before the order of a cached answer is looked at again
CACHE_LIMIT = 10_000  # packed answers kept per transport (then all are forgotten)
BADVERS = 16  # an extended RCODE: 4 bits in the header, 8 more in the OPT record
SOA_TIMES = (3600, 600, 86_400)  # refresh, retry, expire: for secondaries, which there are none of
TCP_IDLE = 5.0  # seconds a TCP connection may stay silent before it is closed
TCP_CLIENTS = 256  # TCP connections served at once; more are closed at once
FORWARD_TIMEOUT = 2.0  # seconds the upstream has to answer a forwarded query
FORWARDS = 256  # forwarded queries in flight at once; more are answered SERVFAIL

_HEADER = struct.Struct("!HHHHHH")
_IN, _ANY = CLASS.IN, QTYPE.ANY


class Forward:
    """What `Answers.answer` gives for a name outside the zone when an upstream is set."""

    __slots__ = ()


FORWARD = Forward()
_DROP: tuple[bytes, ...] = ()


@dataclass(slots=True)
class _Entry:
    """A cached answer: its packed variants (after the id), taken in turn; the service whose
    index it was made at (`guard`: a node's name has the agents'); for a service's answer,
    the service and tag it lists and the order its endpoints were in, as last seen."""

    replies: tuple[bytes, ...] | Forward
    service: tuple[str, str | None] | None = None
    order: tuple[str, ...] = ()
    checked: float = 0.0
    guard: str | None = None
    index: int = 0
    turn: Iterator[bytes] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.replies, tuple) and self.replies:
            self.turn = itertools.cycle(self.replies)


@dataclass(frozen=True, slots=True)
class _Found:
    """What a name in the zone holds for the type asked: records, or none (NODATA), or no
    such name (NXDOMAIN). A service's answer records each have a key (an address, a port and
    target), and come in the orders `orders` gives by key."""

    rcode: int = RCODE.NOERROR
    answer: list[RR] = field(default_factory=list)
    extra: list[RR] = field(default_factory=list)  # the additional section
    keys: list[Hashable] = field(default_factory=list)
    orders: list[list[Hashable]] = field(default_factory=list)
    service: tuple[str, str | None] | None = None
    order: tuple[str, ...] = ()
    guard: str | None = None  # the service whose changes change it


_NXDOMAIN = _Found(RCODE.NXDOMAIN)
_NODATA = _Found()


def _keep(_: list[Endpoint]) -> None:
    """A shuffle that leaves the order as it is: what an answer's order is checked against."""


class Answers:
    """Answers to DNS queries (bytes in, bytes out, no I/O) from the registry."""

    def __init__(
        self,
        registry: Registry,
        *,
        ttl: int = 5,
        negative_ttl: int = 5,
        forward: bool = False,
        shuffle: Callable[[list[Endpoint]], None] = random.shuffle,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.registry = registry
        self.ttl = ttl
        self.negative_ttl = negative_ttl
        self.forward = forward
        self.shuffle = shuffle
        self.clock = clock
        self._udp: dict[bytes, _Entry] = {}
        self._tcp: dict[bytes, _Entry] = {}

    def answer(self, query: bytes, udp: bool = True) -> bytes | Forward | None:
        """The reply to `query`; FORWARD to forward it upstream; None to give none."""
        cache = self._udp if udp else self._tcp
        key = query[2:]
        entry = cache.get(key)
        if entry is None or (entry.guard is not None and self.registry.index_of(entry.guard) != entry.index):
            if len(cache) >= CACHE_LIMIT:
                cache.clear()
            entry = cache[key] = self._entry(query, udp)
        elif entry.service is not None and self.clock() - entry.checked > RECHECK:
            name, tag = entry.service  # loads may have moved: the order, as it is now
            if self._order(self.registry.endpoints(name, tag=tag)) == entry.order:
                entry.checked = self.clock()
            else:
                entry = cache[key] = self._entry(query, udp)
        if entry.turn is None:
            return None if entry.replies == _DROP else FORWARD
        return query[:2] + next(entry.turn)

    def _order(self, endpoints: list[Endpoint]) -> tuple[str, ...]:
        return tuple(e.id for e in self.registry.ordered(endpoints, _keep))

    # --- answering afresh ---------------------------------------------------------------------

    def _entry(self, query: bytes, udp: bool) -> _Entry:
        try:
            record = DNSRecord.parse(query)
        except Exception:  # whatever dnslib raises, the packet is malformed
            reply = failure(query, RCODE.FORMERR)
            return _Entry((reply[2:],) if reply is not None else _DROP)
        header = record.header
        if header.qr:  # a response: answering it could start a loop between two servers
            return _Entry(_DROP)
        opts = [r for r in record.ar if r.rtype == QTYPE.OPT]
        if header.opcode != OPCODE.QUERY:
            return self._plain(record, RCODE.NOTIMP)
        if len(record.questions) != 1 or len(opts) > 1:
            return self._plain(record, RCODE.FORMERR)
        opt = opts[0] if opts else None
        if opt is not None and opt.edns_ver != 0:
            return self._plain(record, BADVERS, opt=opt)
        if udp:
            limit = min(max(opt.edns_len, PLAIN_UDP), MAX_UDP) if opt is not None else PLAIN_UDP
        else:
            limit = 65_535
        question = record.questions[0]
        labels = [label.lower() for label in question.qname.label]
        if not labels or labels[-1] != ZONE or question.qclass not in (_IN, _ANY):
            return _Entry(FORWARD) if self.forward else self._plain(record, RCODE.REFUSED, opt=opt)
        found = self._find(labels[:-1], question.qtype, question.qname)
        rest = self._pack(record, found.rcode, found.answer, found.extra, opt, limit)
        replies = _permuted(rest, found.keys, found.orders) if found.orders else (rest,)
        index = self.registry.index_of(found.guard) if found.guard is not None else 0
        return _Entry(replies, found.service, found.order, self.clock(), found.guard, index)

    def _plain(self, record: DNSRecord, rcode: int, opt: RR | None = None) -> _Entry:
        return _Entry((self._pack(record, rcode, [], [], opt, 65_535),))

    def _pack(
        self, record: DNSRecord, rcode: int, answer: list[RR], extra: list[RR], opt: RR | None, limit: int
    ) -> bytes:
        """The reply packed, less its id: with the SOA for a negative answer; without the
        additional records if they make it too big; truncated if it is still too big."""
        ours = rcode in (RCODE.NOERROR, RCODE.NXDOMAIN)  # an answer from the zone: authoritative
        header = DNSHeader(id=0, bitmap=0, qr=1, aa=int(ours), rd=record.header.rd, ra=int(self.forward))
        header.cd = record.header.cd
        header.rcode = rcode & 0xF
        authority = [self._soa()] if ours and not answer and record.questions else []
        edns = [EDNS0(udp_len=MAX_UDP, ext_rcode=rcode >> 4)] if opt is not None else []
        reply = DNSRecord(header, list(record.questions[:1]), list(answer), auth=authority, ar=extra + edns)
        packed = reply.pack()
        if len(packed) > limit and extra:
            reply.ar = edns
            packed = reply.pack()
        if len(packed) > limit:
            header.tc = 1
            reply.rr, reply.auth, reply.ar = [], [], edns
            packed = reply.pack()
        return bytes(packed[2:])

    def _soa(self) -> RR:
        serial = self.registry.index & 0xFFFF_FFFF
        times = (serial, *SOA_TIMES, self.negative_ttl)
        soa = SOA(mname="ns.shoal.", rname="hostmaster.shoal.", times=times)
        return RR("shoal.", QTYPE.SOA, ttl=self.negative_ttl, rdata=soa)

    def _find(self, labels: list[bytes], qtype: int, qname: DNSLabel) -> _Found:
        """What the name (`labels`: lowercase, without `shoal`) holds for `qtype`."""
        if not labels:  # the zone's apex
            if qtype == QTYPE.SOA:
                return _Found(answer=[self._soa()])
            if qtype == QTYPE.NS:
                return _Found(answer=[RR(qname, QTYPE.NS, ttl=self.ttl, rdata=NS("ns.shoal."))])
            return _NODATA
        kind, names = labels[-1], labels[:-1]
        if not names:  # service.shoal, node.shoal, addr.shoal: names that only have names below
            return _NODATA if kind in (b"service", b"node", b"addr") else _NXDOMAIN
        try:
            text = [n.decode("ascii") for n in names]
        except UnicodeDecodeError:
            return _NXDOMAIN
        if kind == b"service":
            return self._service(text, qtype, qname)
        if kind == b"node":  # nodes come and go, and change address, with their agents
            address = self.registry.node_address(".".join(text))
            found = _NXDOMAIN if address is None else self._address(address, qtype, qname)
            return replace(found, guard=AGENT_SERVICE)
        if kind == b"addr" and len(text) == 1 and (address := _unhex(text[0])) is not None:
            return self._address(address, qtype, qname)
        return _NXDOMAIN

    def _address(self, address: str, qtype: int, qname: DNSLabel) -> _Found:
        if qtype in (QTYPE.A, _ANY) and address:
            return _Found(answer=[self._a(qname, address)])
        return _NODATA

    def _a(self, name: DNSLabel | str, address: str) -> RR:
        return RR(name, QTYPE.A, ttl=self.ttl, rdata=A(address))

    def _service(self, labels: list[str], qtype: int, qname: DNSLabel) -> _Found:
        match labels:
            case [name] if not name.startswith("_"):
                tag = None
            case [first, second] if first.startswith("_") and second.startswith("_"):  # _NAME._TAG
                name, tag = first[1:], (None if second == "_tcp" else second[1:])
            case [tag, name] if not tag.startswith("_") and not name.startswith("_"):
                pass
            case _:
                return _NXDOMAIN
        endpoints = self.registry.endpoints(name, tag=tag)
        if not endpoints:
            return replace(_NXDOMAIN, guard=name)
        service, order = (name, tag), self._order(endpoints)
        if qtype not in (QTYPE.A, QTYPE.SRV, _ANY):
            return _Found(service=service, order=order, guard=name)
        srv = qtype == QTYPE.SRV
        answer: dict[Hashable, RR] = {}
        extra: dict[str, RR] = {}
        for e in self.registry.ordered(endpoints, _keep):  # no answer (A without addresses): NODATA
            if srv:
                self._srv(qname, e, answer, extra)
            elif e.address and e.address not in answer:
                answer[e.address] = self._a(qname, e.address)
        orders = []
        for _ in range(VARIANTS if len(answer) > 1 else 0):
            ordered = self.registry.ordered(endpoints, self.shuffle)
            orders.append(list(dict.fromkeys(k for e in ordered if (k := _key(e, srv)) in answer)))
        return _Found(
            answer=list(answer.values()),
            extra=list(extra.values()),
            keys=list(answer),
            orders=orders,
            service=service,
            order=order,
            guard=name,
        )

    def _srv(self, qname: DNSLabel, e: Endpoint, answer: dict[Hashable, RR], extra: dict[str, RR]) -> None:
        """The SRV record of endpoint `e` in `answer`, its target's A record in `extra`."""
        if (key := _key(e, True)) is None or key in answer:
            return
        target = key[1]
        srv = SRV(priority=1, weight=1, port=e.port, target=target)
        answer[key] = RR(qname, QTYPE.SRV, ttl=self.ttl, rdata=srv)
        if e.address and target not in extra:
            extra[target] = self._a(target, e.address)


def _key(e: Endpoint, srv: bool) -> Hashable:
    """What tells an endpoint's record from others: its address (A), or its port and SRV
    target: its node's name, or for an endpoint without one its address as Consul spells it."""
    if not srv:
        return e.address or None
    if e.node is not None:
        return e.port, f"{e.node}.node.shoal."
    return (e.port, f"{_hex(e.address)}.addr.shoal.") if e.address else None


def _permuted(rest: bytes, keys: list[Hashable], orders: list[list[Hashable]]) -> tuple[bytes, ...]:
    """`rest`, a packed reply less its id, with its answer records (of `keys`) in each of
    `orders`. Each record's owner is a pointer to the question and an SRV target is never
    compressed, so records move without a byte changed; `rest` alone when they are not so
    (or were truncated away)."""
    if int.from_bytes(rest[4:6], "big") != len(keys):
        return (rest,)
    start = 10
    while rest[start]:  # the question's name: the first in the message, so not compressed
        start += rest[start] + 1
    start += 5
    records, end = {}, start
    for key in keys:
        if rest[end : end + 2] != b"\xc0\x0c":
            return (rest,)
        size = 12 + int.from_bytes(rest[end + 10 : end + 12], "big")
        records[key], end = rest[end : end + size], end + size
    head, tail = rest[:start], rest[end:]
    return tuple(dict.fromkeys(head + b"".join(records[k] for k in order) + tail for order in orders))


def _hex(address: str) -> str:
    """An IPv4 address as 8 hex digits, as Consul names addresses: 10.0.0.1 -> 0a000001."""
    return socket.inet_aton(address).hex()


def _unhex(label: str) -> str | None:
    with contextlib.suppress(ValueError):
        return socket.inet_ntoa(bytes.fromhex(label)) if len(label) == 8 else None
    return None


def failure(query: bytes, rcode: int) -> bytes | None:
    """A reply of `rcode` alone to `query`, with its question when that can be read; None
    when not even its header can be read, or it is a response."""
    if len(query) < _HEADER.size:
        return None
    ident, flags, *_ = _HEADER.unpack_from(query)
    if flags & 0x8000:
        return None
    flags = 0x8000 | (flags & 0x7910) | (rcode & 0xF)  # QR; the opcode, RD and CD asked with
    body = b""
    with contextlib.suppress(Exception):  # malformed: the header alone
        if asked := DNSRecord.parse(query).questions[:1]:
            body = DNSRecord(DNSHeader(), asked).pack()[12:]
    return _HEADER.pack(ident, flags, 1 if body else 0, 0, 0, 0) + body


# --- the server ---------------------------------------------------------------------------------


def _answered(answers: Answers, query: bytes, udp: bool) -> bytes | Forward | None:
    try:
        return answers.answer(query, udp)
    except Exception:  # a bug: the server goes on answering the others
        log.exception("DNS query %r", query[:512])
        return failure(query, RCODE.SERVFAIL)


class _Tcp(asyncio.Protocol):
    """One TCP connection: queries framed by a 2-byte length, several in a row, answered as
    they arrive (forwarded ones when the upstream answers: RFC 7766 allows any order);
    closed when silent for TCP_IDLE seconds, or on a query without a header."""

    def __init__(self, server: DnsServer) -> None:
        self.server = server
        self.loop = asyncio.get_running_loop()
        self.buffer = b""
        self.heard = self.loop.time()
        self.transport: asyncio.Transport  # from connection_made on
        self.idle: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        if len(self.server.clients) >= TCP_CLIENTS:
            transport.close()
            return
        self.server.clients.add(self)
        self.idle = self.loop.call_later(TCP_IDLE, self._silent)

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.clients.discard(self)
        if self.idle is not None:
            self.idle.cancel()

    def _silent(self) -> None:
        if (left := self.heard + TCP_IDLE - self.loop.time()) > 0:
            self.idle = self.loop.call_later(left, self._silent)
        else:
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        self.heard = self.loop.time()
        self.buffer += data
        replies = []
        while len(self.buffer) >= 2 and len(self.buffer) >= 2 + (size := int.from_bytes(self.buffer[:2])):
            query, self.buffer = self.buffer[2 : 2 + size], self.buffer[2 + size :]
            reply = _answered(self.server.answers, query, False)
            if reply is FORWARD:
                self.server.forward(query, self.send, udp=False)
            elif type(reply) is bytes:
                replies.append(len(reply).to_bytes(2, "big") + reply)
            else:  # no header: there is no telling where the next query starts
                self.buffer = b""
                self.transport.close()
        if replies:
            self.send(b"".join(replies), framed=True)

    def send(self, reply: bytes, framed: bool = False) -> None:
        if not self.transport.is_closing():
            self.transport.write(reply if framed else len(reply).to_bytes(2, "big") + reply)

    def pause_writing(self) -> None:  # a client that does not read its answers is not read
        self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.transport.resume_reading()


class DnsServer(asyncio.DatagramProtocol):
    """The DNS server on its sockets, answering UDP queries as they arrive (no task per
    packet); `await close()` stops it."""

    def __init__(self, answers: Answers, upstream: tuple[str, int] | None) -> None:
        self.answers = answers
        self.upstream = upstream
        self._family = socket.getaddrinfo(*upstream, type=socket.SOCK_DGRAM)[0][0] if upstream else 0
        self.port = 0
        self.clients: set[_Tcp] = set()
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.Server | None = None
        self._forwards: set[asyncio.Task[None]] = set()

    async def start(self, udp: socket.socket, tcp: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        self.port = udp.getsockname()[1]
        await loop.create_datagram_endpoint(lambda: self, sock=udp)
        self._tcp = await loop.create_server(lambda: _Tcp(self), sock=tcp)

    async def close(self) -> None:
        assert self._udp is not None and self._tcp is not None, "close() before start()"
        self._udp.close()
        self._tcp.close()
        for task in list(self._forwards):
            task.cancel()
        for client in list(self.clients):
            client.transport.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._tcp.wait_closed(), 2)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._udp = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        reply = _answered(self.answers, data, True)
        if type(reply) is bytes:
            self._udp.sendto(reply, addr)  # type: ignore[union-attr]
        elif reply is FORWARD:
            self.forward(data, lambda reply: self._udp.sendto(reply, addr), udp=True)  # type: ignore[union-attr]

    def error_received(self, exc: Exception) -> None:
        # An ICMP error for an answer to a client that has gone: the client is not waiting.
        log.debug("a UDP answer was not delivered: %r", exc)

    # --- forwarding ---------------------------------------------------------------------------

    def forward(self, query: bytes, send: Callable[[bytes], None], udp: bool) -> None:
        """Ask the upstream, over the transport the query came on, and `send` its answer."""
        if len(self._forwards) >= FORWARDS:
            if (reply := failure(query, RCODE.SERVFAIL)) is not None:
                send(reply)
            return
        task = asyncio.get_running_loop().create_task(self._relay(query, send, udp))
        self._forwards.add(task)
        task.add_done_callback(self._forwards.discard)

    async def _relay(self, query: bytes, send: Callable[[bytes], None], udp: bool) -> None:
        assert self.upstream is not None
        try:
            async with asyncio.timeout(FORWARD_TIMEOUT):
                reply = await (self._upstream_udp(query) if udp else self._upstream_tcp(query))
        except (TimeoutError, OSError, asyncio.IncompleteReadError) as e:
            log.debug("upstream %s:%d gave no answer: %r", *self.upstream, e)
            reply = failure(query, RCODE.SERVFAIL)
        if reply is not None:
            send(reply)

    async def _upstream_udp(self, query: bytes) -> bytes:
        loop = asyncio.get_running_loop()
        with socket.socket(self._family, socket.SOCK_DGRAM) as sock:
            sock.setblocking(False)
            await loop.sock_connect(sock, self.upstream)
            await loop.sock_sendall(sock, query)
            while True:
                answer = await loop.sock_recv(sock, 65_535)
                if answer[:2] == query[:2]:  # another id: a late answer to an earlier query
                    return answer

    async def _upstream_tcp(self, query: bytes) -> bytes:
        assert self.upstream is not None
        reader, writer = await asyncio.open_connection(*self.upstream)
        try:
            writer.write(len(query).to_bytes(2, "big") + query)
            await writer.drain()
            size = int.from_bytes(await reader.readexactly(2), "big")
            return await reader.readexactly(size)
        finally:
            writer.close()


# --- start-up -------------------------------------------------------------------------------------


def _upstream(value: str | None) -> tuple[str, int] | None:
    """ "HOST:PORT" (or "[V6]:PORT", or HOST alone for port 53)."""
    if value is None:
        return None
    host, sep, port = value.rpartition(":")
    if not sep or "]" in port:
        host, port = value, "53"
    return host.strip("[]"), int(port)


def _bind(host: str, port: int) -> tuple[socket.socket, socket.socket]:
    """A UDP and a TCP socket bound to `port` (0: the same free port for both)."""
    family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)[0]
    for _ in range(50):
        udp = socket.socket(family, socket.SOCK_DGRAM)
        tcp = socket.socket(family, socket.SOCK_STREAM)
        try:
            udp.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)  # room for bursts
            udp.bind(address)
            tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            tcp.bind((address[0], udp.getsockname()[1], *address[2:]))
            tcp.listen(128)
        except OSError as e:
            udp.close()
            tcp.close()
            if port:
                raise OSError(
                    e.errno, f"DNS on {host} port {port}: {e.strerror}; set SHOAL_DNS_PORT (0: any free)"
                ) from None
            continue
        udp.setblocking(False)
        tcp.setblocking(False)
        return udp, tcp
    raise OSError(f"no port on {host} was free for both UDP and TCP")


def free_dns_port(host: str = "127.0.0.1", prefer: int = 0) -> int:
    """`prefer` if it is free on both UDP and TCP, else a port that is (for now)."""
    try:
        udp, tcp = _bind(host, prefer)
    except OSError:
        udp, tcp = _bind(host, 0)
    with udp, tcp:
        return udp.getsockname()[1]


async def serve_dns(registry: Registry, settings: MasterSettings) -> DnsServer:
    """Serve `registry` over DNS on UDP and TCP, where `settings` say (dns_host or host,
    dns_port: 0 for any free port, then in `DnsServer.port`)."""
    host = settings.dns_host or settings.host
    upstream = _upstream(settings.dns_upstream)
    ttls = {"ttl": settings.dns_ttl, "negative_ttl": settings.dns_negative_ttl}
    server = DnsServer(Answers(registry, **ttls, forward=upstream is not None), upstream)
    udp, tcp = _bind(host, settings.dns_port)
    await server.start(udp, tcp)
    return server
