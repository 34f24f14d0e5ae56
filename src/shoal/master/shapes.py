"""The ledger's records in the shapes others read: the core's `Running` (what a task holds,
for preemption, backfill and shares), `Group` (a job's waiting tasks) and `Presence` (its
tags and colocation rules), the tasks a job implies as submitted, an agent's `RunSpec`
(what to run), and a run that ended as its task's history keeps it. Pure."""

from __future__ import annotations

from collections import Counter
from collections.abc import Container, Iterator, Sequence
from dataclasses import replace

from shoal.core import tags
from shoal.core.placement import Group, SpreadTarget
from shoal.core.plan import Running
from shoal.core.tags import JOB, SERVICE, Colocate, Presence
from shoal.expressions import parse
from shoal.model import Attempt, JobRecord, JobSpec, Migrate, Successor, TaskRecord, run_id
from shoal.wire import RunSpec


def consumer(job: JobRecord) -> str:
    """Whose share a job's tasks count in, within its queue: its framework's, or its owner's."""
    return job.framework or job.owner


def running(job: JobRecord, task: TaskRecord) -> Running:
    """A task holding resources, as the core weighs it (preemption, backfill, shares)."""
    spec = job.spec
    return Running(
        task_id=task.id,
        job_id=job.id,
        node=task.node or "",
        ask=spec.resources,
        user=consumer(job),
        queue=spec.queue,
        priority=spec.priority,
        preemptible=spec.preemptible,
        evicting=task.evicted_by is not None or task.kill_requested,
        started_at=task.started_at,
        time_limit=spec.time_limit,
    )


def holding(job: JobRecord, task: TaskRecord) -> Iterator[Running]:
    """What `task` holds: itself, and the new copy a make-before-break move is starting
    (held until one of the two ends; never evicted on its own, so not preemptible)."""
    yield running(job, task)
    if (copy := task.successor) is not None:
        yield replace(running(job, task), node=copy.node, preemptible=False, started_at=copy.since)


def presence(spec: JobSpec) -> Presence | None:
    """The job's part in who is where: its name, services, static ports, colocation rules."""
    return tags.presence(
        spec.name,
        (s.name for s in spec.services),
        (p.static for p in spec.ports if p.static is not None),
        (
            Colocate(
                (JOB, c.job) if c.job is not None else (SERVICE, c.service or ""), float(c.weight), c.hard
            )
            for c in spec.colocation
        ),
    )


def group(
    job: JobRecord,
    ids: tuple[str, ...],
    tasks: Sequence[TaskRecord],
    nodes: Container[str],
    present: Presence | None = None,
) -> Group:
    """The job's waiting tasks `ids` as the core places them: `tasks` are all the job's tasks
    (where they run counts toward its per-node limits), `nodes` the nodes the table knows,
    `present` the job's `presence`."""
    spec = job.spec
    placed: Counter[str] = Counter()
    if spec.max_per_node or spec.max_per or spec.spread:
        for task in tasks:
            if task.state.active and task.node is not None:
                placed[task.node] += 1
            if task.successor is not None and task.state.active:
                placed[task.successor.node] += 1
    by_id = {t.id: t for t in tasks}
    return Group(
        job_id=job.id,
        tasks=ids,
        ask=spec.resources,
        user=job.owner,
        queue=spec.queue,
        priority=spec.priority,
        preemptible=spec.preemptible,
        strategy=spec.strategy,
        constraints=tuple(parse(c) for c in spec.constraints),
        nodes=frozenset(job.node_names) if job.node_names is not None else None,
        max_per_node=spec.max_per_node,
        max_per=tuple(spec.max_per.items()),
        affinities=tuple((parse(a.expr), float(a.weight)) for a in spec.affinities),
        spread=_spread(spec),
        gang=spec.gang,
        time_limit=spec.time_limit,
        placed=tuple(placed.items()),
        nominated=tuple((t, n) for t in ids if (n := by_id[t].nominated) is not None and n in nodes),
        presence=present,
    )


def _spread(spec: JobSpec) -> SpreadTarget | None:
    if spec.spread is None:
        return None
    return SpreadTarget(spec.spread.attribute, tuple((v, p / 100.0) for v, p in spec.spread.targets.items()))


def implied_tasks(job: JobRecord) -> list[TaskRecord]:
    """The tasks a job has as submitted: all pending, first attempt."""
    return [TaskRecord(id=f"{job.id}.{i}", job_id=job.id, index=i) for i in range(job.spec.count)]


def task_id(job_id: int, index: int) -> str:
    """The id of a job's task `index`, as `implied_tasks` names it (a job has every task it
    will have from its submission)."""
    return f"{job_id}.{index}"


def ended_run(task: TaskRecord) -> Attempt:
    """The run of `task` that has just ended, as the task's history keeps it when it runs again."""
    return Attempt(
        attempt=task.attempt,
        node=task.node,
        state=task.state,
        exit_code=task.exit_code,
        message=task.message,
        started_at=task.started_at,
        finished_at=task.finished_at,
        cpu_seconds=task.cpu_seconds,
        peak_mem=task.peak_mem,
    )


def run_spec(spec: JobSpec, task: TaskRecord, copy: Successor | None = None) -> RunSpec:
    """What an agent runs for `task` (or for its new copy, in a make-before-break move)."""
    attempt = copy.attempt if copy is not None else task.attempt
    ports = copy.ports if copy is not None else task.ports
    gpus = copy.gpus if copy is not None else task.gpus
    env = spec.task_env(task.index) if spec.env else {}
    env["SHOAL_JOB_ID"] = str(task.job_id)
    env["SHOAL_TASK_ID"] = task.id
    env["SHOAL_TASK_INDEX"] = str(task.index)
    env["SHOAL_ATTEMPT"] = str(attempt)
    for name, port in ports.items():
        env[f"SHOAL_PORT_{name.upper()}"] = str(port)
    if gpus:
        env["CUDA_VISIBLE_DEVICES"] = env["SHOAL_GPUS"] = ",".join(map(str, gpus))
    checkpoint = spec.migrate is Migrate.CHECKPOINT
    return RunSpec(
        run_id=run_id(task.id, attempt),
        task_id=task.id,
        attempt=attempt,
        argv=spec.argv(task.index),
        env=env,
        workdir=spec.workdir,
        resources=spec.resources,
        kill_grace=spec.kill_grace,
        time_limit=spec.time_limit,
        checkpoint=checkpoint,
        restore=task.checkpoint if checkpoint else None,
        checks=spec.checks,
        shutdown_delay=spec.shutdown_delay or 0.0,
        user=spec.user,
    )
