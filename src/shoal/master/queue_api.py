"""`GET /v1/queues`: each queue's policy beside what it holds now, as the scheduler counts it.

A queue's share is its dominant share of the schedulable cluster (the largest fraction of
any resource its running tasks hold), the quantity weighted DRF equalizes once divided by
the queue's weight; its guarantee and limit are bounds on that same share. Users are listed
with their dominant share inside each queue (what a `fair` queue orders its users by).
Every figure is read from the ledger's usage book and indexes: no walk over finished jobs.
A user sees the queues' totals, and among their users only themselves.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
from fastapi import APIRouter
from pydantic import BaseModel, Field

from shoal.core.fairness import Shares
from shoal.master.deps import CallerDep, MasterDep
from shoal.master.server import Master
from shoal.model import Resources

router = APIRouter()


class QueueUser(BaseModel):
    user: str
    share: float = Field(description="the user's dominant share of the cluster within the queue")
    running: int = Field(description="the user's tasks in the queue holding resources")


class QueueView(BaseModel):
    name: str
    configured: bool = Field(description="named in the master's settings (else: the defaults)")
    order: str
    weight: float
    guarantee: float
    limit: float
    backfill: str
    share: float = Field(description="dominant share of the schedulable cluster its tasks hold")
    weighted_share: float = Field(description="share / weight: what weighted DRF equalizes")
    allocated: Resources = Field(description="what its running tasks hold")
    running: int = Field(description="tasks holding resources")
    pending: int = Field(description="tasks waiting to be placed")
    jobs_pending: int = Field(description="jobs with tasks waiting")
    users: list[QueueUser] = Field(default_factory=list)


@router.get("/v1/queues", response_model=list[QueueView])
async def queues(master: MasterDep, caller: CallerDep) -> list[QueueView]:
    """Every queue (those configured, and any other something runs or waits in), with its
    policy, its share of the cluster and how many tasks run and wait in it. A user token
    sees its own entry among a queue's users, no one else's (Caller.may_see)."""
    views = queue_views(master)
    for view in views:
        view.users = [u for u in view.users if caller.may_see(u.user)]
    return views


def queue_views(master: Master) -> list[QueueView]:
    ledger, policy = master.state.ledger, master.state.policy
    running: Counter[tuple[str, str]] = Counter()
    for task in ledger.active_tasks():
        job = ledger.jobs.get(task.job_id)
        if job is not None:
            running[(job.spec.queue, job.owner)] += 1
    pending: Counter[str] = Counter()
    jobs_pending: Counter[str] = Counter()
    for job_id, waiting in ledger.pending.items():
        job = ledger.jobs.get(job_id)
        if waiting and job is not None:
            pending[job.spec.queue] += len(waiting)
            jobs_pending[job.spec.queue] += 1
    book = ledger.usage
    weights = {name: q.weight for name, q in policy.queues.items()}
    shares = Shares(ledger.table, book, weights, policy.user_weights)
    names = sorted(set(policy.queues) | set(book.by_queue) | set(pending) | {q for q, _ in running})
    views = []
    for name in names:
        q = policy.queue(name)
        share = shares.share(name)
        users = sorted({u for (queue, u) in [*book.by_user, *running] if queue == name})
        views.append(
            QueueView(
                name=name,
                configured=name in policy.queues,
                order=q.order,
                weight=q.weight,
                guarantee=q.guarantee,
                limit=q.limit,
                backfill=q.backfill,
                share=round(share, 6),
                weighted_share=round(share / q.weight, 6),
                allocated=_resources(master, book.by_queue.get(name)),
                running=sum(n for (queue, _), n in running.items() if queue == name),
                pending=pending[name],
                jobs_pending=jobs_pending[name],
                users=[
                    QueueUser(user=u, share=round(shares.dominant(name, u), 6), running=running[(name, u)])
                    for u in users
                ],
            )
        )
    return views


def _resources(master: Master, row: np.ndarray | None) -> Resources:
    """A usage row as Resources: padded to the table's dimensions, and never below zero
    (what is added and taken back again may leave -1e-12 behind)."""
    table = master.state.ledger.table
    full = np.zeros(len(table.dims))
    if row is not None:
        full[: min(len(row), len(full))] = row[: len(full)]
    return table.resources(np.maximum(full, 0.0))
