"""Moving work: `shoal rebalance`, `shoal drain`, `shoal undrain`; `shoal events` (the
migrations, or with -f the whole event stream)."""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Annotated

import typer
from rich.table import Table

from shoal.cli.errors import friendly
from shoal.cli.render import ago, out, print_json
from shoal.client import Client
from shoal.model import Migration
from shoal.sse import TOPICS, StreamEvent

JsonOpt = Annotated[bool, typer.Option("--json", help="print JSON for scripts")]


def _migrations_table(moves: list[Migration]) -> Table:
    table = Table("ID", "WHEN", "TASK", "FROM", "TO", "MODE", "TOOK", "WHY", box=None, header_style="bold")
    for m in moves:
        took = f"{m.duration:.1f}s" if m.duration is not None else "[yellow]moving[/]"
        to = m.node or m.target or "(scheduler)"
        table.add_row(str(m.id), ago(m.at), m.task_id, m.source, to, m.mode.value, took, m.reason)
    return table


@friendly
def rebalance(
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="print the moves it would make, and why")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Even the load out now (admin), or with --dry-run show what a round would move."""
    with Client.from_config() as client:
        if dry_run:
            plan = client.rebalance_plan()
            if as_json:
                print_json(plan)
                return
            table = Table("TASK", "FROM", "TO", "WHY", box=None, header_style="bold")
            for p in plan:
                table.add_row(p.task_id, p.source, p.target, p.reason)
            out.print(table if plan else "nothing to move: every node is within the threshold")
            return
        started = client.rebalance()
    print_json(started) if as_json else out.print(
        _migrations_table(started) if started else "nothing to move"
    )


@friendly
def drain(
    node: Annotated[str, typer.Argument(help="the node to empty")],
    deadline: Annotated[
        float | None, typer.Option(help="seconds; then tasks that never migrate are moved as well")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Give a node no new work and move its tasks elsewhere (admin)."""
    with Client.from_config() as client:
        moved = client.drain(node, deadline)
    if as_json:
        print_json(moved)
    else:
        out.print(f"{node} drained: {len(moved)} tasks moving off; `shoal events` follows them")


@friendly
def undrain(node: Annotated[str, typer.Argument(help="the node to take work again")]) -> None:
    """Let a drained node take work again (admin)."""
    with Client.from_config() as client:
        client.undrain(node)
    out.print(f"{node} takes work again")


@friendly
def events(
    limit: Annotated[int, typer.Option(min=1, max=10_000, help="how many, newest first")] = 50,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="follow every change as it happens (the event stream)")
    ] = False,
    topic: Annotated[
        list[str] | None, typer.Option("--topic", help=f"with -f: only this topic ({', '.join(TOPICS)})")
    ] = None,
    job: Annotated[int | None, typer.Option(help="with -f: only this job's events")] = None,
    node: Annotated[str | None, typer.Option(help="with -f: only events on this node")] = None,
    index: Annotated[int | None, typer.Option(help="with -f: resume after this index")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Migrations, newest first; with -f, every change as it happens (the event stream).

    The stream has the topics jobs, tasks, nodes, frameworks, offers, migrations, services
    and audit; a user sees their own jobs' events and the cluster's nodes and services."""
    with Client.from_config() as client:
        if follow:
            for event in client.stream(topic or (), job=job, node=node, index=index):
                print(json.dumps(dataclasses.asdict(event)), flush=True) if as_json else out.print(
                    event_line(event), highlight=False, markup=False
                )
            return
        moves = client.events(limit)
    print_json(moves) if as_json else out.print(_migrations_table(moves))


def event_line(event: StreamEvent) -> str:
    """One line of `shoal events -f`: when, the index, the topic and kind, and what changed."""
    record = event.record if isinstance(event.record, dict) else {}
    what = {
        "tasks": lambda: f"{record.get('id')} {record.get('state')} {record.get('node') or ''}",
        "jobs": lambda: (
            f"{record.get('id')} {record.get('spec', {}).get('name', '')} {record.get('owner', '')}"
        ),
        "nodes": lambda: f"{record.get('info', {}).get('name')} {record.get('status', '')}",
        "audit": lambda: f"{record.get('who')} {record.get('kind')} {record.get('status')}",
    }.get(event.topic, lambda: json.dumps(record, separators=(",", ":"))[:120])
    when = time.strftime("%H:%M:%S", time.localtime(event.at))
    return f"{when} {event.index} {event.topic} {event.type} {what().strip()}"
