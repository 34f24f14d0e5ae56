"""What the REST API answers: the shapes the client parses back."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Annotated

from pydantic import BaseModel, Field

from shoal.model import (
    JobRecord,
    JobSpec,
    JobState,
    NodeRecord,
    Resources,
    Role,
    TaskRecord,
    TaskState,
    job_state,
)


@dataclass(slots=True)
class TaskView(TaskRecord):
    reason: str = ""  # why a pending task is not placed yet

    @classmethod
    def of(cls, task: TaskRecord, reason: str) -> TaskView:
        return cls(**{f.name: getattr(task, f.name) for f in fields(TaskRecord)}, reason=reason)


class NodeView(NodeRecord):
    allocated: Resources = Field(description="what the tasks placed on the node hold")
    tasks: int = Field(0, description="tasks placed on the node and not ended")


class JobView(BaseModel):
    id: int
    name: str
    owner: str
    state: JobState
    submitted_at: float
    spec: JobSpec
    counts: dict[str, int]
    waiting: str = Field("", description="why the job's pending tasks wait")
    tasks: list[TaskView] = Field(default_factory=list)

    @classmethod
    def summary(cls, job: JobRecord, tasks: list[TaskRecord]) -> JobView:
        """The job with counts of its tasks per state, without the tasks themselves."""
        counts: dict[str, int] = {}
        for t in tasks:
            counts[t.state.value] = counts.get(t.state.value, 0) + 1
        return cls(
            id=job.id,
            name=job.spec.name,
            owner=job.owner,
            state=job_state(job, tasks),
            submitted_at=job.submitted_at,
            spec=job.spec,
            counts=counts,
        )

    @classmethod
    def detail(cls, job: JobRecord, tasks: list[TaskRecord], waiting: str, page: slice) -> JobView:
        """The job with a page of its tasks, and why its pending ones wait."""
        view = cls.summary(job, tasks)
        view.waiting = waiting
        view.tasks = [TaskView.of(t, waiting if t.state is TaskState.PENDING else "") for t in tasks[page]]
        return view


class Submitted(BaseModel):
    id: int


class TokenRequest(BaseModel):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._@-]+$")
    role: Role = Role.USER
    roles: tuple[Annotated[str, Field(pattern=r"^[a-z][a-z0-9_-]{0,31}$")], ...] = Field(
        (), max_length=64, description="roles (queues) its frameworks may subscribe in"
    )


class TokenCreated(BaseModel):
    name: str
    role: Role
    roles: tuple[str, ...] = ()
    token: str


class FieldError(BaseModel):
    field: str
    reason: str


class ErrorBody(BaseModel):
    error: str
    fields: list[FieldError] = Field(default_factory=list)


class MasterView(BaseModel):
    """One master alive, as `shoal masters` shows it."""

    name: str
    url: str
    leader: bool


class FrameworkView(BaseModel):
    """One framework as `shoal frameworks` shows it."""

    id: str
    name: str
    principal: str
    role: str
    connected: bool
    suppressed: bool
    share: float = Field(description="dominant share of the cluster its tasks and offers hold")
    fair_share: float = Field(description="its weighted fair share among the frameworks asking now")
    offers: int
    tasks: int
    unacknowledged: int


class PlannedMove(BaseModel):
    """A move the rebalancer would make now (`shoal rebalance --dry-run`)."""

    task_id: str
    source: str
    target: str
    reason: str
