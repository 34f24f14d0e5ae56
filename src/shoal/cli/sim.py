"""`shoal sim`: the real scheduler against a simulated cluster and workload."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.progress import Progress
from rich.table import Table

from shoal.cli.errors import fail, friendly
from shoal.cli.render import out
from shoal.config import MasterSettings, load_settings

if TYPE_CHECKING:
    from shoal.simulation import Report


@friendly
def sim(
    nodes: Annotated[int, typer.Option(min=1, help="simulated nodes")] = 16,
    cpus: Annotated[float, typer.Option(min=0.1, help="cpus per node")] = 8,
    mem: Annotated[int, typer.Option(min=1, help="MiB per node")] = 16384,
    trace: Annotated[
        Path | None, typer.Option(help="a CSV or JSONL workload (see docs); default: generated")
    ] = None,
    jobs: Annotated[int, typer.Option(min=1, help="generated jobs")] = 300,
    rate: Annotated[float, typer.Option(min=0.001, help="generated arrivals per second")] = 0.5,
    duration: Annotated[float, typer.Option(min=1, help="mean task duration of generated jobs, s")] = 60,
    config: Annotated[
        Path | None, typer.Option(help="a master settings file: queues, weights, strategy")
    ] = None,
    seed: Annotated[int, typer.Option(help="for the workload and the links")] = 0,
    plot_to: Annotated[
        Path | None, typer.Option("--plot", help="write utilization and queue length to a PNG")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the figures as JSON")] = False,
) -> None:
    """Run a workload through the real scheduler on a simulated cluster and virtual clock."""
    from shoal.simulation import generate, load_trace, plot, simulate  # numpy: only for sim

    policy = load_settings(MasterSettings, config).policy()
    try:
        arrivals = (
            load_trace(trace) if trace else generate(jobs, seed=seed, rate=rate, mean_duration=duration)
        )
    except ValueError as e:
        raise fail(str(e), "see `shoal sim --help` for the trace formats", code=2) from None
    with Progress(transient=True, disable=as_json) as progress:
        bar = progress.add_task("simulating", total=sum(a.count for a in arrivals))
        report = simulate(
            arrivals, nodes, cpus, mem, policy, seed, progress=lambda n: progress.advance(bar, n)
        )
    if plot_to is not None:
        plot(report, plot_to)
    if as_json:
        print(json.dumps(report.summary()))
    else:
        out.print(_table(report))
        if plot_to is not None:
            out.print(f"plot written to {plot_to}")


def _table(report: Report) -> Table:
    table = Table(box=None, show_header=False)
    for key, value in (
        ("jobs", report.jobs),
        ("tasks", report.tasks),
        ("makespan", f"{report.makespan:g} s"),
        ("throughput", f"{report.throughput:g} tasks/h"),
        ("utilization", f"{report.mean_utilization:.1%} of cpus allocated, on average"),
        ("preemptions", report.preemptions),
    ):
        table.add_row(f"[bold]{key}[/]", str(value))
    for title, waits in (("queue", report.wait_by_queue), ("user", report.wait_by_user)):
        for name, p in waits.items():
            table.add_row(
                f"[bold]wait[/] {title} {name}",
                f"p50 {p['p50']:g} s · p90 {p['p90']:g} s · p99 {p['p99']:g} s",
            )
    return table
