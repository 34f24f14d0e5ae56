"""`shoal tls`: the cluster's authority and the masters' certificates, on a master's host.

`init` once per cluster, `cert` for another master or to reissue one (a master loads a
certificate reissued in place without a restart), `show` to see what is there. Keys are
written mode 0600 and never printed.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from shoal.cli.errors import fail, friendly

if TYPE_CHECKING:
    from shoal.tls import Made, TlsFiles

tls_app = typer.Typer(
    help="The cluster's certificate authority and the masters' certificates.", no_args_is_help=True
)

DirOpt = Annotated[
    Path | None,
    typer.Option("--dir", help="the master's TLS directory [the master's state_dir/tls]", file_okay=False),
]
NameOpt = Annotated[
    list[str], typer.Option("--name", help="a host name clients reach the master by; repeatable")
]
AddressOpt = Annotated[
    list[str], typer.Option("--address", help="an IP address clients reach the master at; repeatable")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="print JSON for scripts")]


def _master_dir(given: Path | None) -> Path:
    from shoal.config import MasterSettings

    return given if given is not None else MasterSettings().tls_files().root


def _names(names: list[str], addresses: list[str]) -> list[str]:
    from shoal.tls import master_names

    for address in addresses:
        try:
            ipaddress.ip_address(address)
        except ValueError:
            raise fail(f"--address {address!r} is no IP address", "a host name goes in --name", 2) from None
    return master_names([*names, *addresses])


def _names_now(files: TlsFiles) -> list[str]:
    """The names of the master's certificate in `files`, to reissue it as it is; this
    host's when there is none."""
    from shoal.tls import describe

    return describe(files.cert.read_bytes()).names if files.cert.exists() else _names([], [])


@tls_app.command("init")
@friendly
def init(
    directory: DirOpt = None,
    name: NameOpt = [],  # noqa: B006
    address: AddressOpt = [],  # noqa: B006
    as_json: JsonOpt = False,
) -> None:
    """Make the cluster's authority (unless the directory has one) and this master's certificate."""
    from shoal.tls import TlsFiles, init_master_files

    files = TlsFiles(_master_dir(directory).resolve())
    made = init_master_files(files, _names(name, address))
    _written(files, made, [*name, *address], as_json)
    if not made.certificate and (name or address) and not as_json:
        from shoal.cli.render import out

        out.print("[dim]kept the master's certificate there: `shoal tls cert` issues one with these names[/]")


@tls_app.command("cert")
@friendly
def cert(
    directory: DirOpt = None,
    ca_dir: Annotated[
        Path | None,
        typer.Option(
            help="the TLS directory that holds the authority (ca.pem, ca.key) [--dir]", file_okay=False
        ),
    ] = None,
    name: NameOpt = [],  # noqa: B006
    address: AddressOpt = [],  # noqa: B006
    as_json: JsonOpt = False,
) -> None:
    """Issue a master's certificate from an existing authority: another master's, or one again.

    In place, it keeps the names it had (unless --name, --address); a running master serves it in seconds."""
    from shoal.tls import Authority, Made, TlsFiles, write_master_files

    files = TlsFiles(_master_dir(directory).resolve())
    authority_files = TlsFiles(ca_dir.resolve()) if ca_dir is not None else files
    if not authority_files.ca_key.exists():
        raise fail(
            f"no authority in {authority_files.root} (ca.key)",
            "make one with `shoal tls init`, or give the directory that has it with --ca-dir",
        )
    authority = Authority.load(authority_files)
    if files.ca_cert.exists() and files.ca_cert.read_bytes() != authority.pem():
        raise fail(
            f"{files.root} holds another authority's ca.pem",
            "a master's certificate must come from its cluster's authority: check --dir and --ca-dir",
        )
    names = _names(name, address) if name or address else _names_now(files)
    write_master_files(files, authority, names)
    _written(files, Made(authority=False, certificate=True), [*name, *address], as_json)


@tls_app.command("show")
@friendly
def show(directory: DirOpt = None, as_json: JsonOpt = False) -> None:
    """The authority's and this master's certificates: subjects, names, serials, dates."""
    from shoal.tls import TlsFiles, describe

    files = TlsFiles(_master_dir(directory).resolve())
    found = {what: path for what, path in (("ca", files.ca_cert), ("master", files.cert)) if path.exists()}
    if not found:
        raise fail(f"no certificates in {files.root}", "make them with `shoal tls init`")
    described = {
        what: asdict(describe(path.read_bytes())) | {"file": str(path)} for what, path in found.items()
    }
    if as_json:
        print(json.dumps({"dir": str(files.root), "ca_key": files.ca_key.exists(), **described}, indent=2))
        return
    from shoal.cli.render import out

    for what, info in described.items():
        out.print(f"[bold]{what}[/]  {info['file']}")
        out.print(f"  subject    {info['subject']}")
        if info["issuer"] != info["subject"]:
            out.print(f"  issuer     {info['issuer']}")
        if info["names"]:
            out.print(f"  names      {', '.join(info['names'])}")
        out.print(f"  serial     {info['serial']}")
        out.print(f"  valid      {_day(info['not_before'])} to {_day(info['not_after'])}")
    if not files.ca_key.exists():
        out.print(f"[dim]no ca.key in {files.root}: this master cannot sign nodes' certificates[/]")


def _written(files: TlsFiles, made: Made, given: list[str], as_json: bool) -> None:
    import socket

    from shoal.tls import describe

    info = describe(files.cert.read_bytes())
    host = next((n for n in [*given, socket.gethostname()] if n in info.names), "localhost")
    if as_json:
        summary = {
            "dir": str(files.root),
            "ca": str(files.ca_cert),
            "authority": "made" if made.authority else "kept",
            "cert": str(files.cert),
            "certificate": "made" if made.certificate else "kept",
            "names": info.names,
            "serial": info.serial,
            "not_after": info.not_after,
        }
        print(json.dumps(summary, indent=2))
        return
    from shoal.cli.render import out

    out.print(f"authority  {files.ca_cert} ({'made' if made.authority else 'kept'})")
    out.print(
        f"master     {files.cert} ({'made' if made.certificate else 'kept'}), valid until "
        f"{_day(info.not_after)}, for {', '.join(info.names)}"
    )
    out.print("")
    out.print(f"clients    copy {files.ca_cert} to each client and set, in its client file,")
    out.print(f'           ca = "/path/to/ca.pem"  (or SHOAL_CA), with url = "https://{host}:8470"')
    out.print(
        "agents     copy it to each node too: ca = /path/to/ca.pem in the agent's settings (or SHOAL_CA),"
    )
    out.print("           and join with a bootstrap token (SHOAL_BOOTSTRAP_TOKEN)")
    out.print(
        "[dim]the keys (ca.key, master.key) stay here, mode 0600; ca.key is the cluster's to keep safe[/]"
    )


def _day(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
