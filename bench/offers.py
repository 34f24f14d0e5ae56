"""The offer API's speed: the allocation cycle at scale, and frameworks next to native jobs.

    python bench/offers.py --nodes 10000 --frameworks 10 --agents 4 --tasks 2000

1. The allocation cycle, in the master's own state machine (no I/O), over `--nodes`
   simulated nodes and `--frameworks` subscribed frameworks. Timed per round (medians):
   `offer_cycle_ms` (one cycle offering the whole free cluster: the allocator, the offer
   records, the table, and the offers encoded as the JSON lines their frameworks read, as
   the server encodes every `ToFramework` command), `allocate_ms` (the pure allocator's part
   of it), `partial_cycle_ms` (a busy cluster where a tenth of the nodes are free), and
   `answer_and_offer_ms` (every framework declines all it holds in one batch, and the
   cluster is offered again, encoded too).
2. On a live cluster of `--agents` agents: the sweep example (`examples/sweep.py`) runs
   `--tasks` `true` tasks through the offer API, and the same tasks go through native
   `shoal submit` as one array, alternately, `--runs` times each.
Prints one JSON line last: nodes, frameworks, offer_cycle_ms, allocate_ms, partial_cycle_ms,
answer_and_offer_ms, framework_tasks_per_s, native_tasks_per_s, native_over_framework (medians).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.progress import Progress

from shoal.core.offers import Claimant, allocate
from shoal.framework import protocol as p
from shoal.master.events import (
    FrameworkCall,
    FromAgent,
    OffersMade,
    Principal,
    SubscribeFramework,
    ToFramework,
)
from shoal.master.server import tune_collector
from shoal.master.state import MasterState
from shoal.model import JobSpec, Resources
from shoal.testing.live import live_cluster
from shoal.testing.sim import sim_node
from shoal.wire import Register

ADMIN = Principal("bench", admin=True)
SWEEP = Path(__file__).resolve().parent.parent / "examples" / "sweep.py"


class Ledger:
    """A master state machine over simulated nodes, with frameworks that hold what they get."""

    def __init__(self, nodes: int, frameworks: int) -> None:
        self.state = MasterState(now=0.0)
        self.state.handle(
            *(
                FromAgent(f"n{i}", Register(node=sim_node(f"n{i}", cpus=16, mem=65536)), 0.0)
                for i in range(nodes)
            )
        )
        self.held: dict[str, list[str]] = {}
        self.ids: dict[int, str] = {}
        self.now = 0.0  # the ledger's clock: every batch of calls a second later
        self.requests = 0
        subscriptions = [
            SubscribeFramework(i, ADMIN, p.Subscribe(name=f"fw{i}"), i, 0.0) for i in range(frameworks)
        ]
        self.requests = frameworks
        self.take(self.state.handle(*subscriptions))

    def take(self, commands: list) -> None:
        for c in commands:
            if isinstance(c, ToFramework):
                if isinstance(c.event, p.Subscribed):
                    self.ids[c.connection] = c.event.framework_id
                elif isinstance(c.event, OffersMade):
                    self.held.setdefault(self.ids[c.connection], []).extend(o.id for o in c.event.offers)

    def answer_all(self) -> float:
        """Every framework declines all it holds (no filter), in one batch: seconds the ledger
        took to take the offers back and offer the cluster again."""
        calls = []
        self.now += 1
        for framework, offers in self.held.items():
            if offers:
                self.requests += 1
                decline = p.Decline(offer_ids=offers, refuse_seconds=0)
                calls.append(FrameworkCall(self.requests, ADMIN, framework, decline, self.now))
        self.held = {}
        commands, took = self.handled(calls)
        self.take(commands)
        return took

    def handled(self, events: list) -> tuple[list, float]:
        """The commands of one batch of events, and the seconds the master spends on it: the
        state machine's call and the encoding of what it tells frameworks (the server puts
        each `ToFramework` command's event on its stream through `FrameworkDesk.encode`)."""
        desk = self.state.frameworks
        began = time.perf_counter()
        commands = self.state.handle(*events)
        for c in commands:
            if isinstance(c, ToFramework):
                desk.encode(c.event)
        return commands, time.perf_counter() - began

    def cycle(self) -> float:
        """Seconds of one allocation cycle offering all that is free: offers are taken back
        (SUPPRESS, untimed), then every framework revives in one batch."""
        self.calls(p.Suppress)
        self.held = {f: [] for f in self.held}
        commands, took = self.handled(self.call_events(p.Revive))
        self.take(commands)
        return took

    def call_events(self, make) -> list:
        """One call to every framework, batched as the master batches what arrives at once."""
        events = []
        self.now += 1
        for framework in self.held:
            self.requests += 1
            events.append(FrameworkCall(self.requests, ADMIN, framework, make(), self.now))
        return events

    def calls(self, make) -> list:
        return self.state.handle(*self.call_events(make))

    def offered(self, nodes: int, after: str) -> None:
        """Stop unless the frameworks now hold offers of exactly `nodes` nodes: a timed cycle
        that offered less did not do the work it is timed for."""
        held = sum(len(offers) for offers in self.held.values())
        if held != nodes:
            raise SystemExit(f"after {after}, the frameworks hold {held} offers, not {nodes}")

    def allocate_once(self) -> float:
        desk = self.state.frameworks
        claimants = [Claimant(f, "default") for f in desk.frameworks]
        began = time.perf_counter()
        allocate(self.state.ledger.table, desk.shares(), claimants, [], self.state.policy, 0)
        return time.perf_counter() - began


