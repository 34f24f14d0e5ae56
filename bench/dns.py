"""DNS: queries per second and latency of the master's DNS server, measured with dnsperf.

    python bench/dns.py
    python bench/dns.py --services 100 --endpoints 10 --duration 15 --rate 10000

A live master and `--agents` agents on 127.0.0.1; `--services` services of `--endpoints`
endpoints each, registered over the API (`Client.register`, tag `v1`, addresses and ports
of their own); a steady job load on the master meanwhile: a thread submits `--job-rate`
one-task jobs (`true`) a second, which the agents run. Then dnsperf (Debian package), a
process of its own, queries the master's DNS port over UDP (`--tcp`: TCP) from a file that
mixes A and SRV questions: NAME.service.shoal A and SRV, _NAME._tcp.service.shoal SRV,
v1.NAME.service.shoal A, NODE.node.shoal A. With EDNS0 (as resolvers ask; `--no-edns`:
without), SRV answers carry their targets' A records.

Two runs of `--duration` seconds each, after a short warm-up:
- flat out: `--clients` clients with at most `--outstanding` queries in flight; `qps` is what
  dnsperf reports (completed queries over its run time);
- at a steady `--rate` (dnsperf -Q), with every query's latency (dnsperf -v prints each
  one): `p50_ms`, `p99_ms`, `p999_ms` and `max_ms` are exact percentiles of all of them
  (nearest rank: the value below which that share of the sorted latencies lies); `rate_qps`
  is what that run achieved.

Prints one JSON line last: qps, p99_ms, p50_ms, lost (queries dnsperf lost, both runs),
services, endpoints, and the rest named above, with `goal_met` (qps >= 10,000 and p99_ms
<= 5 at 10,000 a second) and `reference` (null: no other DNS server is measured here).
Exits 1 when dnsperf fails, loses more than 1% of the queries or gets any answer but
NOERROR, or when the master serves no DNS.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from dnslib import QTYPE, RCODE, DNSRecord

from shoal.client import Client
from shoal.model import JobSpec, JobState, Resources
from shoal.services import Registration
from shoal.testing.live import LiveCluster, live_cluster

GOAL_QPS, GOAL_P99_MS = 10_000, 5.0
TINY = Resources(cpus=0.01, mem=16)


class Failed(Exception):
    """The run did not measure what it should have."""


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --- the cluster ----------------------------------------------------------------------------


def wait_for_dns(port: int, name: str, timeout: float = 20.0) -> list[str]:
    """The master's A records for `name`, once it has some (dnslib here: this file's name
    hides dnspython's package `dns`)."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            reply = DNSRecord.parse(DNSRecord.question(name).send("127.0.0.1", port, timeout=0.5))
            if reply.header.rcode == RCODE.NOERROR and reply.rr:
                return [str(r.rdata) for r in reply.rr if r.rtype == QTYPE.A]
            last = RCODE.get(reply.header.rcode)
        except OSError as e:
            last = repr(e)
        time.sleep(0.1)
    raise Failed(f"the master's DNS on port {port} gave no answer for {name} in {timeout:g}s ({last})")


def register(client: Client, services: int, endpoints: int) -> None:
    for s in range(services):
        for e in range(endpoints):
            client.register(
                Registration(
                    id=f"svc{s}-{e}",
                    name=f"svc{s}",
                    address=f"10.{100 + s // 256}.{s % 256}.{e + 1}",
                    port=20_000 + e,
                    tags=["v1"],
                    ttl=86_400,
                )
            )


