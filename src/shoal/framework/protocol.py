"""The offer API: what frameworks send (calls) and receive (events), and the ledger's
records of frameworks and of their tasks' status updates.

A framework opens `POST /v1/frameworks/subscribe` and reads a stream of events, one JSON
object a line (`type` names it), for as long as it is connected. It acts by posting calls
to `POST /v1/frameworks/{id}/call`; each is answered at once, with a 4xx naming the field
and the reason when it cannot be done. Names follow Mesos's scheduler API, so people who
wrote a Mesos framework recognise every step.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, field_validator, model_validator

from shoal.cstrings import CString
from shoal.model import Command, JobSpec, Resources, TaskState, UserName, env_names

_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
_ROLE = r"^[a-z][a-z0-9_-]{0,31}$"
MAX_FAILOVER = 7 * 86_400.0


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# --- subscription ----------------------------------------------------------------------


class Subscribe(_Message):
    """Open a framework's event stream; with `framework_id`, take up an existing framework
    (after a disconnect or a master restart) and its tasks."""

    name: str = Field(min_length=1, max_length=128)
    role: str = Field("default", pattern=_ROLE, description="the queue whose weight and limits govern it")
    framework_id: str | None = Field(None, max_length=64)
    failover_timeout: float = Field(
        60.0, ge=0, le=MAX_FAILOVER, description="seconds its tasks outlive a lost connection"
    )


# --- calls -----------------------------------------------------------------------------


class TaskLaunch(_Message):
    """One task to start on an offer: its name is the framework's own id for it."""

    name: str = Field(pattern=_NAME)
    command: Command = Field(description="a shell string, or an argv list run as is")
    resources: Resources = Field(default_factory=Resources)
    env: dict[str, CString] = Field(default_factory=dict)
    workdir: CString | None = None
    ports: list[str] = Field(default_factory=list, max_length=32)
    kill_grace: float = Field(5.0, ge=0, le=3600)
    time_limit: float | None = Field(None, gt=0, le=365 * 86_400)
    user: UserName | None = Field(
        None, description="the Unix user it runs as (default: as for jobs of the framework's principal)"
    )

    @field_validator("env")
    @classmethod
    def _env_names(cls, value: dict[str, str]) -> dict[str, str]:
        return env_names(value)  # here, not only as a job: the error names its field

    @model_validator(mode="after")
    def _valid_as_a_job(self) -> TaskLaunch:
        self.spec("default")  # the command, env, workdir and ports rules of every job
        return self

    def spec(self, role: str) -> JobSpec:
        """The task as a one-task job of the ledger (validated as any job is)."""
        return JobSpec(
            name=self.name,
            command=self.command,
            resources=self.resources,
            env=self.env,
            workdir=self.workdir,
            ports=self.ports,
            kill_grace=self.kill_grace,
            time_limit=self.time_limit,
            queue=role,
            user=self.user,
        )


_OFFER_IDS = Field(min_length=1, max_length=10_000)


class Accept(_Message):
    """Launch `tasks` on offers of one node; what they leave unused goes back to the pool
    (and is not offered to this framework again for `refuse_seconds`)."""

    type: Literal["accept"] = "accept"
    offer_ids: Annotated[list[str], _OFFER_IDS]
    tasks: list[TaskLaunch] = Field(default_factory=list, max_length=10_000)
    refuse_seconds: float = Field(0.0, ge=0, le=86_400)

    @field_validator("tasks")
    @classmethod
    def _distinct(cls, value: list[TaskLaunch]) -> list[TaskLaunch]:
        names = [t.name for t in value]
        if len(set(names)) != len(names):
            raise ValueError("task names repeat")
        return value


class Decline(_Message):
    type: Literal["decline"] = "decline"
    offer_ids: Annotated[list[str], _OFFER_IDS]
    refuse_seconds: float = Field(5.0, ge=0, le=86_400)


class Suppress(_Message):
    """Stop sending offers (outstanding ones are rescinded) until REVIVE."""

    type: Literal["suppress"] = "suppress"


class Revive(_Message):
    """Send offers again, and forget every filter set by earlier declines."""

    type: Literal["revive"] = "revive"


class Kill(_Message):
    type: Literal["kill"] = "kill"
    task: str = Field(pattern=_NAME)


class Acknowledge(_Message):
    """Status updates were handled: they are not delivered again."""

    type: Literal["acknowledge"] = "acknowledge"
    uuids: list[Annotated[str, Field(min_length=1, max_length=128)]] = Field(min_length=1, max_length=10_000)


class Reconcile(_Message):
    """Ask for the latest state of these tasks (none named: of all the framework's live
    tasks). Answers come as updates without a uuid, which need no acknowledgement."""

    type: Literal["reconcile"] = "reconcile"
    tasks: list[Annotated[str, Field(pattern=_NAME)]] = Field(default_factory=list, max_length=100_000)


class Teardown(_Message):
    """End the framework: its tasks are killed and its stream closed."""

    type: Literal["teardown"] = "teardown"


Call = Annotated[
    Accept | Decline | Suppress | Revive | Kill | Acknowledge | Reconcile | Teardown,
    Field(discriminator="type"),
]
CALL: TypeAdapter[Call] = TypeAdapter(Call)


class Accepted(BaseModel):
    """ACCEPT's answer: the ledger's job id of each task launched."""

    jobs: dict[str, int] = Field(default_factory=dict)


# --- events ----------------------------------------------------------------------------


class OfferInfo(BaseModel):
    id: str
    node: str
    hostname: str
    attributes: dict[str, str]
    resources: Resources


class TaskStatus(BaseModel):
    """A task's state as a framework hears it. Updates with a `uuid` are delivered until
    acknowledged; reconciliation answers carry none."""

    task: str
    state: TaskState
    job_id: int
    node: str | None = None
    exit_code: int | None = None
    message: str = ""
    uuid: str | None = None
    at: float = 0.0


class Subscribed(BaseModel):
    type: Literal["subscribed"] = "subscribed"
    framework_id: str
    heartbeat_interval: float


class Offers(BaseModel):
    type: Literal["offers"] = "offers"
    offers: list[OfferInfo]


class Rescind(BaseModel):
    type: Literal["rescind"] = "rescind"
    offer_id: str


class Update(BaseModel):
    type: Literal["update"] = "update"
    status: TaskStatus


class Failure(BaseModel):
    """A node was lost: its tasks' LOST updates follow."""

    type: Literal["failure"] = "failure"
    node: str


class Heartbeat(BaseModel):
    type: Literal["heartbeat"] = "heartbeat"


class Error(BaseModel):
    """The framework was ended by the master (torn down, or replaced by a newer subscription)."""

    type: Literal["error"] = "error"
    message: str


Told = Subscribed | Offers | Rescind | Update | Failure | Error  # what the ledger tells a framework
Event = Annotated[Told | Heartbeat, Field(discriminator="type")]
EVENT: TypeAdapter[Event] = TypeAdapter(Event)


# --- the ledger's records --------------------------------------------------------------


class FrameworkRecord(BaseModel):
    """A framework as the ledger keeps it (and the store persists it)."""

    id: str
    name: str
    principal: str
    role: str
    failover_timeout: float
    registered_at: float
    suppressed: bool = False
    connected: bool = False
    disconnected_at: float | None = None
    removed: bool = False
