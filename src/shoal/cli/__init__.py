"""The `shoal` command: each subcommand parses, calls the client, renders.

A subcommand's module is imported only when that subcommand runs, so that a command pays
for what it uses and no more: `shoal --help` imports none of them, `shoal jobs` not the
parallel shell, the simulator or the servers. `shoal --help` lists them from `COMMANDS`;
a test holds each summary there to its command's own help.
"""

from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass
from typing import Any

import typer
from typer.core import TyperCommand, TyperGroup

# httpx imports its own command line (click, pygments, rich's syntax and progress) unless
# that import fails; shoal never runs it, and it would cost every shoal command more than
# the rest of httpx does.
sys.modules.setdefault("httpx._main", None)


@dataclass(frozen=True, slots=True)
class Entry:
    module: str  # under shoal.cli
    attr: str  # the command's function, or a Typer app of subcommands
    summary: str  # the first paragraph of its help, as `shoal --help` lists it


COMMANDS: dict[str, Entry] = {
    "dev": Entry("daemons", "dev", "A master and local agents in one command; Ctrl-C stops them all."),
    "master": Entry("daemons", "master", "Run the master: the API, the ledger and the scheduler."),
    "agent": Entry(
        "daemons",
        "agent",
        "Run an agent: register this node with the master and run the tasks it is given.",
    ),
    "run": Entry(
        "jobs", "run", "Run a command on the cluster as if it were local: output back, exit code kept."
    ),
    "submit": Entry("jobs", "submit", "Submit a job described in a file."),
    "jobs": Entry(
        "jobs",
        "jobs",
        "List the newest jobs, a thousand at most (a user sees their own; admins and readers see all).",
    ),
    "job": Entry("jobs", "job", "Show one job and its tasks, with why pending tasks wait."),
    "logs": Entry("jobs", "logs", "Print a task's output."),
    "kill": Entry("jobs", "kill", "Kill every task of a job (SIGTERM, then SIGKILL after its grace)."),
    "history": Entry(
        "history",
        "history",
        "List tasks that have ended, newest jobs first, as Slurm's sacct: where and when each ran, "
        "how it ended, its CPU time and peak memory.",
    ),
    "nodes": Entry(
        "jobs",
        "nodes",
        "List nodes with their capacity, allocation and live load, or the groups they form.",
    ),
    "masters": Entry("jobs", "masters", "List the masters alive, the leader marked (any of them answers)."),
    "top": Entry(
        "top",
        "top",
        "A live view of the nodes, busiest first (Ctrl-C to leave; `shoal nodes --json` for scripts).",
    ),
    "rebalance": Entry(
        "moves",
        "rebalance",
        "Even the load out now (admin), or with --dry-run show what a round would move.",
    ),
    "node": Entry("nodes", "node_app", "A node's membership of the cluster (admin only)."),
    "drain": Entry("moves", "drain", "Give a node no new work and move its tasks elsewhere (admin)."),
    "undrain": Entry("moves", "undrain", "Let a drained node take work again (admin)."),
    "events": Entry(
        "moves",
        "events",
        "Migrations, newest first; with -f, every change as it happens (the event stream).",
    ),
    "frameworks": Entry(
        "jobs",
        "frameworks",
        "List frameworks with their role, dominant and fair shares, offers and tasks.",
    ),
    "exec": Entry(
        "shell",
        "exec_",
        "Run a command on many nodes at once, through their agents (admin only), or over SSH.",
    ),
    "copy": Entry(
        "copy",
        "copy",
        "Copy files to many nodes at once through their agents, checksum-verified, mode and "
        "mtime kept (admin only).",
    ),
    "audit": Entry(
        "shell",
        "audit",
        "Who changed what, from where, and how the master answered; parallel commands with "
        "where they ran and how they ended (admin only).",
    ),
    "bootstrap": Entry(
        "shell",
        "bootstrap",
        "Install shoal on machines over SSH and start an agent on each (systemd where present).",
    ),
    "sim": Entry(
        "sim",
        "sim",
        "Run a workload through the real scheduler on a simulated cluster and virtual clock.",
    ),
    "loadgen": Entry(
        "loadgen",
        "loadgen",
        "Hold this node's total CPU utilization between --min and --max with busy worker "
        "processes, adapting as other load comes and goes. Runs by hand or as a shoal task.",
    ),
    "services": Entry(
        "services", "services", "List services with their tags and how many endpoints pass, warn and fail."
    ),
    "service": Entry(
        "services",
        "service_app",
        "Show a service's endpoints (`shoal service NAME`), or register, check and deregister "
        "services shoal does not run.",
    ),
    "token": Entry("tokens", "token_app", "API tokens (admin only)."),
    "tls": Entry("tls", "tls_app", "The cluster's certificate authority and the masters' certificates."),
}


def load(name: str) -> TyperCommand | TyperGroup:
    """The command `name` as Typer builds it, its module imported now."""
    entry = COMMANDS[name]
    target = getattr(importlib.import_module(f"shoal.cli.{entry.module}"), entry.attr)
    holder = typer.Typer()
    if isinstance(target, typer.Typer):
        holder.add_typer(target, name=name)
    else:
        holder.command(name)(target)
    return typer.main.get_group(holder).commands[name]  # type: ignore[return-value]


class LazyCommand(TyperCommand):
    """A subcommand listed by its summary; its module is imported when it is run."""

    def make_context(self, info_name: str | None, args: list[str], parent: Any = None, **extra: Any) -> Any:
        # The real command parses, helps and runs: the context made here is its own.
        assert self.name is not None
        return load(self.name).make_context(info_name, args, parent=parent, **extra)


class LazyGroup(TyperGroup):
    def __init__(self, **attrs: Any) -> None:
        super().__init__(**attrs)
        for name, entry in COMMANDS.items():
            self.add_command(LazyCommand(name, help=entry.summary, add_help_option=False))


app = typer.Typer(
    name="shoal",
    cls=LazyGroup,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.callback()
def shoal() -> None:
    """shoal: a cluster resource manager and parallel shell."""


def main() -> None:
    app()
