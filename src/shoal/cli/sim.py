"""`shoal sim`: the real scheduler against a simulated cluster and workload."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import Progress
from rich.table import Table

from shoal.cli.errors import EXIT_USAGE, fail, friendly
from shoal.cli.render import out
from shoal.config import MasterSettings, load_settings

if TYPE_CHECKING:
    from shoal.simulation import Report, Stats

GENERATED = 300  # jobs generated when no trace is given


@friendly
def sim(
    nodes: Annotated[int, typer.Option(min=1, help="simulated nodes")] = 16,
    cpus: Annotated[float, typer.Option(min=0.1, help="cpus per node")] = 8,
    mem: Annotated[int, typer.Option(min=1, help="MiB per node")] = 16384,
    node_cpus: Annotated[
        float | None,
        typer.Option(min=0.1, help="processors of a trace's node: a job of P becomes ceil(P/this) tasks"),
    ] = None,
    trace: Annotated[
        Path | None,
        typer.Option(help="a workload: SWF (.swf), CSV or JSONL, or gzipped (see docs); default: generated"),
    ] = None,
    jobs: Annotated[
        int | None,
        typer.Option(min=1, help=f"jobs generated (default {GENERATED}), or the first N of a trace"),
    ] = None,
    rate: Annotated[float, typer.Option(min=0.001, help="generated arrivals per second")] = 0.5,
    duration: Annotated[float, typer.Option(min=1, help="mean task duration of generated jobs, s")] = 60,
    config: Annotated[
        Path | None, typer.Option(help="a master settings file: queues, backfill, weights, strategy")
    ] = None,
    queue: Annotated[
        list[str] | None,
        typer.Option(help="put a trace's queue SRC in queue DST: SRC=DST, or '*=DST' for the rest"),
    ] = None,
    skip_unfit: Annotated[
        bool, typer.Option("--skip-unfit", help="skip (and count) jobs the cluster could never hold")
    ] = False,
    seed: Annotated[int, typer.Option(help="for the generated workload")] = 0,
    plot_to: Annotated[
        Path | None, typer.Option("--plot", help="write utilization and queue length to a PNG")
    ] = None,
    jobs_out: Annotated[
        Path | None, typer.Option(help="write one JSON line per job: id, user, queue, times, cpus, nodes")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the figures as JSON")] = False,
) -> None:
    """Run a workload through the real scheduler on a simulated cluster and virtual clock."""
    # numpy and the master's state machines: only for sim
    from shoal.simulation import Cluster, map_queues, parse_queue_map, plot, simulate
    from shoal.workload import WorkloadError, generate, read

    policy = load_settings(MasterSettings, config).policy()
    try:
        if trace is None:
            workload = generate(jobs or GENERATED, seed=seed, rate=rate, mean_duration=duration)
        else:
            workload = read(trace, jobs)
        workload = map_queues(workload, policy.queues, parse_queue_map(queue or []))
        with Progress(console=Console(stderr=True), transient=True) as progress:
            bar = progress.add_task("simulating", total=len(workload.arrivals))
            report = simulate(
                workload,
                Cluster(nodes, cpus, mem, node_cpus),
                policy,
                skip_unfit=skip_unfit,
                progress=lambda: progress.advance(bar),
            )
    except WorkloadError as e:
        raise fail(escape(str(e)), "see `shoal sim --help` and the README", code=EXIT_USAGE) from None
    if jobs_out is not None:
        jobs_out.write_text("".join(json.dumps(r.record()) + "\n" for r in report.runs))
    if plot_to is not None:
        plot(report, plot_to)
    if as_json:
        print(json.dumps(report.summary()))
    else:
        out.print(_table(report))
        for path, what in ((plot_to, "plot"), (jobs_out, "jobs")):
            if path is not None:
                out.print(f"{what} written to {path}")


def _table(report: Report) -> Table:
    table = Table(box=None, show_header=False)
    skipped = ", ".join(f"{n} ({why})" for why, n in report.skipped.items()) or "none"
    for key, value in (
        (
            "jobs",
            f"{report.jobs} ({report.failed} failed, {report.stopped} stopped at their limit as traced)",
        ),
        ("tasks", report.tasks),
        ("skipped", skipped),
        ("cut to limit", f"{report.cut} runs"),
        ("makespan", f"{report.makespan:g} s"),
        ("utilization", f"{report.utilization:.1%} of cpu time held"),
        ("preemptions", report.preemptions),
        ("late heads", f"{report.late_heads} jobs started after their promised start"),
        ("wait", _stats(report.wait)),
    ):
        table.add_row(f"[bold]{key}[/]", escape(str(value)))
    for title, groups in (("queue", report.by_queue), ("user", report.by_user)):
        for name, stats in groups.items():
            table.add_row(f"[bold]wait[/] {title} {escape(name)}", _stats(stats))
    return table


def _stats(s: Stats) -> str:
    return (
        f"mean {s.wait_mean:g} s · p50 {s.wait_p50:g} · p90 {s.wait_p90:g} · p99 {s.wait_p99:g} · "
        f"max {s.wait_max:g} · bounded slowdown {s.slowdown_mean:g} ({s.jobs} jobs)"
    )
