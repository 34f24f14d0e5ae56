"""Blocking queries at scale: many watchers of one service, woken by its changes only.

    python bench/watch.py --watchers 1000

On a fresh live cluster (a master and one agent on 127.0.0.1):

1. `--watchers` blocking queries on service `a` (`GET /v1/services/a?index=N&wait=...`, N
   its current index), all at once, each on a connection of its own. They are sent by
   `--procs` processes, each an asyncio loop with httpx.AsyncClients whose connection limits
   are raised to hold `--per-client` connections each. Why not one client, one process:
   httpcore's pool looks at every connection it holds, for each idle one, whenever a
   request ends, so one pool of a thousand connections spends seconds of CPU as the answers
   come; and even in small pools httpx reads an answer in about a millisecond of CPU, so a
   thousand answers read by one process take a second of its time, whatever the master
   does. `--raw` takes httpx out: each query is written by hand on its own socket, and its
   answer timed at its first bytes (the master's own latency). Once every request is sent
   and `--settle` seconds have passed, all are parked.
2. Service `b` changes (an external endpoint registered). For `--quiet` seconds no watcher
   of `a` may answer: one answering then, before its wait is over, was woken by another
   service's change (`woken_other`; `woken_other_changed` of them with a changed index).
3. Service `a` changes (an external endpoint registered). Each watcher's latency runs from
   the moment the change is sent (its PUT, before the master has even read it: the
   strictest origin) to the moment its answer, with the new index, has been read
   (`time.monotonic`, one clock for every process). `ack_ms` is the PUT's round trip;
   `master_cpu_ms` the CPU the master spent from the change until the last answer was
   read (what the master's side costs, apart from the watchers' own reading).

The watchers wait `--wait` seconds, longer than the whole run: no answer is a wait that ran
out. Prints one JSON line last: watchers, procs, client (httpx or raw), answered, failed,
early (answers before anything changed), woken_other, woken_other_changed, p50_ms, p99_ms,
max_ms, ack_ms, master_cpu_ms, wait_s. Goal: p99_ms <= 1000 and woken_other == 0. Exits 1,
saying why, if any watcher failed, answered before a's change, or did not answer within
`--deadline` seconds of it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import os
import resource
import sys
import tempfile
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import httpx
import psutil
from rich.progress import Progress

from shoal.testing.live import LiveCluster, live_cluster

INDEX = "X-Shoal-Index"


@dataclass(slots=True)
class Answer:
    at: float = 0.0  # time.monotonic() once read; 0: not yet
    index: int = 0
    error: str = ""


@dataclass(frozen=True, slots=True)
class Share:
    """What one process watches: `count` queries past `index`, in pools of `per_client`."""

    url: str
    token: str
    index: int
    count: int
    wait: float
    per_client: int
    raw: bool


# --- a watching process -------------------------------------------------------------------


class Watchers:
    """`count` blocking queries on service `a`, each answer timed as it is read."""

    def __init__(self, share: Share) -> None:
        self.share = share
        self.answers = [Answer() for _ in range(share.count)]
        self.sent = 0
        self.tasks: list[asyncio.Task[None]] = []
        self.transports: list[asyncio.BaseTransport] = []

    async def start(self, stack: contextlib.AsyncExitStack) -> None:
        if self.share.raw:
            await self._start_raw()
            return
        per = max(1, self.share.per_client)
        limits = httpx.Limits(max_connections=per + 4, max_keepalive_connections=per + 4)
        timeout = httpx.Timeout(self.share.wait + 30.0, connect=30.0, pool=30.0)
        headers = {"Authorization": f"Bearer {self.share.token}"}
        clients = [
            await stack.enter_async_context(
                httpx.AsyncClient(
                    base_url=self.share.url, headers=headers, limits=limits, timeout=timeout, verify=False
                )  # plain http: no CA bundle loaded per client
            )
            for _ in range(-(-self.share.count // per))
        ]
        self.tasks = [
            asyncio.create_task(self._one(clients[i // per], a)) for i, a in enumerate(self.answers)
        ]

    async def _traced(self, event: str, info: dict[str, Any]) -> None:
        if event == "http11.send_request_body.complete":
            self.sent += 1

    async def _one(self, http: httpx.AsyncClient, answer: Answer) -> None:
        params = {"index": str(self.share.index), "wait": f"{self.share.wait:g}s"}
        try:
            response = await http.get("/v1/services/a", params=params, extensions={"trace": self._traced})
            answer.at = time.monotonic()
            if response.status_code != 200:
                answer.error = f"HTTP {response.status_code}: {response.text[:200]}"
            answer.index = int(response.headers.get(INDEX, 0))
        except httpx.HTTPError as e:
            answer.at = time.monotonic()
            answer.error = f"{type(e).__name__}: {e}"

    async def _start_raw(self) -> None:
        host, port = self.share.url.removeprefix("http://").rsplit(":", 1)
        request = (
            f"GET /v1/services/a?index={self.share.index}&wait={self.share.wait:g}s HTTP/1.1\r\n"
            f"Host: {host}\r\nAuthorization: Bearer {self.share.token}\r\n\r\n"
        ).encode()
        loop = asyncio.get_running_loop()
        for answer in self.answers:
            transport, _ = await loop.create_connection(
                lambda a=answer: _Raw(self, request, a), host, int(port)
            )
            self.transports.append(transport)

    def stop(self) -> list[asyncio.Task[None]]:
        for transport in self.transports:
            transport.close()
        for task in self.tasks:
            task.cancel()
        return self.tasks

    def answered(self) -> int:
        return sum(1 for a in self.answers if a.at)


class _Raw(asyncio.Protocol):
    """One blocking query written by hand, its answer timed at its first bytes: the master's
    own latency, with no HTTP client's CPU in it (`--raw`)."""

    def __init__(self, watchers: Watchers, request: bytes, answer: Answer) -> None:
        self.watchers, self.request, self.answer, self.head = watchers, request, answer, b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.write(self.request)  # type: ignore[attr-defined]
        self.watchers.sent += 1

    def data_received(self, data: bytes) -> None:
        if not self.answer.at:
            self.answer.at = time.monotonic()
        self.head += data
        head, sep, _ = self.head.partition(b"\r\n\r\n")
        if sep and not self.answer.index and not self.answer.error:
            status, *lines = head.decode("latin-1").split("\r\n")
            fields = dict(line.lower().split(": ", 1) for line in lines if ": " in line)
            self.answer.index = int(fields.get(INDEX.lower(), 0))
            if status.split(" ")[1] != "200":
                self.answer.error = status

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.answer.at:
            self.answer.at = time.monotonic()
            self.answer.error = f"connection lost before an answer: {exc}"