def cycle_figures(nodes: int, frameworks: int, rounds: int) -> dict[str, float]:
    ledger = Ledger(nodes, frameworks)
    tune_collector()  # as the master does
    full = [ledger.cycle() for _ in range(rounds)]
    ledger.offered(nodes, "a cycle on the free cluster")
    answered = [ledger.answer_all() for _ in range(rounds)]
    ledger.offered(nodes, "declining everything")
    # The pure allocator alone, on the same table with nothing outstanding (offers rescinded).
    ledger.calls(p.Suppress)
    pure = [ledger.allocate_once() for _ in range(rounds)]
    # A busy cluster: nine nodes in ten hold tasks; the rest comes free each round.
    table = ledger.state.ledger.table
    taken = table.vector(Resources(cpus=16, mem=65536))
    for row in range(len(table)):
        if row % 10:
            table.allocate(row, taken)
    partial = [ledger.cycle() for _ in range(rounds)]
    ledger.offered(len(range(0, len(table), 10)), "a cycle on the busy cluster")
    return {
        "offer_cycle_ms": round(statistics.median(full) * 1000, 2),
        "allocate_ms": round(statistics.median(pure) * 1000, 2),
        "answer_and_offer_ms": round(statistics.median(answered) * 1000, 2),
        "partial_cycle_ms": round(statistics.median(partial) * 1000, 2),
    }


def native_rate(client, tasks: int) -> float:
    began = time.perf_counter()
    job = client.submit(JobSpec(command=["true"], count=tasks, resources=Resources(cpus=0.1, mem=32)))
    view = client.wait(job, poll=0.02, timeout=600, limit=0)
    assert view.state.value == "complete", view.counts
    return tasks / (time.perf_counter() - began)


def framework_rate(cluster, tasks: int) -> float:
    result = subprocess.run(
        [sys.executable, str(SWEEP), "--tasks", str(tasks), "--cpus", "0.1", "--mem", "32", "--json"],
        env=cluster.cli_env(),
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["finished"] == tasks, summary
    return summary["tasks_per_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=10_000)
    parser.add_argument("--frameworks", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--agents", type=int, default=4)
    parser.add_argument("--tasks", type=int, default=2000)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    figures: dict[str, object] = {"nodes": args.nodes, "frameworks": args.frameworks}
    figures.update(cycle_figures(args.nodes, args.frameworks, args.rounds))
    print(f"allocation: {figures}", file=sys.stderr)
    native: list[float] = []
    framework: list[float] = []
    with (
        tempfile.TemporaryDirectory() as root,
        live_cluster(Path(root), agents=args.agents, heartbeat_timeout=30) as cluster,
        cluster.client() as client,
        Progress(transient=True) as progress,
    ):
        bar = progress.add_task("native and framework runs", total=2 * args.runs)
        for _ in range(args.runs):
            native.append(native_rate(client, args.tasks))
            progress.advance(bar)
            framework.append(framework_rate(cluster, args.tasks))
            progress.advance(bar)
    figures["agents"] = args.agents
    figures["tasks"] = args.tasks
    figures["framework_tasks_per_s"] = round(statistics.median(framework), 1)
    figures["native_tasks_per_s"] = round(statistics.median(native), 1)
    figures["native_over_framework"] = round(statistics.median(native) / statistics.median(framework), 3)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
