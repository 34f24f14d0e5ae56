"""`shoal exec --spread FILE`: a list of commands spread over a node set, least-loaded first."""

from __future__ import annotations

import json
import sys
import time
from collections import deque
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from shoal.cli.errors import fail
from shoal.cli.render import out
from shoal.client import Client
from shoal.shell.gather import Gather
from shoal.shell.groups import choose, load
from shoal.shell.protocol import Ended, ExecRequest, Selection
from shoal.shell.spread import Slots


@dataclass(frozen=True, slots=True)
class Result:
    index: int
    command: str
    node: str
    code: int | None
    failure: str
    duration: float
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.code == 0 and not self.failure


def _one(client: Client, template: ExecRequest, index: int, command: str, node: str) -> Result:
    request = template.model_copy(update={"select": Selection(nodes=[node]), "command": command})
    gather = Gather()
    for event in client.exec(request):
        if event.kind == "output":
            gather.feed(event.node, event.stream, event.data)
        elif isinstance(event, Ended):
            gather.end(event)
    ended = gather.ended.get(node, Ended(node=node, failure="lost"))
    return Result(
        index,
        command,
        node,
        ended.code,
        ended.failure,
        ended.duration,
        gather.output(node, "stdout").decode(errors="replace"),
        gather.output(node, "stderr").decode(errors="replace"),
    )


def spread(
    client: Client,
    select: Selection,
    commands: list[str],
    per_node: int,
    template: ExecRequest,
    as_json: bool,
) -> int:
    """Run each of `commands` once on some node of `select`; returns the exit status."""
    known = client.nodes()
    views = {n.name: n for n in known}
    targets = choose(known, select, lambda names: None).targets
    if not targets:
        raise fail("no node of the selection is up", "see which are with `shoal nodes`")
    slots = Slots(sorted(targets, key=lambda name: load(views.get(name))), per_node)
    waiting = deque(enumerate(commands))
    running: dict[Future[Result], str] = {}
    results: list[Result] = []
    began = time.monotonic()
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with (
        ThreadPoolExecutor(max_workers=len(targets) * per_node) as pool,
        Progress(*columns, transient=True, disable=as_json) as progress,
    ):
        bar = progress.add_task(f"spreading over {len(targets)} nodes", total=len(commands))
        while waiting or running:
            while waiting and (node := slots.take()) is not None:
                index, command = waiting.popleft()
                running[pool.submit(_one, client, template, index, command, node)] = node
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                slots.give_back(running.pop(future))
                result = future.result()
                results.append(result)
                progress.advance(bar)
                if not as_json:
                    _print(result)
    results.sort(key=lambda r: r.index)
    if as_json:
        print(json.dumps([asdict(r) for r in results], indent=2))
    else:
        out.print(_summary(results, time.monotonic() - began))
    return 0 if all(r.ok for r in results) else 1


def _print(result: Result) -> None:
    for stream, text in ((sys.stdout, result.stdout), (sys.stderr, result.stderr)):
        for line in text.splitlines():
            stream.write(f"{result.node}: {line}\n")
    if not result.ok:
        why = result.failure or f"exit code {result.code}"
        sys.stderr.write(f"shoal: {result.node}: command {result.index + 1} ({result.command!r}): {why}\n")


def _summary(results: list[Result], wall: float) -> Table:
    table = Table(
        "NODE",
        "COMMANDS",
        "FAILED",
        "BUSY",
        box=None,
        header_style="bold",
        title=f"{len(results)} commands in {wall:.1f} s",
    )
    per_node: dict[str, list[Result]] = {}
    for r in results:
        per_node.setdefault(r.node, []).append(r)
    for node, runs in sorted(per_node.items()):
        failed = sum(1 for r in runs if not r.ok)
        table.add_row(
            node,
            str(len(runs)),
            f"[red]{failed}[/]" if failed else "0",
            f"{sum(r.duration for r in runs):.1f} s",
        )
    return table
