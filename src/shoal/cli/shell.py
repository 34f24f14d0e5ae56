"""`shoal exec` and `shoal audit`: the parallel shell, with clush's options."""

from __future__ import annotations

import contextlib
import json
import random
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer
from ClusterShell.NodeSet import NodeSet
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from shoal.cli.display import Display, Style
from shoal.cli.durations import seconds
from shoal.cli.errors import fail, friendly
from shoal.cli.render import audit_table, bootstrap_table, out, print_json, refusals_table
from shoal.cli.spread import spread
from shoal.client import Client
from shoal.errors import ShoalError
from shoal.shell import ssh
from shoal.shell.bootstrap import Plan, build_wheel
from shoal.shell.bootstrap import bootstrap as run_bootstrap
from shoal.shell.gather import outcome
from shoal.shell.groups import NodeGroups, choose, resolve
from shoal.shell.protocol import Ended, ExecRequest, Output, Selection, Targets
from shoal.shell.ssh import SshOptions

NodesOpt = Annotated[list[str], typer.Option("-w", "--nodes", help="node set, e.g. node[1-64]; repeatable")]
ExcludeOpt = Annotated[list[str], typer.Option("-x", "--exclude", help="node set to leave out; repeatable")]
GroupOpt = Annotated[list[str], typer.Option("-g", "--group", help="node group, e.g. gpu, rack:r1, up")]
XGroupOpt = Annotated[list[str], typer.Option("-X", "--exclude-group", help="node group to leave out")]
AllOpt = Annotated[bool, typer.Option("-a", "--all", help="every node")]


def selection(
    nodes: list[str],
    exclude: list[str],
    group: list[str],
    exclude_group: list[str],
    everything: bool,
    pick: int | None = None,
    least_loaded: bool = False,
) -> Selection:
    if not (nodes or group or everything):
        raise fail("no nodes chosen", "choose them with -w NODESET, -g GROUP or -a", code=2)
    return Selection(
        nodes=nodes,
        exclude=exclude,
        groups=group,
        exclude_groups=exclude_group,
        all=everything,
        pick=pick,
        least_loaded=least_loaded,
    )


@friendly
def exec_(
    command: Annotated[
        list[str] | None, typer.Argument(help="the command, after --; run by the node's shell")
    ] = None,
    nodes: NodesOpt = [],  # noqa: B006
    exclude: ExcludeOpt = [],  # noqa: B006
    group: GroupOpt = [],  # noqa: B006
    exclude_group: XGroupOpt = [],  # noqa: B006
    everything: AllOpt = False,
    gather: Annotated[bool, typer.Option("-b", "--dshbak", help="gather identical outputs")] = False,
    gather_stderr: Annotated[bool, typer.Option("-B", help="like -b, with stderr gathered too")] = False,
    by_node: Annotated[bool, typer.Option("-L", help="order output by node, no headers")] = False,
    no_label: Annotated[bool, typer.Option("-N", help="no node prefix on lines")] = False,
    quiet: Annotated[bool, typer.Option("-q", "--quiet", help="fewer messages")] = False,
    max_code: Annotated[bool, typer.Option("-S", help="exit with the largest remote exit code")] = False,
    fanout: Annotated[int | None, typer.Option("-f", "--fanout", help="nodes running at once")] = None,
    connect_timeout: Annotated[float, typer.Option("-t", "--connect-timeout", help="seconds")] = 10.0,
    command_timeout: Annotated[float | None, typer.Option("-u", "--command-timeout", help="seconds")] = None,
    pick: Annotated[int | None, typer.Option("--pick", help="run on only N of the nodes")] = None,
    least_loaded: Annotated[bool, typer.Option("--least-loaded", help="--pick the least loaded")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="one record per node, for scripts")] = False,
    over_ssh: Annotated[bool, typer.Option("--ssh", help="over SSH, for machines with no agent")] = False,
    ssh_options: Annotated[str, typer.Option("-o", "--options", help="ssh options, with --ssh")] = "",
    ssh_user: Annotated[str | None, typer.Option("-l", "--user", help="ssh user, with --ssh")] = None,
    spread_file: Annotated[
        Path | None,
        typer.Option("--spread", help="a file of commands, one a line, each run once", dir_okay=False),
    ] = None,
    per_node: Annotated[
        int, typer.Option("--per-node", min=1, help="with --spread: at most K at once per node")
    ] = 1,
) -> None:
    """Run a command on many nodes at once, through their agents (admin only), or over SSH."""
    select = selection(nodes, exclude, group, exclude_group, everything, pick, least_loaded)
    if spread_file is not None:
        if command:
            raise fail("give either a command or --spread FILE, not both", code=2)
        lines = [ln.strip() for ln in spread_file.read_text().splitlines()]
        commands = [ln for ln in lines if ln and not ln.startswith("#")]
        template = ExecRequest(
            select=select, command="true", connect_timeout=connect_timeout, command_timeout=command_timeout
        )
        with Client.from_config() as client:
            raise typer.Exit(spread(client, select, commands, per_node, template, as_json))
    if not command:
        raise fail("no command given", "put it after --: shoal exec -w node[1-4] -- uptime", code=2)
    request = ExecRequest(
        select=select,
        command=" ".join(command),
        connect_timeout=connect_timeout,
        command_timeout=command_timeout,
        fanout=fanout,
    )
    style = Style(
        gather=gather or gather_stderr,
        gather_stderr=gather_stderr,
        by_node=by_node,
        label=not no_label,
        quiet=quiet,
        max_code=max_code,
        as_json=as_json,
    )
    display = Display(style)
    with Client.from_config() as client:
        if over_ssh:
            events = _over_ssh(client, request, SshOptions(ssh_options, ssh_user))
        else:
            events = client.exec(request)
        try:
            status = display.show(events)
        except KeyboardInterrupt:
            display.finish()
            left = len(display.targets.nodes) + len(display.targets.down) - len(display.gather.ended)
            sys.stderr.write(f"Keyboard interrupt ({left} nodes left; the command was stopped on them)\n")
            raise typer.Exit(130) from None
    raise typer.Exit(status)


