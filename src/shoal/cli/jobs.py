"""Commands that talk to a running master through the client: run, submit, jobs, ..."""

from __future__ import annotations

import json
import sys
import tomllib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Annotated, BinaryIO

import typer

from shoal.cli.errors import friendly
from shoal.cli.render import (
    frameworks_table,
    groups_table,
    job_detail,
    jobs_table,
    masters_table,
    nodes_table,
    out,
    print_json,
)
from shoal.client import Client
from shoal.model import JobSpec, JobState, Resources, RestartPolicy, Strategy, TaskState
from shoal.views import JobView

JsonOpt = Annotated[bool, typer.Option("--json", help="print JSON for scripts")]
# Output streams `shoal run` follows at once (two a task: 16 tasks), whatever the count:
# each is a connection the client's pool holds and a log the master polls. A task further
# down the list is followed when one before it ends; its output is kept, so none is lost.
FOLLOWERS = 32


def _task_id(name: str) -> str:
    """`7` names task 0 of job 7; `7.3` names task 3."""
    return name if "." in name else f"{name}.0"


@friendly
def run(
    command: Annotated[list[str], typer.Argument(help="the command and its arguments, after --")],
    cpus: Annotated[float, typer.Option(help="cpus per task")] = 1.0,
    mem: Annotated[int, typer.Option(help="MiB of memory per task")] = 256,
    count: Annotated[int, typer.Option("-n", "--count", help="how many copies to run")] = 1,
    name: Annotated[str, typer.Option(help="a name for the job")] = "",
    constraint: Annotated[
        list[str], typer.Option("-c", "--constraint", help="e.g. 'rack == r1'; repeatable")
    ] = [],  # noqa: B006
    nodes: Annotated[str | None, typer.Option("-w", "--nodes", help="a node set: node[1-4], @group")] = None,
    queue: Annotated[str, typer.Option(help="the queue to wait in")] = "default",
    priority: Annotated[int, typer.Option(help="0-1000; higher may preempt lower")] = 0,
    strategy: Annotated[Strategy | None, typer.Option(help="binpack, spread or least-loaded")] = None,
    user: Annotated[
        str | None, typer.Option(help="the Unix user it runs as [your token's first in run_as]")
    ] = None,
) -> None:
    """Run a command on the cluster as if it were local: output back, exit code kept.

    With -n, each line comes prefixed by its task's index, and the exit code is the worst
    task's. Up to 16 tasks are followed at a time, in index order: a later task's output,
    none of it lost, shows once one before it has ended.
    """
    spec = JobSpec(
        name=name or Path(command[0]).name,
        command=command,
        count=count,
        resources=Resources(cpus=cpus, mem=mem),
        restart=RestartPolicy(attempts=0),
        constraints=constraint,
        nodes=nodes,
        queue=queue,
        priority=priority,
        strategy=strategy,
        user=user,
    )
    with Client.from_config() as client:
        job_id = client.submit(spec)
        try:
            view = _stream_until_done(client, job_id, count)
        except KeyboardInterrupt:
            client.kill(job_id)
            raise
    raise typer.Exit(_exit_code(view))


def _stream_until_done(client: Client, job_id: int, count: int) -> JobView:
    """Copy every task's output here, tasks in index order, FOLLOWERS streams at a time;
    the job's final view once all have ended."""
    streams: list[tuple[str, BinaryIO]] = [("stdout", sys.stdout.buffer), ("stderr", sys.stderr.buffer)]
    pool = ThreadPoolExecutor(max_workers=min(2 * count, FOLLOWERS), thread_name_prefix="follow")
    try:
        futures = [
            pool.submit(_copy, client, f"{job_id}.{i}", stream, sink, f"{i}: " if count > 1 else "")
            for i in range(count)
            for stream, sink in streams
        ]
        for f in futures:
            f.result()
    finally:
        # On an error or Ctrl-C, streams not yet begun are dropped; those under way end
        # with their tasks, which the caller kills.
        pool.shutdown(wait=False, cancel_futures=True)
    return client.wait(job_id, poll=0.05, limit=count)


def _copy(client: Client, task_id: str, stream: str, sink: BinaryIO, prefix: str) -> None:
    pending = b""
    for chunk in client.follow(task_id, stream):
        if not prefix:
            sink.write(chunk)
            sink.flush()
            continue
        pending += chunk
        *lines, pending = pending.split(b"\n")
        sink.write(b"".join(prefix.encode() + line + b"\n" for line in lines))
        sink.flush()
    if pending:
        sink.write(prefix.encode() + pending + b"\n")
        sink.flush()


