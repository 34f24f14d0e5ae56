"""`shoal token`: make, list and revoke API and bootstrap tokens (admin only)."""

from __future__ import annotations

from typing import Annotated

import typer

from shoal.cli.durations import seconds
from shoal.cli.errors import friendly
from shoal.cli.render import out, print_json, tokens_table
from shoal.client import Client
from shoal.model import Role

JsonOpt = Annotated[bool, typer.Option("--json", help="print JSON for scripts")]
token_app = typer.Typer(help="API tokens (admin only).", no_args_is_help=True)


@token_app.command("create")
@friendly
def token_create(
    name: Annotated[str, typer.Argument(help="who the token is for")],
    role: Annotated[Role, typer.Option(help="admin, user or reader")] = Role.USER,
    roles: Annotated[
        list[str],
        typer.Option("--framework-role", "--roles", help="a role (queue) its frameworks may use; repeatable"),
    ] = [],  # noqa: B006
    ttl: Annotated[
        str | None,
        typer.Option(
            help="expires after this long: 30s, 10m, 1h, 7d (default: never; --bootstrap: 1d, 7d at most)"
        ),
    ] = None,
    bootstrap: Annotated[
        bool, typer.Option("--bootstrap", help="a token that only lets nodes join, not one for the API")
    ] = False,
    uses: Annotated[
        int | None, typer.Option(min=1, help="with --bootstrap: joins it allows (default: any number)")
    ] = None,
    metrics: Annotated[
        bool, typer.Option("--metrics", help="a token that only reads GET /metrics (Prometheus), not the API")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Make a token bound to a name and a role; it is shown only once."""
    if bootstrap and metrics:
        raise typer.BadParameter("--bootstrap and --metrics make different tokens: give one")
    lifetime = None if ttl is None else seconds(ttl)
    kind = "bootstrap" if bootstrap else "metrics" if metrics else "api"
    with Client.from_config() as client:
        made = client.create_token(name, role, tuple(roles), ttl=lifetime, kind=kind, uses=uses)
    if as_json:
        print_json(made)
        return
    what = f"{kind} token" if kind != "api" else f"{made.role.value} token"
    out.print(f"{what} {made.id} for {made.name}; it is shown only once:")
    print(made.token)


@token_app.command("list")
@friendly
def token_list(as_json: JsonOpt = False) -> None:
    """List tokens, oldest first: id, name, kind, role, when made, last used and expiring, uses left."""
    with Client.from_config() as client:
        views = client.tokens()
    print_json(views) if as_json else out.print(tokens_table(views))


@token_app.command("revoke")
@friendly
def token_revoke(
    token_id: Annotated[
        str, typer.Argument(metavar="ID", help="the token's id, as `shoal token list` shows")
    ],
    as_json: JsonOpt = False,
) -> None:
    """Revoke a token from now on: calls with it are refused."""
    with Client.from_config() as client:
        view = client.revoke_token(token_id)
    print_json(view) if as_json else out.print(f"token {view.id} of {view.name} is revoked")
