"""The dashboard's load time with a thousand nodes and ten thousand jobs, in headless Chromium.

    python bench/ui.py --nodes 1000 --jobs 10000 --runs 5

A master on loopback (plain HTTP, no rate limit, fsync off) is joined by `--nodes` simulated
agents: one process holding a WebSocket per node to `/v1/agent`, speaking the agents' own
frames (shoal.wire). Each registers a 16-cpu node with rack and zone labels, sends a
heartbeat with a made-up CPU and memory use every `--heartbeat` seconds (so nodes have a load
history), reports every run it is sent as running (a run of `true` as finished at once) and
every run it is told to kill as killed. The master does all its own work (placement, the
ledger, the stream); only no process runs on the nodes. `--jobs` jobs are then submitted
through the API: a tenth sleep (held running by their nodes), a tenth of the newest
thousand wait on a constraint no node meets, the rest run `true` and finish; the bench
waits until they have.

Chromium (Debian's chromium and chromium-driver, through Selenium) then loads the jobs page
(`#/jobs`: the newest 100 jobs) and the nodes page (`#/nodes`: every node, with its bars and
its load history), each `--runs` times after one warm-up load, each time from about:blank.
A load's time runs from the navigation's start to the page marking its table rendered (the
`shoal-rendered-<page>` performance mark, set once its data is in the table: on the nodes
page, the rows in view, as it draws no others; the bench then checks that it lists every
node and that the last comes into view when scrolled to).

Prints one JSON line last: nodes, jobs, jobs_load_ms and nodes_load_ms (medians),
load_ms (the larger of the two; goal <= 1000) and goal_met. Exits 1 when a page did not
render its data (fewer node rows than nodes, or not the newest jobs), or the cluster could
not be set up.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import random
import shutil
import statistics
import sys
import tempfile
import time
from multiprocessing.connection import Connection
from pathlib import Path

import httpx
from selenium.common.exceptions import WebDriverException

from shoal.model import NodeInfo, Resources, TaskState, Usage, parse_run_id
from shoal.testing.live import LiveCluster, wait_for
from shoal.wire import Heartbeat, Kill, Launch, Register, RunReport, RunReports, decode, encode

GOAL_MS = 1000.0
PAGE = 100  # jobs the jobs page shows
WAIT = 60.0  # seconds a page may take to render before the run fails


class Failed(Exception):
    """The bench could not measure what it set out to."""


# --- the simulated nodes ------------------------------------------------------------------


def fleet(url: str, token: str, nodes: int, heartbeat: float, pipe: Connection) -> None:
    """Run `nodes` simulated agents until killed; says on `pipe` how many registered."""
    asyncio.run(_fleet(url.replace("http", "ws", 1) + "/v1/agent", token, nodes, heartbeat, pipe))


async def _fleet(url: str, token: str, nodes: int, heartbeat: float, pipe: Connection) -> None:
    from websockets.asyncio.client import connect

    registered = 0

    async def agent(i: int) -> None:
        nonlocal registered
        name = f"node{i:04d}"
        info = NodeInfo(
            name=name,
            hostname=name,
            capacity=Resources(cpus=16, mem=65536, disk=500_000),
            labels={"rack": f"r{i % 40:02d}", "zone": f"z{i % 4}"},
            attributes={"os": "linux", "arch": "x86_64"},
        )
        headers = {"Authorization": f"Bearer {token}"}
        async with connect(url, additional_headers=headers, max_size=None, open_timeout=120) as ws:
            await ws.send(encode(Register(node=info)))
            registered += 1
            beats = asyncio.create_task(_heartbeats(ws, random.Random(i), heartbeat))
            try:
                async for message in ws:
                    for answer in _answers(decode(message)):  # type: ignore[arg-type]
                        await ws.send(encode(answer))
            finally:
                beats.cancel()

    async def report() -> None:
        while registered < nodes:
            pipe.send(registered)
            await asyncio.sleep(0.5)
        pipe.send(registered)
        pipe.close()

    reporting = asyncio.create_task(report())
    agents = []
    for first in range(0, nodes, 50):  # in batches: a thousand handshakes at once swamp the master
        agents += [asyncio.create_task(agent(i)) for i in range(first + 1, min(first + 51, nodes + 1))]
        while registered < min(first + 50, nodes):
            await asyncio.sleep(0.05)
    await asyncio.gather(*agents, reporting)


async def _heartbeats(ws, rng: random.Random, every: float) -> None:  # type: ignore[no-untyped-def]
    cpu, mem = rng.uniform(5, 60), rng.uniform(0.1, 0.6)
    await asyncio.sleep(rng.uniform(0, every))  # out of step with each other
    while True:
        cpu = min(100.0, max(0.0, cpu + rng.uniform(-15, 15)))
        mem = min(0.95, max(0.05, mem + rng.uniform(-0.05, 0.05)))
        await ws.send(encode(Heartbeat(usage=Usage(cpu_percent=round(cpu, 1), mem_used=int(mem * 65536)))))
        await asyncio.sleep(every)


def _answers(frame: object) -> list[RunReports]:
    """What a node says back: runs started (a run of `true` ended at once), runs killed."""
    if isinstance(frame, Launch):
        running = [_report(r.run_id, TaskState.RUNNING) for r in frame.runs]
        done = [_report(r.run_id, TaskState.FINISHED, 0) for r in frame.runs if r.argv[-1:] == ["true"]]
        return [RunReports(reports=running), *([RunReports(reports=done)] if done else [])]
    if isinstance(frame, Kill):
        return [RunReports(reports=[_report(run, TaskState.KILLED, -15) for run in frame.run_ids])]
    return []


def _report(run: str, state: TaskState, exit_code: int | None = None) -> RunReport:
    task_id, attempt = parse_run_id(run)
    return RunReport(run_id=run, task_id=task_id, attempt=attempt, state=state, exit_code=exit_code)


# --- the cluster --------------------------------------------------------------------------


def start_nodes(cluster: LiveCluster, nodes: int, heartbeat: float) -> multiprocessing.Process:
    context = multiprocessing.get_context("spawn")
    ours, theirs = context.Pipe(duplex=False)
    proc = context.Process(
        target=fleet, args=(cluster.url, cluster.cluster_token, nodes, heartbeat, theirs), daemon=True
    )
    proc.start()
    deadline = time.monotonic() + 60 + nodes * 0.1
    up = 0
    while up < nodes:
        if not proc.is_alive() or time.monotonic() > deadline:
            raise Failed(f"{up} of {nodes} simulated nodes registered")
        if ours.poll(1):
            up = ours.recv()
    with cluster.client() as c:
        wait_for(lambda: len(c.nodes()) >= nodes, 60, f"{nodes} nodes listed")
    return proc


def submit_jobs(cluster: LiveCluster, jobs: int) -> tuple[int, int, int]:
    """`jobs` jobs through the API, 8 calls at a time; (sleeping, waiting, newest id)."""
    # Jobs that wait cost every scheduling cycle: they come last, among the newest thousand.
    last = max(0, jobs - 1000)
    kinds = ["sleep" if i % 10 == 0 else "wait" if i % 10 == 1 and i >= last else "true" for i in range(jobs)]

    def spec(i: int, kind: str) -> dict:
        body: dict = {"name": f"{kind}-{i}", "command": [kind] if kind != "sleep" else ["sleep", "1d"]}
        body["resources"] = {"cpus": random.choice([0.5, 1, 2, 4]) if kind == "sleep" else 0.1, "mem": 256}
        if kind == "wait":
            body |= {"command": ["true"], "constraints": ["rack == nowhere"]}
        return body

    async def run() -> int:
        headers = {"Authorization": f"Bearer {cluster.admin_token}"}
        limits = httpx.Limits(max_connections=8)
        gate = asyncio.Semaphore(8)
        async with httpx.AsyncClient(
            base_url=cluster.url, headers=headers, limits=limits, timeout=120
        ) as http:

            async def one(i: int, kind: str) -> int:
                async with gate:
                    response = await http.post("/v1/jobs", json=spec(i, kind))
                    response.raise_for_status()
                    return response.json()["id"]

            return max(await asyncio.gather(*(one(i, k) for i, k in enumerate(kinds))))

    newest = asyncio.run(run())
    return kinds.count("sleep"), kinds.count("wait"), newest


def settle(cluster: LiveCluster, sleeping: int, waiting: int) -> None:
    """Until every job that finishes has, and the rest run or wait."""
    headers = {"Authorization": f"Bearer {cluster.admin_token}"}

    def settled() -> bool:
        queue = httpx.get(f"{cluster.url}/v1/queues", headers=headers, timeout=60).json()[0]
        return queue["running"] == sleeping and queue["pending"] == waiting

    wait_for(settled, 600, "the jobs settled")


# --- the browser --------------------------------------------------------------------------


def browser():  # type: ignore[no-untyped-def]
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if chromium is None or driver is None:
        raise Failed("chromium and chromedriver are needed (Debian: chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1000"):
        options.add_argument(argument)
    return webdriver.Chrome(options=options, service=Service(driver))


def load_ms(driver, url: str, page: str) -> float:  # type: ignore[no-untyped-def]
    """One load of `page` from about:blank: ms from the navigation's start to its table."""
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get("about:blank")
    driver.get(f"{url}/ui/#/{page}")
    mark = f"shoal-rendered-{page}"
    script = "const m = performance.getEntriesByName(arguments[0]); return m.length ? m[0].startTime : null"
    return WebDriverWait(driver, WAIT, poll_frequency=0.01).until(lambda d: d.execute_script(script, mark))


