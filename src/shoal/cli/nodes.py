"""`shoal node`: a node's membership of the cluster (admin only)."""

from __future__ import annotations

from typing import Annotated

import typer

from shoal.cli.errors import friendly
from shoal.cli.render import out, print_json
from shoal.client import Client

node_app = typer.Typer(help="A node's membership of the cluster (admin only).", no_args_is_help=True)


@node_app.command("remove")
@friendly
def remove(
    node: Annotated[str, typer.Argument(help="the node to take out")],
    as_json: Annotated[bool, typer.Option("--json", help="print JSON for scripts")] = False,
) -> None:
    """Take a node out of the cluster: its certificate is refused from now on, its agent is
    put out (its runs stop), and its tasks run elsewhere as their restart policy says. It is
    listed no more until it joins again, with a new bootstrap token."""
    with Client.from_config() as client:
        removed = client.remove_node(node)
    if as_json:
        print_json(removed)
        return
    lost = (
        f"its tasks {', '.join(removed.tasks)} are lost, to run elsewhere"
        if removed.tasks
        else "it held no task"
    )
    revoked = "its certificate is refused from now on; " if removed.identity else ""
    out.print(f"{node} removed: {revoked}{lost}")