@dataclass
class JobLoad:
    """One-task jobs submitted at `rate` a second from a thread of their own."""

    cluster: LiveCluster
    rate: float
    submitted: list[int] = field(default_factory=list)
    errors: int = 0
    seconds: float = 0.0  # how long it ran
    stop: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        if self.rate <= 0:
            return
        spec = JobSpec(command="true", resources=TINY)
        with self.cluster.client() as client:
            began = time.monotonic()
            while not self.stop.is_set():
                try:
                    self.submitted.append(client.submit(spec))
                except Exception:  # counted, and the load goes on
                    self.errors += 1
                due = began + (len(self.submitted) + self.errors) / self.rate
                self.stop.wait(max(0.0, due - time.monotonic()))
                self.seconds = time.monotonic() - began

    def finished(self) -> int:
        with self.cluster.client() as client:
            ended = {j.id: j.state for j in client.jobs()}
        return sum(1 for j in self.submitted if ended.get(j) is JobState.COMPLETE)


# --- dnsperf --------------------------------------------------------------------------------


def query_file(path: Path, services: int, agents: int) -> Path:
    lines = []
    for s in range(services):
        name = f"svc{s}.service.shoal"
        lines += [f"{name} A", f"{name} SRV", f"_svc{s}._tcp.service.shoal SRV", f"v1.{name} A"]
    lines += [f"node{i}.node.shoal A" for i in range(1, agents + 1)]
    path.write_text("\n".join(lines) + "\n")
    return path


@dataclass
class Run:
    sent: int
    completed: int
    lost: int
    qps: float
    rcodes: dict[str, int]
    latencies: list[float]  # seconds, of every query when run with -v

    def percentile(self, share: float) -> float:
        """The nearest-rank percentile, in ms: the smallest latency with at least `share`
        of all at or below it."""
        ordered = sorted(self.latencies)
        return 1000 * ordered[max(0, math.ceil(share * len(ordered)) - 1)]


def dnsperf(port: int, queries: Path, seconds: float, args: argparse.Namespace, rate: int = 0) -> Run:
    command = ["dnsperf", "-s", "127.0.0.1", "-p", str(port), "-d", str(queries), "-l", str(seconds)]
    command += ["-c", str(args.clients), "-q", str(args.outstanding), "-t", "2"]
    command += ["-m", "tcp"] if args.tcp else []
    command += [] if args.no_edns else ["-e"]
    command += ["-Q", str(rate), "-v"] if rate else []
    done = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 60)
    if done.returncode != 0:
        raise Failed(f"{' '.join(command)} exited with {done.returncode}: {done.stderr.strip()[-500:]}")
    return parse(done.stdout)


def parse(output: str) -> Run:
    def number(label: str) -> float:
        found = re.search(rf"^\s*{label}:\s+([\d.]+)", output, re.MULTILINE)
        if found is None:
            raise Failed(f"no {label!r} in dnsperf's output:\n{output[-2000:]}")
        return float(found.group(1))

    codes = re.search(r"^\s*Response codes:\s+(.*)$", output, re.MULTILINE)
    rcodes = {c: int(n) for c, n in re.findall(r"(\w+) (\d+) \(", codes.group(1))} if codes else {}
    latencies = [float(line.rsplit(None, 1)[1]) for line in output.splitlines() if line.startswith("> ")]
    return Run(
        sent=int(number("Queries sent")),
        completed=int(number("Queries completed")),
        lost=int(number("Queries lost")),
        qps=number("Queries per second"),
        rcodes=rcodes,
        latencies=latencies,
    )


# --- the bench ------------------------------------------------------------------------------


