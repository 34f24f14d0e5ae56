"""`shoal history`: the tasks that have ended, as Slurm's sacct lists jobs."""

from __future__ import annotations

import csv
import sys
import time
from collections.abc import Sequence
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from shoal.cli.durations import moment
from shoal.cli.errors import friendly
from shoal.cli.render import out, print_json, styled
from shoal.client import Client
from shoal.model import TERMINAL
from shoal.views import HistoryEntry

PAGE = 1000  # rows asked of the master at a time (the most a page holds)
ENDED = sorted(s.value for s in TERMINAL)


@friendly
def history(
    user: Annotated[
        str | None,
        typer.Option("-u", "--user", help="only this owner's jobs (a user token sees only its own)"),
    ] = None,
    state: Annotated[
        list[str],
        typer.Option("-s", "--state", help=f"only tasks that ended so: {', '.join(ENDED)}; repeatable"),
    ] = [],  # noqa: B006
    since: Annotated[
        str | None, typer.Option(help="only tasks ended since: a duration ago (1h, 7d) or an ISO time")
    ] = None,
    until: Annotated[
        str | None, typer.Option(help="only tasks ended before: a duration ago or an ISO time")
    ] = None,
    node: Annotated[str | None, typer.Option("-w", "--node", help="only tasks last run on this node")] = None,
    limit: Annotated[int, typer.Option("-n", "--limit", min=1, help="rows at most")] = 100,
    after: Annotated[
        str | None, typer.Option(help="go on after this task (JOB.INDEX), where a listing stopped")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON for scripts")] = False,
    as_csv: Annotated[bool, typer.Option("--csv", help="print CSV, a header line first")] = False,
) -> None:
    """List tasks that have ended, newest jobs first, as Slurm's sacct: where and when each
    ran, how it ended, its CPU time and peak memory.

    History is what the master still holds, no more: a finished job is forgotten
    `job_retention` seconds after it ended (an hour unless the master is set otherwise), or
    once `job_retention_count` finished jobs are newer, and its tasks leave the history
    with it. Each row is a task's last run; RUNS counts them all. Times are ended at or after
    --since and before --until. CPU time and peak memory (PEAK, in MiB) are what the task's
    agent measured as its run ended: its cgroup's, else what its process and those it
    waited for used.
    """
    if as_json and as_csv:
        raise typer.BadParameter("--json or --csv, not both")
    states = [s.strip() for given in state for s in given.split(",") if s.strip()]
    if unknown := sorted(set(states) - set(ENDED)):
        raise typer.BadParameter(f"no end state {', '.join(unknown)}: they are {', '.join(ENDED)}")
    now = time.time()
    start = None if since is None else max(0.0, moment(since, now))
    end = None if until is None else max(0.0, moment(until, now))
    entries: list[HistoryEntry] = []
    cursor = after
    with Client.from_config() as client:
        while len(entries) < limit:
            page = client.history(
                user=user,
                states=states,
                since=start,
                until=end,
                node=node,
                after=cursor,
                limit=min(PAGE, limit - len(entries)),
            )
            entries += page.entries
            cursor = page.next
            if cursor is None:
                break
    if as_json:
        print_json(entries)
    elif as_csv:
        write_csv(entries)
    else:
        out.print(history_table(entries))
        if cursor is not None:
            out.print(f"[dim]more may follow: --after {cursor} goes on from here[/]")


def write_csv(entries: Sequence[HistoryEntry]) -> None:
    writer = csv.DictWriter(sys.stdout, fieldnames=list(HistoryEntry.model_fields), lineterminator="\n")
    writer.writeheader()
    for entry in entries:
        writer.writerow(entry.model_dump(mode="json"))


def history_table(entries: Sequence[HistoryEntry]) -> Table:
    """The rows in a table narrow enough for a terminal: --json and --csv have every field."""
    columns = ("TASK", "NAME", "OWNER", "NODE", "STATE", "EXIT", "ENDED", "ELAPSED", "CPU", "PEAK", "RUNS")
    table = Table(*columns, box=None, header_style="bold")
    for e in entries:
        elapsed = None if e.started_at is None or e.finished_at is None else e.finished_at - e.started_at
        table.add_row(
            e.task_id,
            escape(e.name) or "-",  # names are anyone's: text, not markup
            escape(e.owner),
            e.node or "-",
            styled(e.state.value),
            e.signal or ("-" if e.exit_code is None else str(e.exit_code)),
            _clock(e.finished_at),
            _span(elapsed),
            _span(e.cpu_seconds),
            "-" if e.peak_mem is None else f"{e.peak_mem}M",
            str(e.attempts),
        )
    return table


def _clock(ts: float | None) -> str:
    return "-" if ts is None else time.strftime("%m-%d %H:%M", time.localtime(ts))


def _span(seconds: float | None) -> str:
    """3.25s, 4m05s, 2h03m, 3d04h."""
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.2f}s"
    whole = int(seconds)
    for big, small, unit, subunit in ((86_400, 3600, "d", "h"), (3600, 60, "h", "m"), (60, 1, "m", "s")):
        if whole >= big:
            return f"{whole // big}{unit}{whole % big // small:02d}{subunit}"
    return f"{seconds:.2f}s"
