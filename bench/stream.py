"""The event stream under load: `--subscribers` clients follow `GET /v1/stream` while the
master makes `--rate` changes a second.

    python bench/stream.py                      # over TLS on loopback
    python bench/stream.py --plain
    python bench/stream.py --identity           # the stream not compressed

A master alone (no agents) on 127.0.0.1, started as `shoal master` is. The changes are what
users make: jobs of `--tasks` tasks submitted and then killed, each pair a job and its tasks
made, then its tasks killed and the job with them (2 x (tasks + 1) changes, so many pairs a
second make `--rate` changes). Nothing places them (no node): the bench measures the stream,
not placement. They come from a niced process of their own, through bench/http_pool.py's
lean client: the changes' load stands for other machines too.

The subscribers, all following every topic from the same moment on with the admin token
(the master's `streams_per_caller` raised to their number), are spread over
`--procs` processes (asyncio and aiohttp), niced: they stand for other machines. They take
the stream deflated, as aiohttp, httpx and browsers ask by default (`--identity`: as sent
to a client that does not). They do not
parse every event: each counts the frames in what it reads (`data:` lines), and reads the
index and the master's time (`at`) of the first and last frame of each read, so the lag
(read time - the time the master made the change, one clock) is sampled at the oldest and
newest event of every read, the worst and the best.

Once the load is over, each subscriber reads on until it has the master's last index (for
`GIVE_UP` seconds at most). `delivered_all`: every subscriber read every index from its
first to the master's last, once (no frame missed, none twice, no `gone`). Prints one JSON line last: tls,
encoding, subscribers, offered_rate (changes a second the load asked for), changes_per_s (made, by
the master's index over the measured seconds), delivered_all, lag_p50_ms, lag_p99_ms,
master_cpu (cores), sub_cpu (the busiest subscriber process's share of a core).
Goals: delivered_all true and lag_p99_ms <= 1000 with 100 subscribers at 5,000 changes a
second. Exits 1 when a subscriber missed events, or a call of the load failed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import resource
import ssl
import sys
import tempfile
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil
from http_pool import Pool, ProtocolError

from shoal.testing.live import LiveCluster

NICE = 10
GIVE_UP = 120.0  # seconds after the load's end a subscriber waits for the last event, at most
# Changes of a pair besides its tasks' kills: the job made, then killed, and an audit record
# of each call. (A job's tasks are pending from the job's own event: they change first when
# killed.)
PAIR = 4


@dataclass(frozen=True, slots=True)
class Follow:
    url: str
    ca: str | None
    token: str
    streams: int
    encoding: str  # what the subscribers accept: "deflate" or "identity"


@dataclass(slots=True)
class Seen:
    """What one subscriber read."""

    first: int = 0
    last: int = 0
    frames: int = 0
    gone: bool = False
    lags: list[float] = field(default_factory=list)  # ms


def _context(ca: str | None) -> ssl.SSLContext | bool:
    return ssl.create_default_context(cafile=ca) if ca else False


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _frame_fields(frame: bytes) -> tuple[int, float]:
    """The index and the master's time of one frame (its data line read as JSON)."""
    data = frame[frame.index(b"data: ") + 6 :]
    fields = json.loads(data[: data.index(b"\n")] if b"\n" in data else data)
    return fields["index"], fields["at"]


async def _subscriber(session: object, follow: Follow, stop_at: Any) -> Seen:
    """Read until the index in `stop_at` (0 until the load is over) is had."""
    seen = Seen()
    headers = {"Authorization": f"Bearer {follow.token}", "Accept-Encoding": follow.encoding}
    async with session.get(f"{follow.url}/v1/stream", headers=headers) as response:  # type: ignore[attr-defined]
        assert response.status == 200, response.status
        assert response.headers.get("Content-Encoding", "identity") == follow.encoding
        pending = b""
        give_up = None
        while not (stop_at.value and seen.last >= stop_at.value):
            if stop_at.value and give_up is None:
                give_up = time.monotonic() + GIVE_UP
            if give_up is not None and time.monotonic() > give_up:
                break
            try:
                chunk = await asyncio.wait_for(response.content.readany(), 1.0)
            except TimeoutError:
                continue
            if not chunk:
                break
            now = time.time()
            pending += chunk
            cut = pending.rfind(b"\n\n")
            if cut < 0:
                continue
            whole, pending = pending[: cut + 2], pending[cut + 2 :]
            if b"event: gone" in whole:
                seen.gone = True
                break
            count = whole.count(b"\ndata: ")  # an event's frame has one data line, a keep-alive none
            if not count:
                continue  # keep-alives only
            first, first_at = _frame_fields(whole[whole.find(b"\ndata: ") :])
            last, last_at = _frame_fields(whole[whole.rfind(b"\ndata: ") :])
            if seen.frames == 0:
                seen.first = first
            seen.frames += count
            seen.last = last
            seen.lags += [(now - first_at) * 1000, (now - last_at) * 1000]
    return seen


