"""`shoal loadgen`: hold this node's CPU utilization inside a band (see `shoal.loadgen`)."""

from __future__ import annotations

import dataclasses
import json
import signal
import sys
from typing import Annotated

import typer
from rich.live import Live
from rich.text import Text

from shoal.cli.errors import fail, friendly
from shoal.cli.render import out
from shoal.loadgen import Controller, LoadGenerator, Sample, Summary, default_workers


def _status(sample: Sample, low: float, high: float) -> Text:
    inside = low <= sample.utilization <= high
    mark = "[green]in band[/]" if inside else "[yellow]adjusting[/]"
    return Text.from_markup(
        f"cpu [bold]{sample.utilization:5.1f}%[/] (band {low:g}-{high:g}%) {mark} · "
        f"{sample.workers} workers x duty {sample.duty:.2f} · {sample.at:6.1f}s"
    )


def _stop_on_sigterm() -> None:
    """As a task, the agent stops it with SIGTERM: end as on Ctrl-C, workers included."""

    def interrupt(*_: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)


@friendly
def loadgen(
    low: Annotated[float, typer.Option("--min", min=0, max=100, help="lowest CPU utilization, %")] = 40,
    high: Annotated[float, typer.Option("--max", min=0, max=100, help="highest CPU utilization, %")] = 60,
    workers: Annotated[int | None, typer.Option(min=1, help="busy processes at most (default: cpus)")] = None,
    step: Annotated[int, typer.Option(min=1, help="workers added or removed at once, at most")] = 1,
    interval_ms: Annotated[int, typer.Option("--interval-ms", min=50, help="between measurements")] = 500,
    duration: Annotated[float | None, typer.Option(min=0.1, help="stop after this many seconds")] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="a JSON line per measurement and a summary")
    ] = False,
) -> None:
    """Hold this node's total CPU utilization between --min and --max with busy worker
    processes, adapting as other load comes and goes. Runs by hand or as a shoal task."""
    if low >= high:
        raise fail(f"--min {low:g} must be below --max {high:g}", "for example --min 40 --max 60", code=2)
    cpus = default_workers()
    controller = Controller(low, high, cpus, workers or cpus, step)
    generator = LoadGenerator(controller)
    _stop_on_sigterm()
    samples: list[Sample] = []
    try:
        if as_json:
            samples = generator.run(
                interval_ms / 1000, duration, lambda s: print(json.dumps(dataclasses.asdict(s)))
            )
        else:
            with Live(Text("measuring..."), console=out, transient=not sys.stdout.isatty()) as live:
                samples = generator.run(
                    interval_ms / 1000, duration, lambda s: live.update(_status(s, low, high))
                )
    except KeyboardInterrupt:
        pass
    summary = Summary.of(samples, low, high)
    if as_json:
        print(json.dumps(dataclasses.asdict(summary)))
    else:
        settled = f"{summary.in_band:.0%} of measurements in band after settling"
        out.print(f"{settled}; median {summary.median_utilization}%")
