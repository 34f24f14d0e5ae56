"""What the REST API answers: the shapes the client parses back."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

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
        return cls(**{name: getattr(task, name) for name in _TASK_FIELDS}, reason=reason)


_TASK_FIELDS = tuple(f.name for f in fields(TaskRecord))  # `fields` is slow: a job's view has many


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
        return cls(
            id=job.id,
            name=job.spec.name,
            owner=job.owner,
            state=job_state(job, tasks),
            submitted_at=job.submitted_at,
            spec=job.spec,
            counts=tally(tasks),
        )

    @classmethod
    def detail(cls, job: JobRecord, tasks: list[TaskRecord], waiting: str, page: slice) -> JobView:
        """The job with a page of its tasks, and why its pending ones wait."""
        view = cls.summary(job, tasks)
        view.waiting = waiting
        view.tasks = [TaskView.of(t, waiting if t.state is TaskState.PENDING else "") for t in tasks[page]]
        return view


def tally(tasks: list[TaskRecord]) -> dict[str, int]:
    """How many of `tasks` are in each state."""
    counts: dict[str, int] = {}
    for t in tasks:
        counts[t.state.value] = counts.get(t.state.value, 0) + 1
    return counts


class Submitted(BaseModel):
    id: int


TokenKind = Literal["api", "bootstrap", "metrics"]
MAX_TOKEN_TTL = 10 * 365 * 86_400  # seconds a token may be made to last, at most
# A bootstrap token makes nodes: it lasts a day unless told otherwise (as kubeadm's), and a
# week at most, so one left in a script or a shell history goes stale.
BOOTSTRAP_TTL = 86_400
MAX_BOOTSTRAP_TTL = 7 * 86_400


class TokenRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._@-]+$")
    role: Role = Role.USER
    roles: tuple[Annotated[str, Field(pattern=r"^[a-z][a-z0-9_-]{0,31}$")], ...] = Field(
        (), max_length=64, description="roles (queues) its frameworks may subscribe in"
    )
    kind: TokenKind = Field(
        "api", description="api: calls the API; bootstrap: lets nodes join, only; metrics: GET /metrics, only"
    )
    ttl: float | None = Field(
        None,
        gt=0,
        le=MAX_TOKEN_TTL,
        validate_default=True,
        description="seconds until it expires (default: never; a bootstrap token's: a day, a week at most)",
    )
    uses: int | None = Field(
        None, ge=1, le=1_000_000, description="a bootstrap token's joins allowed (default: any number)"
    )

    @field_validator("ttl")
    @classmethod
    def _bootstrap_tokens_expire(cls, ttl: float | None, info: ValidationInfo) -> float | None:
        if info.data.get("kind") != "bootstrap":
            return ttl
        if ttl is None:
            return BOOTSTRAP_TTL
        if ttl > MAX_BOOTSTRAP_TTL:
            raise ValueError(f"a bootstrap token lasts {MAX_BOOTSTRAP_TTL // 86_400} days at most")
        return ttl

    @field_validator("uses")
    @classmethod
    def _only_bootstrap_tokens_count_uses(cls, uses: int | None, info: ValidationInfo) -> int | None:
        if uses is not None and info.data.get("kind") != "bootstrap":
            raise ValueError("only a bootstrap token (kind bootstrap) has a number of uses")
        return uses


class TokenCreated(BaseModel):
    id: str = Field(description="its public id: in listings, and what revokes it")
    name: str
    kind: TokenKind = "api"
    role: Role
    roles: tuple[str, ...] = ()
    expires: float | None = None
    uses: int | None = None
    token: str = Field(description="the secret, shown this once")


class TokenView(BaseModel):
    """A token as listings show it: never its secret."""

    id: str
    name: str
    kind: TokenKind
    role: Role
    roles: tuple[str, ...] = ()
    created: float | None
    expires: float | None
    last_used: float | None
    uses_left: int | None = Field(description="a bootstrap token's joins left; None: any number")
    revoked: float | None = None
    state: Literal["active", "expired", "revoked", "used"]


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


class HistoryEntry(BaseModel):
    """One task that has ended, as `shoal history` lists it (Slurm's sacct): its last run."""

    job_id: int
    name: str = Field(description="its job's name")
    task_id: str
    index: int
    owner: str = Field(description="who submitted its job (the API token's name)")
    run_as: str | None = Field(description="the Unix user it ran as (None: its agent's task_user)")
    queue: str
    node: str | None = Field(description="where its last run was (None: it never ran)")
    submitted_at: float
    started_at: float | None
    finished_at: float | None
    state: TaskState
    exit_code: int | None = Field(description="the status it exited with (None: a signal, or unknown)")
    signal: str | None = Field(description="the signal that ended it: SIGKILL, SIGTERM...")
    cpu_seconds: float | None = Field(description="CPU time its last run used (None: not measured)")
    peak_mem: int | None = Field(description="MiB: the most memory its last run held at once")
    attempts: int = Field(description="how many times it ran (re-runs and moves included)")
    message: str = ""


class HistoryPage(BaseModel):
    entries: list[HistoryEntry]
    next: str | None = Field(
        None, description="where the next page starts, when there may be more: pass it as `after`"
    )