def watch(conn: Connection, share: Share) -> None:
    """A process's watchers: says ("sent", n) as requests go out, stops once every one has
    answered or at the time the parent sends, then sends ("answers", [(at, index, error)])."""
    asyncio.run(_watch(conn, share))


async def _watch(conn: Connection, share: Share) -> None:
    async with contextlib.AsyncExitStack() as stack:
        watchers = Watchers(share)
        starting = asyncio.create_task(watchers.start(stack))
        told, stop_at = -1, None
        while watchers.answered() < share.count and (stop_at is None or time.monotonic() < stop_at):
            if watchers.sent != told:
                told = watchers.sent
                conn.send(("sent", told))
            while conn.poll():
                stop_at = conn.recv()
            await asyncio.sleep(0.02)
        await starting
        await asyncio.gather(*watchers.stop(), return_exceptions=True)
    conn.send(("answers", [(a.at, a.index, a.error) for a in watchers.answers]))


# --- the run ------------------------------------------------------------------------------


def register(http: httpx.Client, rid: str, service: str, port: int) -> None:
    body = {"id": rid, "name": service, "address": "10.0.0.1", "port": port, "ttl": 600}
    http.put("/v1/services/register", json=body).raise_for_status()


def percentile(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(len(ordered) * pct / 100))], 1) if ordered else -1.0


def _sent(conns: list[Connection], counts: list[int]) -> None:
    for i, conn in enumerate(conns):
        while conn.poll():
            kind, value = conn.recv()
            if kind == "sent":
                counts[i] = value


