"""The API under a thousand clients, then under the same with one more flooding it.

    python bench/api_load.py                 # over TLS on loopback
    python bench/api_load.py --plain         # plain HTTP
    python bench/api_load.py --wrk           # and wrk -c100 -d10s on GET /v1/jobs?limit=20

A master alone (no agents) on 127.0.0.1, started as `shoal master` is, with its default
limits (`--master KEY=VALUE` sets others). `--clients` clients, each with a token of its
own, belong to `--users` users (a user's tokens see the same jobs). Each client calls about
`--rate` times a second as a Poisson process, open loop: a call is due at its time whatever
the others do, and its latency counts from that time, so a master that falls behind is
charged for the queue it builds (no coordinated omission). The calls are a mix (`--mix`):

- submit: `POST /v1/jobs`, a one-task job of `true`. No agent ever takes it: it waits,
  as work on a full cluster does, and the bench measures the API, not placement and
  launching (bench/e2e.py does), which here would fight the master for the same cores.
- list: `GET /v1/jobs?limit=20`, the newest twenty of the client's user's jobs.
- view: `GET /v1/jobs/{id}`, one of the user's jobs (each client submits one first).

Two phases of `--duration` seconds, measured after `--warmup` seconds each: calm, then the
same load while one more client with a token of its own floods `GET /v1/jobs?limit=20`
from `--flood-conns` keep-alive connections in a closed loop (a call as soon as the last is
answered). The load comes from `--procs` processes apart from the master, each an asyncio
loop on uvloop with one pool of keep-alive connections (bench/http_pool.py: a lean client, as
each call's CPU on the client is taken from the master); the flooder is a process of its own.
They stand for other machines, so they run niced: the master has the cores first. Each reports
its CPU time and how late it sent its calls (`gen_cpu`, the busiest one's share of a core,
and `gen_lag_p99_ms`): a generator near a whole core, or late, is the bottleneck, not the
master. `load` is the machine's load average before the run: the master shares its cores
with whatever else runs.

Prints one JSON line last: tls, clients, load, offered_rps, achieved_rps, error_rate (non-2xx
answers and transport errors over all calls, the flooder's left out), p50_ms, p99_ms,
master_cpu (cores, over the phase), gen_cpu, gen_lag_p99_ms; the same for the flood phase
as flood_*; flood_p99_ratio (flood_p99_ms / p99_ms), flood_429s and flood_ok (the
flooder's answers), and with `--wrk` wrk_rps, wrk_p99_ms, wrk_non2xx. Goals: error_rate 0,
p99_ms <= 200, flood_p99_ratio <= 2, flood_429s > 0. Exits 1, saying why, when a client
other than the flooder got an error or the master stopped.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import random
import re
import resource
import shutil
import ssl
import subprocess
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

from shoal.config import MasterSettings
from shoal.master.buckets import Bucket
from shoal.testing.live import LiveCluster

JOB = {"name": "load", "command": ["true"], "resources": {"cpus": 0.1, "mem": 16}}
SUBMISSION = json.dumps(JOB).encode()
LIST = "/v1/jobs?limit=20"
POOL = 256  # connections a generator process keeps at most
KEEP_IDLE = 2.0  # seconds a generator keeps an idle connection (the master's idle_timeout is longer)
CALL_TIMEOUT = 30.0  # seconds before a call counts as failed
# The clients stand for other machines: on this one they yield the cores to the master.
NICE = 10


@dataclass(frozen=True, slots=True)
class Share:
    """What one generator process sends: calls of `tokens` (client i is of user `users[i]`)."""

    url: str
    ca: str | None
    tokens: list[str]
    users: list[int]
    jobs: dict[int, list[int]]  # user -> ids of its jobs
    rate: float  # calls a second, all of this share's clients together
    mix: dict[str, float]
    warmup: float
    duration: float
    seed: int


@dataclass(slots=True)
class Outcome:
    """What one generator process saw over the measured part of its phase."""

    latencies: list[float] = field(default_factory=list)  # ms, answered 2xx
    errors: dict[str, int] = field(default_factory=dict)  # what went wrong -> how often
    offered: int = 0
    lags: list[float] = field(default_factory=list)  # ms each call left after its due time
    cpu: float = 0.0  # seconds of CPU the process used in the phase
    wall: float = 0.0


def _context(ca: str | None) -> ssl.SSLContext | bool:
    return ssl.create_default_context(cafile=ca) if ca else False


def _failed(outcome: Outcome, what: str) -> None:
    outcome.errors[what] = outcome.errors.get(what, 0) + 1


def _cpu_now() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# --- a generating process -----------------------------------------------------------------


class Generator:
    """The calls of one share: due times drawn ahead, each call sent as a task of its own."""

    def __init__(self, share: Share) -> None:
        self.share = share
        self.outcome = Outcome()
        self.measured_from = 0.0  # the loop time measuring starts at
        self.rng = random.Random(share.seed)

    async def run(self, start: float) -> Outcome:
        """Send the calls from `start` (time.monotonic(), the same clock in every process)."""
        share, outcome = self.share, self.outcome
        ops, weights = list(share.mix), list(share.mix.values())
        pool = Pool(share.url, _context(share.ca) or None, POOL, KEEP_IDLE)
        due = start
        self.measured_from = start + share.warmup
        end = self.measured_from + share.duration
        cpu = None
        calls: set[asyncio.Task[None]] = set()
        while (due := due + self.rng.expovariate(share.rate)) < end:
            if (wait := due - time.monotonic()) > 0:
                await asyncio.sleep(wait)
            if due >= self.measured_from:
                cpu = _cpu_now() if cpu is None else cpu
                outcome.offered += 1
                outcome.lags.append(max(0.0, time.monotonic() - due) * 1000)
            client = self.rng.randrange(len(share.tokens))
            op = self.rng.choices(ops, weights)[0]
            call = asyncio.create_task(self._call(pool, client, op, due))
            calls.add(call)
            call.add_done_callback(calls.discard)
        if calls:
            await asyncio.wait(calls, timeout=CALL_TIMEOUT)
        outcome.cpu = _cpu_now() - (cpu or _cpu_now())
        outcome.wall = max(1e-9, time.monotonic() - self.measured_from)
        pool.close()
        return outcome

    async def _call(self, pool: Pool, client: int, op: str, due: float) -> None:
        share = self.share
        measured = due >= self.measured_from
        mine = share.jobs[share.users[client]]
        token = share.tokens[client]
        if op == "submit":
            request = pool.post("/v1/jobs", token, SUBMISSION)
        elif op == "list":
            request = pool.get(LIST, token)
        else:
            request = pool.get(f"/v1/jobs/{self.rng.choice(mine)}", token)
        try:
            async with asyncio.timeout(CALL_TIMEOUT):
                answer = await pool.call(request)
        except (OSError, ProtocolError, TimeoutError) as e:
            if measured:
                _failed(self.outcome, type(e).__name__)
            return
        if answer.status == 201 and op == "submit":
            mine.append(json.loads(answer.body)["id"])
        if not measured:
            return
        if 200 <= answer.status < 300:
            self.outcome.latencies.append((time.monotonic() - due) * 1000)
        else:
            _failed(self.outcome, f"HTTP {answer.status} on {op}")


def _generator(share: Share, pipe: Connection) -> None:
    import uvloop

    os.nice(NICE)
    pipe.send("ready")
    pipe.send(uvloop.run(Generator(share).run(pipe.recv())))


@dataclass(frozen=True, slots=True)
class Flood:
    url: str
    ca: str | None
    token: str
    connections: int
    seconds: float


async def _flood(flood: Flood, start: float) -> dict[str, float]:
    counts: dict[str, float] = {"ok": 0, "429": 0, "other": 0}
    pool = Pool(flood.url, _context(flood.ca) or None, flood.connections, KEEP_IDLE)
    request = pool.get(LIST, flood.token)
    end = start + flood.seconds
    await asyncio.sleep(max(0.0, start - time.monotonic()))
    began = _cpu_now()

    async def hammer() -> None:
        while time.monotonic() < end:
            try:
                async with asyncio.timeout(CALL_TIMEOUT):
                    status = (await pool.call(request)).status
                key = "ok" if status == 200 else "429" if status == 429 else "other"
            except (OSError, ProtocolError, TimeoutError):
                key = "other"
            counts[key] += 1

    await asyncio.gather(*(hammer() for _ in range(flood.connections)))
    pool.close()
    counts["cpu"] = _cpu_now() - began
    return counts


def _flooder(flood: Flood, pipe: Connection) -> None:
    import uvloop

    os.nice(NICE)
    pipe.send("ready")
    pipe.send(uvloop.run(_flood(flood, pipe.recv())))


# --- the run ------------------------------------------------------------------------------


def _settings(pairs: list[str]) -> dict[str, str]:
    return dict(pair.split("=", 1) for pair in pairs)


def _tokens(cluster: LiveCluster, names: list[str], policy: MasterSettings, ca: str | None) -> list[str]:
    """A token for each of `names`, made through the API at the pace the master allows."""
    pace = Bucket.full(policy.rate_limit * 0.9, policy.rate_burst * 0.9, time.monotonic())
    made = []
    headers = {"Authorization": f"Bearer {cluster.admin_token}"}
    with httpx.Client(base_url=cluster.url, headers=headers, verify=_context(ca), timeout=30) as http:
        for name in names:
            while policy.rate_limit and (wait := pace.take(time.monotonic())) > 0:
                time.sleep(wait)
            answer = http.post("/v1/tokens", json={"name": name, "role": "user"})
            answer.raise_for_status()
            made.append(answer.json()["token"])
    return made


def _seed(cluster: LiveCluster, tokens: list[str], users: list[int], ca: str | None) -> dict[int, list[int]]:
    """One job submitted with each client's token; each user's job ids."""
    jobs: dict[int, list[int]] = {u: [] for u in set(users)}
    with httpx.Client(base_url=cluster.url, verify=_context(ca), timeout=30) as http:
        for token, user in zip(tokens, users, strict=True):
            answer = http.post("/v1/jobs", json=JOB, headers={"Authorization": f"Bearer {token}"})
            answer.raise_for_status()
            jobs[user].append(answer.json()["id"])
    return jobs


@dataclass(slots=True)
class Phase:
    outcomes: list[Outcome]
    master_cpu: float
    flood: dict[str, float] | None


def _run_phase(cluster: LiveCluster, shares: list[Share], flood: Flood | None, seconds: float) -> Phase:
    """Run the generators (and the flooder) from one start, once all have loaded; the
    master's CPU is read over the measured seconds."""
    spawn = multiprocessing.get_context("spawn")
    assert cluster.master is not None
    master = psutil.Process(cluster.master.pid)
    jobs: list[tuple[multiprocessing.process.BaseProcess, Connection]] = []
    for target, arg in [*((_generator, share) for share in shares), *([(_flooder, flood)] if flood else [])]:
        mine, theirs = spawn.Pipe()
        jobs.append((spawn.Process(target=target, args=(arg, theirs)), mine))
    for process, _ in jobs:
        process.start()
    for _, pipe in jobs:
        pipe.recv()  # ready
    start = time.monotonic() + 0.5
    for _, pipe in jobs:
        pipe.send(start)
    time.sleep(max(0.0, start + shares[0].warmup - time.monotonic()))
    cpu = sum(master.cpu_times()[:2])
    time.sleep(seconds)
    master_cpu = (sum(master.cpu_times()[:2]) - cpu) / seconds
    results = [pipe.recv() for _, pipe in jobs]
    for process, _ in jobs:
        process.join(30)
    floods = results[len(shares) :]
    return Phase(results[: len(shares)], master_cpu, floods[0] if floods else None)


