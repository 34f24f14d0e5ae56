"""The service registry: `shoal services`, `shoal service NAME`, and registrations from
outside (`shoal service register|pass|warn|fail|deregister`).

`shoal service NAME` shows a service; a first word that is one of the subcommands runs it
instead (`shoal service show NAME` shows a service named like a subcommand).
"""

from __future__ import annotations

import contextlib
import json
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table
from typer.core import TyperGroup

from shoal.checks import CheckStatus
from shoal.cli.errors import fail, friendly
from shoal.cli.render import ago, out, print_json
from shoal.client import ApiError, Client, Verdict
from shoal.services import Endpoint, ServiceSummary

JsonOpt = Annotated[bool, typer.Option("--json", help="print JSON for scripts")]
RegistrationArg = Annotated[str, typer.Argument(help="the registration's id")]
_STATUS_STYLE = {CheckStatus.PASSING: "green", CheckStatus.WARNING: "yellow", CheckStatus.CRITICAL: "red"}
_LISTED = "`shoal services` lists what is registered"
_HINTS = {
    403: "registering and checking need a user or admin token (a reader's lists only); "
    "a registration is changed by its owner or an admin",
    404: _LISTED,
}


class _ServiceGroup(TyperGroup):
    """`shoal service NAME [...]` is `shoal service show NAME [...]`."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h"):
            args = ["show", *args]
        return super().parse_args(ctx, args)


service_app = typer.Typer(
    cls=_ServiceGroup,
    help="Show a service's endpoints (`shoal service NAME`), or register, check and "
    "deregister services shoal does not run.",
    no_args_is_help=True,
)


@contextlib.contextmanager
def _hinted() -> Iterator[None]:
    """The master's refusals, with what to do next for the registry's own cases."""
    try:
        yield
    except ApiError as e:
        if e.status == 422 and any(f"{f.field}:" not in e.message for f in e.fields):
            reasons = "; ".join(f"{f.field}: {f.reason}" for f in e.fields)
            raise fail(f"invalid request: {reasons}", code=2) from None
        if (hint := _HINTS.get(e.status)) is None:
            raise
        raise fail(e.message, "" if hint in e.message else hint, code=2) from None


def _status(status: CheckStatus) -> str:
    return f"[{_STATUS_STYLE[status]}]{status.value}[/]"


def _count(n: int, status: CheckStatus) -> str:
    return _status(status).replace(status.value, str(n)) if n else "0"


def services_table(summaries: list[ServiceSummary]) -> Table:
    table = Table("NAME", "TAGS", "PASSING", "WARNING", "CRITICAL", box=None, header_style="bold")
    for s in summaries:
        table.add_row(
            s.name,
            ",".join(s.tags),
            _count(s.passing, CheckStatus.PASSING),
            _count(s.warning, CheckStatus.WARNING),
            _count(s.critical, CheckStatus.CRITICAL),
        )
    return table


def endpoints_table(endpoints: list[Endpoint]) -> Table:
    table = Table("ID", "NODE", "ADDRESS", "STATUS", "SINCE", "OUTPUT", box=None, header_style="bold")
    for e in endpoints:
        since = ago(e.since) if e.since else "-"
        node = e.node or f"({e.kind})"
        table.add_row(e.id, node, f"{e.address}:{e.port}", _status(e.status), since, e.output)
    return table


@friendly
def services(as_json: JsonOpt = False) -> None:
    """List services with their tags and how many endpoints pass, warn and fail."""
    with Client.from_config() as client:
        summaries = client.services()
    print_json(summaries) if as_json else out.print(services_table(summaries))


@service_app.command("show")
@friendly
def show(
    name: Annotated[str, typer.Argument(help="the service")],
    every: Annotated[bool, typer.Option("--all", help="failing and warning endpoints too")] = False,
    tag: Annotated[str | None, typer.Option(help="only endpoints with this tag")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Show a service's endpoints (passing ones, unless --all), in the order answers give them."""
    with Client.from_config() as client, _hinted():
        endpoints, _ = client.service(name, all=every, tag=tag)
    if as_json:
        print_json(endpoints)
    elif endpoints:
        out.print(endpoints_table(endpoints))
    else:
        which = "endpoints" if every else "passing endpoints (--all shows failing ones)"
        out.print(f"{name} has no {which}{f' tagged {tag}' if tag else ''}; {_LISTED}")