def rows(driver) -> list[str]:  # type: ignore[no-untyped-def]
    """The rows in the table now: the nodes page draws those in view only."""
    script = "return [...document.querySelectorAll('#rows tr[data-node], #rows tr[data-job]')]"
    return driver.execute_script(script + ".map(r => r.dataset.node || r.dataset.job)")


def check_nodes(driver, nodes: int) -> None:  # type: ignore[no-untyped-def]
    """The nodes page holds every node: the first in view, the last once scrolled to."""
    from selenium.webdriver.support.ui import WebDriverWait

    listed = driver.execute_script("return Number(document.querySelector('table.nodes').dataset.rows)")
    first, last = f"node{1:04d}", f"node{nodes:04d}"
    if listed != nodes or rows(driver)[:1] != [first]:
        raise Failed(f"the nodes page lists {listed} nodes of {nodes}, the first {rows(driver)[:1]}")
    driver.execute_script("window.scrollTo(0, document.body.scrollHeight)")
    WebDriverWait(driver, 10).until(lambda d: rows(d)[-1:] == [last], f"{last} in view at the end")


def check_jobs(driver, newest: int) -> None:  # type: ignore[no-untyped-def]
    shown = rows(driver)
    if len(shown) != PAGE or shown[0] != str(newest):
        raise Failed(f"the jobs page shows {len(shown)} jobs, first {shown[:1]}; the newest is {newest}")