async def _follow(follow: Follow, start: float, stop_at: Any) -> tuple[list[Seen], float]:
    """The subscribers of one process: what each read, and the process's share of a core."""
    import aiohttp

    connector = aiohttp.TCPConnector(limit=follow.streams, ssl=_context(follow.ca))
    timeout = aiohttp.ClientTimeout(total=None, sock_read=None)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        await asyncio.sleep(max(0.0, start - time.time()))
        cpu, began = _cpu(), time.monotonic()
        seen = await asyncio.gather(*(_subscriber(session, follow, stop_at) for _ in range(follow.streams)))
        return list(seen), (_cpu() - cpu) / max(1e-9, time.monotonic() - began)


def _follower(follow: Follow, stop_at: Any, pipe: Connection) -> None:
    import aiohttp  # noqa: F401 - loaded before the start is given
    import uvloop

    os.nice(NICE)
    pipe.send("ready")
    start = pipe.recv()
    pipe.send(uvloop.run(_follow(follow, start, stop_at)))


@dataclass(frozen=True, slots=True)
class Load:
    url: str
    ca: str | None
    token: str
    pairs_per_s: float
    tasks: int
    seconds: float


async def _load(load: Load) -> tuple[int, list[str]]:
    """Submit and kill jobs at `pairs_per_s`, open loop; the pairs made and the errors."""
    errors: list[str] = []
    made = 0
    job = {"name": "churn", "command": ["true"], "count": load.tasks, "resources": {"cpus": 0.1, "mem": 16}}
    # As many connections kept as calls in flight: none is made again (a TLS handshake each).
    pool = Pool(load.url, _context(load.ca) or None, size=1024, keep_idle=2.0)
    submission = pool.post("/v1/jobs", load.token, json.dumps(job).encode())

    async def pair() -> None:
        nonlocal made
        try:
            submitted = await pool.call(submission)
            if submitted.status != 201:
                raise ProtocolError(f"submitting answered {submitted.status}: {submitted.body[:200]!r}")
            job_id = json.loads(submitted.body)["id"]
            killed = await pool.call(pool.post(f"/v1/jobs/{job_id}/kill", load.token, b""))
            if killed.status != 200:
                raise ProtocolError(f"killing answered {killed.status}: {killed.body[:200]!r}")
            made += 1
        except (OSError, ProtocolError) as e:
            errors.append(f"{type(e).__name__}: {e}")

    calls: set[asyncio.Task[None]] = set()
    began = time.monotonic()
    n = 0
    while (due := began + n / load.pairs_per_s) < began + load.seconds:
        await asyncio.sleep(max(0.0, due - time.monotonic()))
        call = asyncio.create_task(pair())
        calls.add(call)
        call.add_done_callback(calls.discard)
        n += 1
    if calls:
        await asyncio.wait(calls)
    pool.close()
    return made, errors


def _loader(load: Load, pipe: Connection) -> None:
    import uvloop

    os.nice(NICE)
    pipe.send("ready")
    pipe.recv()
    pipe.send(uvloop.run(_load(load)))


