"""`shoal top`: nodes sorted by load, live: CPU and memory bars, tasks, the load's trend."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Annotated

import typer
from rich.live import Live
from rich.table import Table

from shoal.cli.errors import friendly
from shoal.cli.render import out, styled
from shoal.client import Client
from shoal.model import NodeStatus
from shoal.views import NodeView

_SPARKS = "▁▂▃▄▅▆▇█"


def _bar(fraction: float, width: int = 20) -> str:
    fraction = min(max(fraction, 0.0), 1.0)
    filled = round(fraction * width)
    colour = "red" if fraction >= 0.8 else "yellow" if fraction >= 0.5 else "green"
    return f"[{colour}]{'█' * filled}[/][dim]{'·' * (width - filled)}[/] {fraction:4.0%}"


def _trend(history: Sequence[float], width: int = 12) -> str:
    recent = history[-width:]
    return "".join(_SPARKS[min(len(_SPARKS) - 1, int(v / 100 * len(_SPARKS)))] for v in recent)


def top_table(nodes: Sequence[NodeView]) -> Table:
    table = Table(
        "NODE", "STATE", "CPU (smoothed)", "MEM", "TASKS", "LOAD1", "TREND", box=None, header_style="bold"
    )
    for n in sorted(nodes, key=lambda n: (n.status is not NodeStatus.UP, -n.load, n.name)):
        mem = n.usage.mem_used / n.info.capacity.mem if n.info.capacity.mem else 0.0
        table.add_row(
            n.name,
            styled(n.status.value),
            _bar(n.load / 100),
            _bar(mem),
            str(n.tasks),
            f"{n.usage.load1:.2f}",
            _trend(n.history),
        )
    return table


@friendly
def top(
    interval: Annotated[float, typer.Option(min=0.2, help="seconds between refreshes")] = 1.0,
    once: Annotated[bool, typer.Option("--once", help="print one view and exit")] = False,
) -> None:
    """A live view of the nodes, busiest first (Ctrl-C to leave; `shoal nodes --json` for scripts)."""
    with Client.from_config() as client:
        if once:
            out.print(top_table(client.nodes()))
            return
        with Live(top_table(client.nodes()), console=out, screen=False, auto_refresh=False) as live:
            try:
                while True:
                    time.sleep(interval)
                    live.update(top_table(client.nodes()), refresh=True)
            except KeyboardInterrupt:
                pass