def measure(url: str, token: str, nodes: int, newest: int, runs: int) -> dict[str, float]:
    driver = browser()
    try:
        driver.get(f"{url}/ui/#/login")
        driver.execute_script("sessionStorage.setItem('shoal.token', arguments[0])", token)
        figures = {}
        for page in ("jobs", "nodes"):
            load_ms(driver, url, page)  # warm: the files' first fetch, the master's first listing
            times = [load_ms(driver, url, page) for _ in range(runs)]
            check_jobs(driver, newest) if page == "jobs" else check_nodes(driver, nodes)
            figures[f"{page}_load_ms"] = round(statistics.median(times), 1)
            print(f"{page}: {', '.join(f'{t:.0f}' for t in times)} ms", file=sys.stderr)
        return figures
    finally:
        driver.quit()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--runs", type=int, default=5, help="loads of each page measured (medians)")
    parser.add_argument("--heartbeat", type=float, default=5.0, help="seconds between a node's heartbeats")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="shoal-bench-ui-"))
    settings = {"rate_limit": "0", "fsync": "false", "job_retention_count": str(2 * args.jobs)}
    cluster = LiveCluster(root, 0, 6 * args.heartbeat, args.heartbeat, settings)
    fleet_proc = None
    try:
        began = time.monotonic()
        cluster.start_master()
        fleet_proc = start_nodes(cluster, args.nodes, args.heartbeat)
        print(f"{args.nodes} nodes up in {time.monotonic() - began:.0f} s", file=sys.stderr)
        began = time.monotonic()
        sleeping, waiting, newest = submit_jobs(cluster, args.jobs)
        settle(cluster, sleeping, waiting)
        print(f"{args.jobs} jobs submitted and settled in {time.monotonic() - began:.0f} s", file=sys.stderr)
        figures = measure(cluster.url, cluster.admin_token, args.nodes, newest, args.runs)
    except (Failed, TimeoutError, httpx.HTTPError, WebDriverException) as e:
        print(f"failed: {type(e).__name__} {e} (logs in {root})", file=sys.stderr)
        return 1
    finally:
        if fleet_proc is not None:
            fleet_proc.kill()
        cluster.stop()
    worst = max(figures.values())
    print(
        json.dumps(
            {
                "nodes": args.nodes,
                "jobs": args.jobs,
                **figures,
                "load_ms": worst,
                "goal_met": worst <= GOAL_MS,
            }
        )
    )
    shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