def _over_ssh(
    client: Client, request: ExecRequest, options: SshOptions
) -> Iterator[Targets | Output | Ended]:
    """The events of running `request` over SSH. Groups and load come from the master when
    one answers; without one, node sets and groups.conf still work. The run goes into the
    master's audit log when a master answers."""
    select = request.select
    patterns = [*select.nodes, *select.exclude]
    known = []
    if select.groups or select.exclude_groups or select.all or select.pick or any("@" in p for p in patterns):
        with contextlib.suppress(ShoalError):
            known = client.nodes()
    chosen = choose(known, request.select, random.shuffle, via_agents=False)
    command = request.command if isinstance(request.command, str) else " ".join(request.command)
    record = None
    with contextlib.suppress(ShoalError):
        record = client.audit_start(command, str(NodeSet.fromlist(chosen.targets)))
    ended: list[Ended] = []
    try:
        yield Targets(nodes=chosen.targets)
        for event in ssh.run(chosen.targets, request, options):
            if isinstance(event, Ended):
                ended.append(event)
            yield event
    finally:
        if record is not None:
            with contextlib.suppress(ShoalError):
                client.audit_end(record, outcome(chosen.targets, ended))


@friendly
def audit(
    limit: Annotated[int, typer.Option("-n", "--limit", help="how many, newest first")] = 20,
    offset: Annotated[int, typer.Option(help="skip this many newest")] = 0,
    who: Annotated[
        str | None, typer.Option(help="only the calls of this token's name (or agent, anonymous)")
    ] = None,
    kind: Annotated[
        str | None, typer.Option(help="only calls of this kind: job.submit, token.revoke, exec...")
    ] = None,
    since: Annotated[str | None, typer.Option(help="only calls within this long: 30s, 10m, 1h, 7d")] = None,
    refused: Annotated[
        bool,
        typer.Option(
            "--refused", help="calls refused before the caller was known, counted a minute per address"
        ),
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON for scripts")] = False,
) -> None:
    """Who changed what, from where, and how the master answered; parallel commands with
    where they ran and how they ended (admin only)."""
    start = None if since is None else time.time() - seconds(since)
    if refused and (who or kind):
        raise typer.BadParameter("--refused lists every refusal: it takes no --who or --kind")
    with Client.from_config() as client:
        if refused:
            records = client.refusals(offset, limit, since=start)
        else:
            records = client.audit(offset, limit, who=who, kind=kind, since=start)
    if as_json:
        print_json(records)
    else:
        out.print(refusals_table(records) if refused else audit_table(records))


@friendly
def bootstrap(
    nodes: NodesOpt,
    master: Annotated[str, typer.Option(help="the master's URL, as the nodes reach it")],
    bootstrap_token: Annotated[
        str | None,
        typer.Option(envvar="SHOAL_BOOTSTRAP_TOKEN", help="a bootstrap token the nodes join with (https)"),
    ] = None,
    ca: Annotated[
        Path | None,
        typer.Option(envvar="SHOAL_CA", help="the cluster CA's certificate (ca.pem), copied to the nodes"),
    ] = None,
    cluster_token: Annotated[
        str | None,
        typer.Option(
            "--cluster-token",
            "--token",
            envvar="SHOAL_CLUSTER_TOKEN",
            help="the cluster token (the master's cluster.token), for a plain-HTTP master (--insecure)",
        ),
    ] = None,
    prefix: Annotated[str, typer.Option(help="where to install on the nodes; {node} is each one's name")] = (
        "/opt/shoal"
    ),
    wheel: Annotated[Path | None, typer.Option(help="the wheel to install; default: built here")] = None,
    python: Annotated[str, typer.Option(help="the nodes' Python (3.11+), to make the venv")] = "python3",
    pip_args: Annotated[str, typer.Option(help="extra pip arguments, e.g. --index-url for a mirror")] = "",
    label: Annotated[list[str], typer.Option(help="key=value label for the agents; repeatable")] = [],  # noqa: B006
    ssh_options: Annotated[str, typer.Option("-o", "--options", help="ssh options")] = "",
    ssh_user: Annotated[str | None, typer.Option("-l", "--user", help="ssh user")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="one record per node, for scripts")] = False,
) -> None:
    """Install shoal on machines over SSH and start an agent on each (systemd where present).

    Over https each agent joins with the bootstrap token and verifies the master with the CA."""
    token, ca_pem = _joining(master, bootstrap_token, ca, cluster_token)
    targets = resolve(NodeGroups(()), nodes)  # groups.conf groups work; the master may not exist yet
    labels = dict(item.split("=", 1) for item in label if "=" in item)
    with contextlib.ExitStack() as stack:
        if wheel is None:
            wheel = build_wheel(Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="shoal-wheel-"))))
        plan = Plan(master, token, wheel, prefix, python, pip_args, labels, ca_pem)
        results = []
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        with Progress(*columns, transient=True, disable=as_json) as progress:
            bar = progress.add_task(f"bootstrapping {targets}", total=len(targets))
            for result in run_bootstrap(targets, plan, SshOptions(ssh_options, ssh_user)):
                results.append(result)
                progress.advance(bar)
    results.sort(key=lambda r: r.node)
    if as_json:
        print(json.dumps([asdict(r) for r in results], indent=2))
    else:
        out.print(bootstrap_table(results))
    raise typer.Exit(0 if all(r.ok for r in results) else 1)


def _joining(
    master: str, bootstrap_token: str | None, ca: Path | None, cluster_token: str | None
) -> tuple[str, str]:
    """The token the agents are given and the CA's certificate ("" over plain HTTP). Over
    https a cluster token opens nothing for a node, so it is not sent, even when set."""
    if not master.startswith("https://"):
        if bootstrap_token or ca:
            raise typer.BadParameter(
                "a plain-HTTP master takes --cluster-token, not --bootstrap-token or --ca"
            )
        if not cluster_token:
            raise typer.BadParameter("a plain-HTTP master needs --cluster-token (its cluster.token)")
        return cluster_token, ""
    if not bootstrap_token or ca is None:
        raise typer.BadParameter(
            "a master serving https needs --bootstrap-token (shoal token create NAME --bootstrap) and --ca"
        )
    try:
        return bootstrap_token, ca.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise typer.BadParameter(f"cannot read the CA's certificate {ca}: {e}") from e
