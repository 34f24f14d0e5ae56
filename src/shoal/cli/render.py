"""Tables and JSON for the CLI's answers."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from pydantic import BaseModel
from rich.console import Console
from rich.table import Column, Table

from shoal.model import NodeStatus, Resources, TaskState
from shoal.views import FrameworkView, JobView, MasterView, NodeView, TokenView

if TYPE_CHECKING:  # what only the parallel shell's commands render, and import themselves
    from shoal.shell.bootstrap import NodeResult
    from shoal.shell.protocol import AuditRecord

out = Console(highlight=False)

_STATE_STYLE = {
    "pending": "yellow",
    "assigned": "cyan",
    "running": "cyan",
    "complete": "green",
    "finished": "green",
    "failed": "red",
    "lost": "red",
    "killed": "magenta",
    "migrated": "blue",
    "up": "green",
    "down": "red",
}


def print_json(value: BaseModel | Sequence[BaseModel]) -> None:
    if isinstance(value, BaseModel):
        data = value.model_dump(mode="json")
    else:
        data = [v.model_dump(mode="json") for v in value]
    print(json.dumps(data, indent=2))


def styled(state: str) -> str:
    return f"[{_STATE_STYLE.get(state, 'white')}]{state}[/]"


def _span(seconds: int) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def ago(ts: float | None) -> str:
    return "-" if ts is None else f"{_span(max(0, int(time.time() - ts)))} ago"


def when(ts: float | None) -> str:
    """A time to come as `in 3h`, one past as `3h ago`; None as never."""
    if ts is None:
        return "never"
    return ago(ts) if ts <= time.time() else f"in {_span(int(ts - time.time()))}"


def jobs_table(jobs: Sequence[JobView]) -> Table:
    table = Table("ID", "NAME", "OWNER", "STATE", "TASKS", "SUBMITTED", box=None, header_style="bold")
    for job in sorted(jobs, key=lambda j: j.id):
        counts = ", ".join(f"{n} {s}" for s, n in sorted(job.counts.items()))
        table.add_row(
            str(job.id), job.name or "-", job.owner, styled(job.state.value), counts, ago(job.submitted_at)
        )
    return table


def job_detail(job: JobView) -> Table:
    head = Table.grid(padding=(0, 2))
    cmd = job.spec.command if isinstance(job.spec.command, str) else " ".join(job.spec.command)
    for key, value in (
        ("job", f"{job.id} {job.name}".strip()),
        ("owner", job.owner),
        ("state", styled(job.state.value)),
        ("command", cmd),
        ("resources", f"{job.spec.resources.cpus:g} cpus, {job.spec.resources.mem} MiB"),
        ("submitted", ago(job.submitted_at)),
    ):
        head.add_row(f"[bold]{key}[/]", value)
    tasks = Table("TASK", "STATE", "NODE", "ATTEMPT", "EXIT", "NOTE", box=None, header_style="bold")
    for t in job.tasks:
        note = t.reason if t.state is TaskState.PENDING else t.message
        exit_code = "-" if t.exit_code is None else str(t.exit_code)
        tasks.add_row(t.id, styled(t.state.value), t.node or "-", str(t.attempt), exit_code, note)
    grid = Table.grid()
    grid.add_row(head)
    grid.add_row("")
    grid.add_row(tasks)
    shown, total = len(job.tasks), sum(job.counts.values())
    if shown < total:
        grid.add_row(f"[dim]{shown} of {total} tasks shown; --offset and --limit show others[/]")
    return grid


def nodes_table(nodes: Sequence[NodeView]) -> Table:
    table = Table(
        "NODE",
        "STATUS",
        "CPUS",
        "MEM MiB",
        "GPUS",
        "CPU%",
        "LOAD",
        "SEEN",
        "LABELS",
        box=None,
        header_style="bold",
    )
    custom = any(n.info.capacity.custom for n in nodes)
    if custom:  # a column only where some node declares resources of its own
        table.add_column("OTHER")
    for n in nodes:
        cap, used = n.info.capacity, n.allocated
        up = n.status is NodeStatus.UP
        table.add_row(
            n.name,
            styled(n.status.value) + ("" if n.connected or not up else " [dim](reconnecting)[/]"),
            f"{used.cpus:g}/{cap.cpus:g}",
            f"{used.mem}/{cap.mem}",
            f"{used.gpus}/{cap.gpus}",
            f"{n.usage.cpu_percent:.0f}" if up else "-",
            f"{n.usage.load1:.2f}" if up else "-",
            ago(n.last_seen),
            ",".join(f"{k}={v}" for k, v in sorted(n.info.labels.items())),
            *([_custom(used, cap)] if custom else []),
        )
    return table


def _custom(used: Resources, capacity: Resources) -> str:
    """`licenses 1/4,fpga 0/1`: a node's own resources, held and offered."""
    return ",".join(f"{k} {used.amount(k):g}/{v:g}" for k, v in sorted(capacity.custom.items()))