def _last_index(cluster: LiveCluster) -> int:
    """The master's newest index: a stream from now says it first."""
    with httpx.stream(
        "GET",
        f"{cluster.url}/v1/stream",
        headers={"Authorization": f"Bearer {cluster.admin_token}"},
        verify=_context(cluster.ca),
        timeout=30,
    ) as response:
        head = next(response.iter_lines())
    return int(head.removeprefix(": following from "))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subscribers", type=int, default=100)
    parser.add_argument("--rate", type=float, default=5000.0, help="changes a second the load asks for")
    parser.add_argument("--tasks", type=int, default=96, help="tasks of each job submitted and killed")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds of load")
    parser.add_argument("--procs", type=int, default=4, help="subscriber processes")
    parser.add_argument("--plain", action="store_true", help="plain HTTP instead of TLS")
    parser.add_argument("--identity", action="store_true", help="subscribers that take no compression")
    parser.add_argument("--master", action="append", default=[], help="a master setting, KEY=VALUE")
    args = parser.parse_args()
    pairs_per_s = args.rate / (args.tasks + PAIR)
    figures: dict[str, object] = {
        "tls": not args.plain,
        "encoding": "identity" if args.identity else "deflate",
        "subscribers": args.subscribers,
        "offered_rate": args.rate,
    }
    with tempfile.TemporaryDirectory(prefix="shoal-stream-") as root:
        cluster = LiveCluster(
            Path(root),
            agents=0,
            heartbeat_timeout=10,
            heartbeat_interval=1,
            # One token stands for every subscriber, and for the bench's reads of the newest
            # index: its cap of streams is theirs together. It also makes all the changes, as
            # many users would: no cap on its calls a second.
            master_settings={
                "streams_per_caller": str(args.subscribers + 1),
                "rate_limit": "0",
                **dict(pair.split("=", 1) for pair in args.master),
            },
            tls=not args.plain,
        )
        try:
            cluster.start()
            spawn = multiprocessing.get_context("spawn")
            shares = [
                args.subscribers // args.procs + (p < args.subscribers % args.procs)
                for p in range(args.procs)
            ]
            stop_at = spawn.Value("q", 0)  # the index the subscribers read up to: set at the end
            jobs = []
            for streams in filter(None, shares):
                mine, theirs = spawn.Pipe()
                follow = Follow(cluster.url, cluster.ca, cluster.admin_token, streams, figures["encoding"])
                jobs.append((spawn.Process(target=_follower, args=(follow, stop_at, theirs)), mine))
            for process, _ in jobs:
                process.start()
            for _, pipe in jobs:
                pipe.recv()
            start = time.time() + 1.0
            for _, pipe in jobs:
                pipe.send(start)
            time.sleep(max(0.0, start + 0.5 - time.time()))  # the subscribers are in
            print(
                f"{args.subscribers} subscribers; {args.rate:g} changes/s for {args.duration:g}s",
                file=sys.stderr,
            )
            master = psutil.Process(cluster.master.pid)  # type: ignore[union-attr]
            cpu = sum(master.cpu_times()[:2])
            first = _last_index(cluster)
            load = Load(cluster.url, cluster.ca, cluster.admin_token, pairs_per_s, args.tasks, args.duration)
            mine, theirs = spawn.Pipe()
            loader = spawn.Process(target=_loader, args=(load, theirs))
            loader.start()
            mine.recv()  # ready
            began = time.monotonic()
            mine.send("go")
            made, errors = mine.recv()
            took = time.monotonic() - began
            loader.join(30)
            last = _last_index(cluster)
            stop_at.value = last
            master_cpu = (sum(master.cpu_times()[:2]) - cpu) / took
            results = [pipe.recv() for _, pipe in jobs]
            for process, _ in jobs:
                process.join(30)
        finally:
            cluster.stop()
    seen = [s for subscribers, _ in results for s in subscribers]
    complete = [
        not s.gone
        and s.frames > 0
        and s.first <= first + 1
        and s.last >= last
        and s.frames == s.last - s.first + 1
        for s in seen
    ]
    lags = np.array([x for s in seen for x in s.lags] or [np.nan])
    figures.update(
        changes_per_s=round((last - first) / took, 1),
        changes=last - first,
        took=round(took, 2),
        pairs=made,
        delivered_all=all(complete) and len(seen) == args.subscribers,
        lag_p50_ms=round(float(np.percentile(lags, 50)), 1),
        lag_p99_ms=round(float(np.percentile(lags, 99)), 1),
        master_cpu=round(master_cpu, 2),
        sub_cpu=round(max(share for _, share in results), 2),
    )
    print(json.dumps(figures))
    if errors or not figures["delivered_all"]:
        missed = [(s.first, s.last, s.frames, s.gone) for s, ok in zip(seen, complete, strict=True) if not ok]
        print(
            f"load errors: {errors[:5]}; subscribers short (first, last, frames, gone): {missed[:5]}",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