def _figures(phase: Phase, duration: float, prefix: str = "") -> dict[str, Any]:
    latencies = np.array([x for o in phase.outcomes for x in o.latencies])
    errors = sum(sum(o.errors.values()) for o in phase.outcomes)
    offered = sum(o.offered for o in phase.outcomes)
    lags = np.array([x for o in phase.outcomes for x in o.lags] or [0.0])
    return {
        f"{prefix}offered_rps": round(offered / duration, 1),
        f"{prefix}achieved_rps": round(len(latencies) / duration, 1),
        f"{prefix}error_rate": round(errors / max(1, offered), 4),
        f"{prefix}p50_ms": round(float(np.percentile(latencies, 50)), 1) if len(latencies) else None,
        f"{prefix}p99_ms": round(float(np.percentile(latencies, 99)), 1) if len(latencies) else None,
        f"{prefix}master_cpu": round(phase.master_cpu, 2),
        f"{prefix}gen_cpu": round(max(o.cpu / o.wall for o in phase.outcomes), 2),
        f"{prefix}gen_lag_p99_ms": round(float(np.percentile(lags, 99)), 1),
    }


def _errors(phase: Phase) -> dict[str, int]:
    counted: dict[str, int] = {}
    for outcome in phase.outcomes:
        for what, times in outcome.errors.items():
            counted[what] = counted.get(what, 0) + times
    return counted