def _exit_code(job: JobView) -> int:
    """The largest task exit code, as a shell reports it (128+N for signal N)."""
    worst = 0
    for task in job.tasks:
        if task.state is TaskState.FINISHED:
            code = 0
        elif task.state is TaskState.FAILED and task.exit_code is not None:
            code = task.exit_code if task.exit_code >= 0 else 128 - task.exit_code
        else:
            print(f"shoal: task {task.id} {task.state.value}: {task.message}", file=sys.stderr)
            code = 137 if task.state is TaskState.KILLED else 1
        worst = max(worst, code)
    return worst


@friendly
def submit(
    file: Annotated[Path, typer.Argument(help="a job spec, TOML or JSON", exists=True, dir_okay=False)],
    as_json: JsonOpt = False,
) -> None:
    """Submit a job described in a file."""
    text = file.read_text()
    spec = json.loads(text) if file.suffix == ".json" else tomllib.loads(text)
    with Client.from_config() as client:
        job_id = client.submit(spec)
        if as_json:
            print_json(client.job(job_id))
        else:
            out.print(f"submitted job [bold]{job_id}[/]; follow it with `shoal job {job_id}`")


@friendly
def jobs(
    state: Annotated[JobState | None, typer.Option(help="only jobs in this state")] = None,
    owner: Annotated[str | None, typer.Option(help="only this owner's jobs")] = None,
    queue: Annotated[str | None, typer.Option(help="only this queue's jobs")] = None,
    as_json: JsonOpt = False,
) -> None:
    """List the newest jobs, a thousand at most (a user sees their own; admins and readers
    see all)."""
    with Client.from_config() as client:
        views = client.jobs(state, owner, queue)
    print_json(views) if as_json else out.print(jobs_table(views))


@friendly
def job(
    job_id: Annotated[int, typer.Argument(help="the job's id")],
    offset: Annotated[int, typer.Option(min=0, help="first task shown")] = 0,
    limit: Annotated[int, typer.Option(min=0, max=100_000, help="tasks shown")] = 1000,
    as_json: JsonOpt = False,
) -> None:
    """Show one job and its tasks, with why pending tasks wait."""
    with Client.from_config() as client:
        view = client.job(job_id, offset, limit)
    print_json(view) if as_json else out.print(job_detail(view))


@friendly
def logs(
    task: Annotated[str, typer.Argument(help="TASK as JOB.INDEX; a bare JOB means its task 0")],
    stderr: Annotated[bool, typer.Option("--stderr", help="the error stream instead of stdout")] = False,
    follow: Annotated[bool, typer.Option("-f", "--follow", help="keep printing until the task ends")] = False,
    attempt: Annotated[int | None, typer.Option(help="an earlier attempt (default: the latest)")] = None,
) -> None:
    """Print a task's output."""
    stream = "stderr" if stderr else "stdout"
    with Client.from_config() as client:
        if follow:
            for chunk in client.follow(_task_id(task), stream, attempt):
                sys.stdout.buffer.write(chunk)
                sys.stdout.buffer.flush()
        else:
            sys.stdout.buffer.write(client.logs(_task_id(task), stream, attempt=attempt))


@friendly
def kill(job_id: Annotated[int, typer.Argument(help="the job's id")], as_json: JsonOpt = False) -> None:
    """Kill every task of a job (SIGTERM, then SIGKILL after its grace)."""
    with Client.from_config() as client:
        view = client.kill(job_id)
    print_json(view) if as_json else out.print(f"killing job {job_id}")


@friendly
def nodes(
    groups: Annotated[bool, typer.Option("--groups", help="list groups: @up, @gpu, @rack:r1...")] = False,
    as_json: JsonOpt = False,
) -> None:
    """List nodes with their capacity, allocation and live load, or the groups they form."""
    with Client.from_config() as client:
        records = client.nodes()
    if groups:
        from shoal.shell.groups import NodeGroups  # ClusterShell, for this listing only

        listing = NodeGroups(records).listing()
        if as_json:
            print(json.dumps(listing, indent=2))
        else:
            out.print(groups_table(listing))
        return
    print_json(records) if as_json else out.print(nodes_table(records))


@friendly
def frameworks(as_json: JsonOpt = False) -> None:
    """List frameworks with their role, dominant and fair shares, offers and tasks."""
    with Client.from_config() as client:
        records = client.frameworks()
    print_json(records) if as_json else out.print(frameworks_table(records))


@friendly
def masters(as_json: JsonOpt = False) -> None:
    """List the masters alive, the leader marked (any of them answers)."""
    with Client.from_config() as client:
        records = client.masters()
    print_json(records) if as_json else out.print(masters_table(records))
