"""The `shoal` command: each subcommand parses, calls the client, renders."""

from __future__ import annotations

import typer

from shoal.cli import copy, daemons, jobs, loadgen, moves, shell, sim, top

app = typer.Typer(
    name="shoal",
    help="shoal: a cluster resource manager and parallel shell.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.command()(daemons.dev)
app.command()(daemons.master)
app.command()(daemons.agent)
app.command()(jobs.run)
app.command()(jobs.submit)
app.command()(jobs.jobs)
app.command()(jobs.job)
app.command()(jobs.logs)
app.command()(jobs.kill)
app.command()(jobs.nodes)
app.command()(top.top)
app.command()(moves.rebalance)
app.command()(moves.drain)
app.command()(moves.undrain)
app.command()(moves.events)
app.command()(jobs.frameworks)
app.command("exec")(shell.exec_)
app.command()(copy.copy)
app.command()(shell.audit)
app.command()(shell.bootstrap)
app.command()(sim.sim)
app.command()(loadgen.loadgen)
app.add_typer(jobs.token_app, name="token")


def main() -> None:
    app()