def _wrk(url: str, token: str) -> dict[str, Any]:
    """wrk -c100 -d10s on the listing (installed with apt-get when missing)."""
    if shutil.which("wrk") is None:
        subprocess.run(["apt-get", "update", "-qq"], check=True)
        subprocess.run(["apt-get", "install", "-y", "-qq", "wrk"], check=True)
    out = subprocess.run(
        ["wrk", "-c100", "-d10s", "--latency", "-H", f"Authorization: Bearer {token}", url + LIST],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    print(out, file=sys.stderr)
    p99 = re.search(r"99%\s+([\d.]+)(us|ms|s)\b", out)
    scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {
        "wrk_rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),  # type: ignore[union-attr]
        "wrk_p99_ms": round(float(p99.group(1)) * scale[p99.group(2)], 1) if p99 else None,
        "wrk_non2xx": int(non2xx.group(1)) if non2xx else 0,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--users", type=int, default=20, help="users the clients' tokens belong to")
    parser.add_argument("--rate", type=float, default=1.0, help="calls a second per client")
    parser.add_argument("--mix", default="submit=0.1,list=0.4,view=0.5")
    parser.add_argument("--duration", type=float, default=20.0, help="measured seconds per phase")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds before measuring, per phase")
    parser.add_argument("--procs", type=int, default=2, help="generating processes")
    parser.add_argument("--flood-conns", type=int, default=4, help="the flooder's connections")
    parser.add_argument("--plain", action="store_true", help="plain HTTP instead of TLS")
    parser.add_argument("--wrk", action="store_true", help="also wrk -c100 -d10s on the listing")
    parser.add_argument("--master", action="append", default=[], help="a master setting, KEY=VALUE")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    mix = {op: float(w) for op, w in (kv.split("=") for kv in args.mix.split(","))}
    settings = _settings(args.master)
    policy = MasterSettings(**settings)
    # The machine's load before the run: other work on its cores takes them from the master.
    figures: dict[str, Any] = {
        "tls": not args.plain,
        "clients": args.clients,
        "load": round(os.getloadavg()[0], 2),
    }
    with tempfile.TemporaryDirectory(prefix="shoal-api-load-") as root:
        cluster = LiveCluster(
            Path(root),
            agents=0,
            heartbeat_timeout=10,
            heartbeat_interval=1,
            master_settings=settings,
            tls=not args.plain,
        )
        try:
            cluster.start()
            ca = cluster.ca
            names = [f"u{i % args.users}" for i in range(args.clients)]
            print(f"making {args.clients + 1} tokens and a job each", file=sys.stderr)
            tokens = _tokens(cluster, [*names, "flooder"], policy, ca)
            flooder, tokens = tokens[-1], tokens[:-1]
            users = [i % args.users for i in range(args.clients)]
            jobs = _seed(cluster, tokens, users, ca)
            shares = [
                Share(
                    cluster.url,
                    ca,
                    tokens[p :: args.procs],
                    users[p :: args.procs],
                    jobs,
                    args.rate * len(tokens[p :: args.procs]),
                    mix,
                    args.warmup,
                    args.duration,
                    args.seed * 100 + p,
                )
                for p in range(args.procs)
            ]
            print(f"calm: {args.clients} clients for {args.duration:g}s", file=sys.stderr)
            calm = _run_phase(cluster, shares, None, args.duration)
            figures.update(_figures(calm, args.duration))
            print(json.dumps(figures), _errors(calm), file=sys.stderr)
            seconds = args.warmup + args.duration
            flood = Flood(cluster.url, ca, flooder, args.flood_conns, seconds)
            print(f"flood: the same, and one client on {args.flood_conns} connections", file=sys.stderr)
            flooded = _run_phase(cluster, shares, flood, args.duration)
            figures.update(_figures(flooded, args.duration, "flood_"))
            print(json.dumps(figures), _errors(flooded), file=sys.stderr)
            assert flooded.flood is not None
            calm_p99, flood_p99 = figures["p99_ms"], figures["flood_p99_ms"]
            figures["flood_p99_ratio"] = round(flood_p99 / calm_p99, 2) if calm_p99 and flood_p99 else None
            figures["flood_429s"] = int(flooded.flood["429"])
            figures["flood_ok"] = int(flooded.flood["ok"])
            if args.wrk:
                figures.update(_wrk(cluster.url, cluster.admin_token))
            alive = cluster.master is not None and cluster.master.poll() is None
        finally:
            cluster.stop()
    errors = {**_errors(calm), **_errors(flooded)}
    print(json.dumps(figures))
    if errors or not alive:
        why = "the master stopped" if not alive else f"clients got errors: {errors}"
        print(why, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