def measure(cluster: LiveCluster, args: argparse.Namespace, progress: Progress) -> dict[str, Any]:
    url, token = cluster.url, cluster.admin_token
    assert cluster.master is not None
    master = psutil.Process(cluster.master.pid)
    procs = max(1, min(args.procs, args.watchers))
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}) as changer:
        register(changer, "a-0", "a", 1)
        register(changer, "b-0", "b", 1)
        index = int(changer.get("/v1/services/a").headers[INDEX])
        spawn = multiprocessing.get_context("spawn")
        conns, workers = [], []
        for i in range(procs):
            count = args.watchers // procs + (i < args.watchers % procs)
            mine, theirs = spawn.Pipe()
            share = Share(url, token, index, count, args.wait, args.per_client, args.raw)
            workers.append(spawn.Process(target=watch, args=(theirs, share), daemon=True))
            workers[-1].start()
            conns.append(mine)
        began = time.monotonic()
        bar = progress.add_task(f"watchers sent ({procs} processes)", total=args.watchers)
        counts = [0] * procs
        while sum(counts) < args.watchers and time.monotonic() - began < args.wait / 2:
            _sent(conns, counts)
            progress.update(bar, completed=sum(counts))
            time.sleep(0.05)
        if (parked := sum(counts)) < args.watchers:
            raise SystemExit(
                f"watch: only {parked} of {args.watchers} watchers were sent within {args.wait / 2:g}s;"
                " give fewer --watchers, or a longer --wait"
            )
        time.sleep(args.settle)

        progress.console.print(f"{parked} watchers parked; changing b")
        changed_b = time.monotonic()
        register(changer, "b-1", "b", 2)
        time.sleep(args.quiet)
        progress.console.print("changing a")
        cpu = master.cpu_times()
        sent = time.monotonic()
        register(changer, "a-1", "a", 2)
        ack_ms = (time.monotonic() - sent) * 1000
        if time.monotonic() - began > args.wait - 1:
            progress.console.print("[yellow]the run took nearly the whole wait: raise --wait[/]")
        answers: list[Answer] = []
        for conn in conns:
            with contextlib.suppress(OSError):  # a process whose watchers all answered is gone
                conn.send(sent + args.deadline)
        for conn in conns:
            while (message := conn.recv())[0] != "answers":
                pass
            answers.extend(Answer(*a) for a in message[1])
        spent = master.cpu_times()
        for worker in workers:
            worker.join(10)

    ok = [a for a in answers if a.at and not a.error]
    woken = [a for a in ok if changed_b <= a.at < sent]
    latencies = [(a.at - sent) * 1000 for a in ok if a.at >= sent and a.index > index]
    failures = [a.error for a in answers if a.error]
    return {
        "watchers": args.watchers,
        "procs": procs,
        "client": "raw" if args.raw else "httpx",
        "answered": len(latencies),
        "failed": len(failures),
        "early": sum(1 for a in ok if a.at < changed_b),
        "woken_other": len(woken),
        "woken_other_changed": sum(1 for a in woken if a.index != index),
        "p50_ms": percentile(latencies, 50),
        "p99_ms": percentile(latencies, 99),
        "max_ms": round(max(latencies), 1) if latencies else -1.0,
        "ack_ms": round(ack_ms, 1),
        "master_cpu_ms": round((spent.user + spent.system - cpu.user - cpu.system) * 1000),
        "wait_s": args.wait,
        "_errors": failures[:3],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--watchers", type=int, default=1000)
    parser.add_argument(
        "--procs", type=int, default=os.cpu_count() or 1, help="processes sending them (default: cores)"
    )
    parser.add_argument("--per-client", type=int, default=10, help="connections each httpx client holds")
    parser.add_argument(
        "--raw", action="store_true", help="hand-written queries timed at their first bytes, not httpx"
    )
    parser.add_argument("--wait", type=float, default=30.0, help="seconds each blocking query may wait")
    parser.add_argument("--settle", type=float, default=2.0, help="seconds after the last request is sent")
    parser.add_argument("--quiet", type=float, default=3.0, help="seconds watched after b changes")
    parser.add_argument(
        "--deadline", type=float, default=10.0, help="seconds for every answer after a changes"
    )
    args = parser.parse_args()
    # Every watcher is a socket here and one in the master, which inherits this limit.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < (want := 2 * args.watchers + 256):
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(want, hard), hard))
    with (
        tempfile.TemporaryDirectory(prefix="bench-watch-") as root,
        Progress(transient=True) as progress,
        # One token stands for every watcher here: the master's limit per caller would take
        # a thousand watchers for one client calling a thousand times at once.
        live_cluster(Path(root) / "cluster", agents=1, master_settings={"rate_limit": "0"}) as cluster,
    ):
        figures = measure(cluster, args, progress)
    errors = figures.pop("_errors")
    problems = []
    if figures["failed"]:
        problems.append(f"{figures['failed']} watchers failed, e.g. {errors}")
    if figures["early"]:
        problems.append(f"{figures['early']} watchers answered before anything changed")
    if figures["woken_other"]:
        problems.append(f"{figures['woken_other']} watchers of a answered when b changed")
    answered = figures["answered"] + figures["failed"] + figures["early"] + figures["woken_other"]
    if silent := args.watchers - answered:
        problems.append(f"{silent} watchers did not answer with a's new index within {args.deadline:g}s")
    for problem in problems:
        print(f"watch: {problem}", file=sys.stderr)
    print(json.dumps(figures))
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