def _meta(pairs: list[str]) -> dict[str, str]:
    meta = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise typer.BadParameter(f"{pair!r} is not KEY=VALUE", param_hint="--meta")
        meta[key] = value
    return meta


def _from_file(path: Path) -> dict[str, Any]:
    text = path.read_text()
    try:
        body = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except (ValueError, tomllib.TOMLDecodeError) as e:
        raise fail(f"{path}: {e}", "give a registration in TOML or JSON", code=2) from None
    if not isinstance(body, dict):
        raise fail(f"{path}: not a registration (a table of fields)", code=2)
    return body


@service_app.command("register")
@friendly
def register(
    file: Annotated[
        Path | None,
        typer.Argument(help="a registration in TOML or JSON; options given override it", dir_okay=False),
    ] = None,
    registration_id: Annotated[
        str | None, typer.Option("--id", help="unique; registering it again replaces it")
    ] = None,
    name: Annotated[str | None, typer.Option(help="the service: a DNS label")] = None,
    address: Annotated[str | None, typer.Option(help="the IPv4 address it answers at")] = None,
    port: Annotated[int | None, typer.Option(help="the port it answers at")] = None,
    tag: Annotated[list[str], typer.Option(help="a tag; repeatable")] = [],  # noqa: B006
    meta: Annotated[list[str], typer.Option(help="KEY=VALUE; repeatable")] = [],  # noqa: B006
    ttl: Annotated[float | None, typer.Option(help="seconds it stays without a pass (default 30)")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Register a service shoal does not run; it lapses unless passed within its TTL."""
    body = _from_file(file) if file is not None else {}
    given = {"id": registration_id, "name": name, "address": address, "port": port, "ttl": ttl}
    body.update({k: v for k, v in given.items() if v is not None})
    if tag:
        body["tags"] = tag
    if meta:
        body["meta"] = {**body.get("meta", {}), **_meta(meta)}
    with Client.from_config() as client, _hinted():
        index = client.register(body)
    if as_json:
        print(json.dumps({"id": body.get("id"), "index": index}))
        return
    rid, lapse = body.get("id"), body.get("ttl", 30)
    out.print(
        f"registered {rid} as {body.get('name')}; it lapses unless "
        f"`shoal service pass {rid}` within every {lapse:g}s"
    )


def _check(registration_id: str, verdict: Verdict, note: str) -> None:
    with Client.from_config() as client, _hinted():
        client.check(registration_id, verdict, note)
    out.print(f"{registration_id}: {verdict}{f' ({note})' if note else ''}")


Note = Annotated[str, typer.Option(help="shown as the check's output")]


@service_app.command("pass")
@friendly
def pass_(registration_id: RegistrationArg, note: Note = "") -> None:
    """Pass a registration's TTL check: it serves, and has its TTL again."""
    _check(registration_id, "pass", note)


@service_app.command("warn")
@friendly
def warn(registration_id: RegistrationArg, note: Note = "") -> None:
    """Warn on a registration's TTL check: it has its TTL again, but leaves passing answers."""
    _check(registration_id, "warn", note)


@service_app.command("fail")
@friendly
def fail_(registration_id: RegistrationArg, note: Note = "") -> None:
    """Fail a registration's TTL check: it has its TTL again, but leaves passing answers."""
    _check(registration_id, "fail", note)


@service_app.command("deregister")
@friendly
def deregister(registration_id: RegistrationArg) -> None:
    """Remove a registration at once."""
    with Client.from_config() as client, _hinted():
        client.deregister(registration_id)
    out.print(f"deregistered {registration_id}")
