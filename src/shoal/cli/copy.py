"""`shoal copy`: push files to a node set, or pull one file from each node (`--rcopy`)."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

from shoal.cli.display import Display, Style
from shoal.cli.errors import fail, friendly
from shoal.cli.shell import AllOpt, ExcludeOpt, GroupOpt, NodesOpt, XGroupOpt, selection
from shoal.client import Client
from shoal.shell.protocol import CopyFile, CopyRequest, Ended, Fetched, FetchRequest, Output, Targets

Event = Targets | Output | Ended | Fetched


def _files(sources: list[Path]) -> list[tuple[Path, str]]:
    """(local path, path under the destination) of every file the sources hold."""
    found: list[tuple[Path, str]] = []
    for source in sources:
        if source.is_dir():
            for root, _, names in os.walk(source):
                for name in sorted(names):
                    local = Path(root) / name
                    found.append((local, str(Path(source.name) / local.relative_to(source))))
        elif source.is_file():
            found.append((source, source.name))
        else:
            raise fail(f"{source}: no such file or directory", code=2)
    return found


@friendly
def copy(
    paths: Annotated[list[str], typer.Argument(help="SRC... DEST; with --rcopy: a node's file, a local dir")],
    nodes: NodesOpt = [],  # noqa: B006
    exclude: ExcludeOpt = [],  # noqa: B006
    group: GroupOpt = [],  # noqa: B006
    exclude_group: XGroupOpt = [],  # noqa: B006
    everything: AllOpt = False,
    rcopy: Annotated[bool, typer.Option("--rcopy", help="pull SRC from each node into DEST/<node>")] = False,
    fanout: Annotated[int | None, typer.Option("-f", "--fanout", help="nodes at work at once")] = None,
    connect_timeout: Annotated[float, typer.Option("-t", "--connect-timeout", help="seconds")] = 10.0,
    command_timeout: Annotated[float | None, typer.Option("-u", "--command-timeout", help="seconds")] = None,
    quiet: Annotated[bool, typer.Option("-q", "--quiet", help="no progress bar")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="one record per node, for scripts")] = False,
) -> None:
    """Copy files to many nodes at once through their agents, checksum-verified, mode and
    mtime kept (admin only)."""
    if len(paths) < 2:
        raise fail("give SRC... DEST", "e.g. shoal copy -w node[1-4] ./app.conf /etc/app/", code=2)
    *sources, dest = paths
    select = selection(nodes, exclude, group, exclude_group, everything)
    timeouts = {"connect_timeout": connect_timeout, "command_timeout": command_timeout, "fanout": fanout}
    style = Style(quiet=quiet, as_json=as_json)
    with Client.from_config() as client, _progress(quiet or as_json) as progress:
        if rcopy:
            if len(sources) != 1:
                raise fail("--rcopy pulls one file at a time", code=2)
            target = Path(dest)
            target.mkdir(parents=True, exist_ok=True)
            events = client.rcopy(FetchRequest(select=select, path=sources[0], **timeouts))
            events = _pulled(client, events, target)
        else:
            files = _files([Path(s) for s in sources])
            uploads = progress.add_task("uploading", total=len(files))
            manifest = []
            for local, under in files:
                info = local.stat()
                blob = client.upload(local)
                mode = info.st_mode & 0o7777
                manifest.append(
                    CopyFile(path=under, blob=blob, size=info.st_size, mode=mode, mtime=info.st_mtime)
                )
                progress.advance(uploads)
            into = len(sources) > 1 or any(Path(s).is_dir() for s in sources) or dest.endswith("/")
            events = client.copy(CopyRequest(select=select, dest=dest, files=manifest, into=into, **timeouts))
        display = Display(style)
        display.show(_counted(events, progress, "pulling" if rcopy else "copying"))
    failed = sum(1 for e in display.gather.ended.values() if e.failure or e.code)
    raise typer.Exit(1 if failed else 0)


def _progress(hidden: bool) -> Progress:
    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), transient=True, disable=hidden
    )


def _counted(events: Iterable[Event], progress: Progress, what: str) -> Iterator[Event]:
    """Pass the events on, advancing a bar of nodes done."""
    bar = None
    for event in events:
        if isinstance(event, Targets):
            bar = progress.add_task(what, total=len(event.nodes) + len(event.down))
        elif isinstance(event, Ended) and bar is not None:
            progress.advance(bar)
        yield event


def _pulled(client: Client, events: Iterable[Event], target: Path) -> Iterator[Event]:
    """Download each node's file into `target/<node>` as it is announced."""
    for event in events:
        if isinstance(event, Fetched):
            local = target / event.node
            client.download(event.blob, local)
            os.chmod(local, event.mode)
            os.utime(local, (event.mtime, event.mtime))
        yield event