def measure(cluster: LiveCluster, args: argparse.Namespace, root: Path) -> dict[str, object]:
    port = cluster.dns_port
    wait_for_dns(port, "shoal-agent.service.shoal")
    say(f"registering {args.services} services of {args.endpoints} endpoints over the API")
    began = time.monotonic()
    with cluster.client() as client:
        register(client, args.services, args.endpoints)
    say(f"  {args.services * args.endpoints} registrations in {time.monotonic() - began:.1f}s")
    addresses = wait_for_dns(port, f"svc{args.services - 1}.service.shoal")
    if len(addresses) != args.endpoints:
        raise Failed(f"svc{args.services - 1} has {len(addresses)} addresses, not {args.endpoints}")
    queries = query_file(root / "queries.txt", args.services, args.agents)
    load = JobLoad(cluster, args.job_rate)
    load.thread.start()
    try:
        say(f"job load: {args.job_rate:g} jobs/s; warming up")
        dnsperf(port, queries, 2, args)
        say(f"flat out for {args.duration:g}s ({args.clients} clients, {args.outstanding} in flight)")
        flat = dnsperf(port, queries, args.duration, args)
        say(f"  {flat.qps:,.0f} queries/s, {flat.lost} lost")
        say(f"at {args.rate:,} queries/s for {args.duration:g}s, every latency recorded")
        steady = dnsperf(port, queries, args.duration, args, rate=args.rate)
        say(f"  p50 {steady.percentile(0.5):.3f} ms, p99 {steady.percentile(0.99):.3f} ms")
    finally:
        load.stop.set()
        load.thread.join(10)
    finished = load.finished()
    runs = (flat, steady)
    lost, sent = sum(r.lost for r in runs), sum(r.sent for r in runs)
    wrong = {c: n for r in runs for c, n in r.rcodes.items() if c != "NOERROR"}
    p99 = steady.percentile(0.99)
    figures = {
        "qps": round(flat.qps),
        "p99_ms": round(p99, 3),
        "p50_ms": round(steady.percentile(0.5), 3),
        "lost": lost,
        "services": args.services,
        "endpoints": args.services * args.endpoints,
        "p999_ms": round(steady.percentile(0.999), 3),
        "max_ms": round(steady.percentile(1.0), 3),
        "rate": args.rate,
        "rate_qps": round(steady.qps),
        "lost_share": round(lost / max(sent, 1), 5),
        "not_noerror": wrong,
        "transport": "tcp" if args.tcp else "udp",
        "edns": not args.no_edns,
        "jobs_submitted": len(load.submitted),
        "jobs_finished": finished,
        "job_errors": load.errors,
        "jobs_per_s": round(len(load.submitted) / max(load.seconds, 1e-9), 1),
        "goal_met": flat.qps >= GOAL_QPS and p99 <= GOAL_P99_MS and args.rate >= GOAL_QPS,
        "reference": None,
    }
    if lost > 0.01 * sent:
        raise Failed(f"dnsperf lost {lost} of {sent} queries: {json.dumps(figures)}")
    if wrong:
        raise Failed(f"answers other than NOERROR: {wrong}: {json.dumps(figures)}")
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--services", type=int, default=100)
    parser.add_argument("--endpoints", type=int, default=10, help="endpoints of each service")
    parser.add_argument("--agents", type=int, default=2)
    parser.add_argument("--duration", type=float, default=15.0, help="seconds of each dnsperf run")
    parser.add_argument("--rate", type=int, default=GOAL_QPS, help="queries a second of the latency run")
    parser.add_argument("--clients", type=int, default=4, help="dnsperf's clients (sockets)")
    parser.add_argument("--outstanding", type=int, default=64, help="dnsperf's queries in flight, at most")
    parser.add_argument("--job-rate", type=float, default=5.0, help="one-task jobs submitted a second")
    parser.add_argument("--tcp", action="store_true", help="query over TCP")
    parser.add_argument("--no-edns", action="store_true", help="queries without an EDNS0 record")
    args = parser.parse_args()
    if shutil.which("dnsperf") is None:
        say("dnsperf is not installed: apt-get install dnsperf (make test installs it)")
        return 1
    with tempfile.TemporaryDirectory(prefix="bench-dns-") as tmp:
        root = Path(tmp)
        say(f"starting a master and {args.agents} agents")
        try:
            with live_cluster(root / "cluster", agents=args.agents, heartbeat_timeout=10) as cluster:
                say(f"the master's DNS: 127.0.0.1 port {cluster.dns_port}")
                figures = measure(cluster, args, root)
        except Failed as e:
            say(f"failed: {e}")
            return 1
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