def frameworks_table(frameworks: Sequence[FrameworkView]) -> Table:
    table = Table(
        "ID",
        "NAME",
        "ROLE",
        "PRINCIPAL",
        "STATE",
        "SHARE",
        "FAIR",
        "OFFERS",
        "TASKS",
        "UNACKED",
        box=None,
        header_style="bold",
    )
    for f in frameworks:
        state = "suppressed" if f.suppressed and f.connected else "connected" if f.connected else "away"
        shares = (f"{f.share:.1%}", f"{f.fair_share:.1%}")
        counts = (str(f.offers), str(f.tasks), str(f.unacknowledged))
        table.add_row(f.id, f.name, f.role, f.principal, state, *shares, *counts)
    return table


def masters_table(masters: Sequence[MasterView]) -> Table:
    table = Table("MASTER", "URL", "ROLE", box=None, header_style="bold")
    for m in masters:
        table.add_row(m.name, m.url, "[bold green]leader[/]" if m.leader else "follower")
    return table


def audit_table(records: Sequence[AuditRecord]) -> Table:
    table = Table("ID", "WHEN", "WHO", "FROM", "WHAT", "TARGET", "STATUS", box=None, header_style="bold")
    for r in records:
        command = r.command if isinstance(r.command, str) else " ".join(r.command)
        what = f"{r.kind}: {command}" if command else r.kind
        status = "-" if r.status is None else styled_status(r.status)
        if r.nodes:  # a parallel command: how it ended on its nodes
            results = ", ".join(f"{key}: {nodes}" for key, nodes in r.results.items()) or "running"
            status = f"{status} ({results})"
        table.add_row(str(r.id), ago(r.at), r.who, r.source or "-", what, r.target or r.nodes or "-", status)
    return table


def refusals_table(records: Sequence[AuditRecord]) -> Table:
    table = Table("MINUTE", "FROM", "WHAT", "STATUS", "CALLS", box=None, header_style="bold")
    for r in records:
        status = "-" if r.status is None else styled_status(r.status)
        table.add_row(ago(r.at), r.source or "-", r.kind, status, str(r.count))
    return table


def styled_status(status: int) -> str:
    return f"[{'green' if status < 400 else 'red'}]{status}[/]"


def tokens_table(tokens: Sequence[TokenView]) -> Table:
    # The id is what revokes a token: it is never cut short, however narrow the terminal.
    table = Table(
        Column("ID", no_wrap=True, min_width=16),
        "NAME", "KIND", "ROLE", "STATE", "CREATED", "LAST USED", "EXPIRES", "USES LEFT",
        box=None,
        header_style="bold",
    )  # fmt: skip
    for t in tokens:
        state = {"active": "[green]active[/]"}.get(t.state, f"[red]{t.state}[/]")
        uses = "-" if t.kind != "bootstrap" else "any" if t.uses_left is None else str(t.uses_left)
        table.add_row(
            t.id, t.name, t.kind, t.role.value, state, ago(t.created), ago(t.last_used), when(t.expires), uses
        )
    return table


def groups_table(groups: dict[str, str]) -> Table:
    table = Table("GROUP", "NODES", box=None, header_style="bold")
    for name, nodes in groups.items():
        table.add_row(name, nodes)
    return table


def bootstrap_table(results: Sequence[NodeResult]) -> Table:
    table = Table("NODE", "RESULT", "DETAIL", box=None, header_style="bold")
    for r in results:
        verdict = "[green]ok[/]" if r.ok else f"[red]failed at {r.step}[/]"
        table.add_row(r.node, verdict, r.message.strip().splitlines()[-1] if r.message.strip() else "")
    return table
