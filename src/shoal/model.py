"""Domain types shared by the core, the master, the agent and the clients.

Specs arrive from people and are validated here (pydantic gives every error a field
path). Records are what the master's ledger holds and the store persists. Task states
and their legal transitions live in one table, `TRANSITIONS`, which the master's state
machine consults for every change.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationInfo,
    field_validator,
    model_validator,
)

from shoal.checks import TASK_CHECK, CheckResult, HealthCheck
from shoal.cstrings import CString, nul_free
from shoal.expressions import parse
from shoal.placing import NAME, Affinity, Colocation, PortSpec, Spread
from shoal.services import IPv4, ServiceSpec

MAX_CPUS = 4096.0
MAX_MEM_MB = 64 * 1024 * 1024  # 64 TiB
MAX_COUNT = 100_000


class Migrate(str, enum.Enum):
    """How a task may be moved (`migrate = ...` in its spec)."""

    RESTART = "restart"  # stop it, start it elsewhere
    CHECKPOINT = "checkpoint"  # signal it to save its state, move the state, restart it there
    MAKE_BEFORE_BREAK = "make-before-break"  # start the new copy, wait until healthy, stop the old
    NEVER = "never"


class Resources(BaseModel):
    """A vector of countable resources: cpus (fractional), memory and disk in MiB, GPUs, and
    custom scalars a node declares (`licenses = 4`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    cpus: float = Field(1.0, ge=0, le=MAX_CPUS)
    mem: int = Field(256, ge=0, le=MAX_MEM_MB, description="MiB")
    disk: int = Field(0, ge=0, le=MAX_MEM_MB, description="MiB")
    gpus: int = Field(0, ge=0, le=1024)
    custom: dict[str, float] = Field(default_factory=dict, description="custom scalar resources")

    @field_validator("custom")
    @classmethod
    def _custom_names(cls, value: dict[str, float]) -> dict[str, float]:
        for name, amount in value.items():
            if not NAME.fullmatch(name) or name in RESOURCE_NAMES:
                raise ValueError(f"{name!r} is not a custom resource name (lowercase, digits, _)")
            if not 0 <= amount <= 1e12:
                raise ValueError(f"{name} must be between 0 and 1e12")
        return value

    def __add__(self, other: Resources) -> Resources:
        return self._combine(other, 1)

    def __sub__(self, other: Resources) -> Resources:
        return self._combine(other, -1)

    def _combine(self, other: Resources, sign: int) -> Resources:
        custom = dict(self.custom)
        for name, amount in other.custom.items():
            custom[name] = round(custom.get(name, 0.0) + sign * amount, 6)
        return Resources.model_construct(
            cpus=round(self.cpus + sign * other.cpus, 6),
            mem=self.mem + sign * other.mem,
            disk=self.disk + sign * other.disk,
            gpus=self.gpus + sign * other.gpus,
            custom={k: v for k, v in custom.items() if v},
        )

    def amount(self, name: str) -> float:
        return getattr(self, name) if name in RESOURCE_NAMES else self.custom.get(name, 0.0)

    def shortfall(self, free: Resources) -> str | None:
        """The first dimension in which `free` cannot hold `self`, or None if it fits."""
        for name in (*RESOURCE_NAMES, *self.custom):
            if self.amount(name) > free.amount(name) + 1e-9:
                return name
        return None


RESOURCE_NAMES = ("cpus", "mem", "disk", "gpus")
NO_RESOURCES = Resources(cpus=0, mem=0, disk=0, gpus=0)


class RestartPolicy(BaseModel):
    """How often a failed or lost task runs again, and how long to wait first."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    attempts: int = Field(0, ge=0, le=1000, description="re-runs after the first run")
    delay: float = Field(1.0, ge=0, le=86_400, description="seconds before a re-run")


Command = Annotated[str | Annotated[list[str], Field(min_length=1)], AfterValidator(nul_free)]


class Strategy(str, enum.Enum):
    """Where tasks go among the nodes that can take them."""

    BINPACK = "binpack"  # the fullest node: keeps whole nodes free for big work
    SPREAD = "spread"  # the emptiest node: fewer tasks share a failure
    LEAST_LOADED = "least-loaded"  # the node with the lowest live CPU utilization


QUEUE_NAME = r"^[a-z][a-z0-9_-]{0,31}$"

# A Unix user name as POSIX has it (the portable filename characters, no leading hyphen),
# starting with a letter or underscore as useradd requires, at most 32 characters.
_USER_NAME = r"^[A-Za-z_][A-Za-z0-9._-]{0,31}$"


def _user_name(value: str) -> str:
    if not re.fullmatch(_USER_NAME, value):
        raise ValueError(
            f"{value[:40]!r} is not a Unix user name: at most 32 letters, digits, '.', '_' or '-', "
            "starting with a letter or '_'"
        )
    return value


UserName = Annotated[str, AfterValidator(_user_name), Field(json_schema_extra={"pattern": _USER_NAME})]


class JobSpec(BaseModel):
    """What a person submits: the same fields in TOML and in JSON over the API."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field("", max_length=128)
    command: Command = Field(description="a shell string, or an argv list run as is")
    env: dict[str, CString] = Field(default_factory=dict)
    workdir: CString | None = Field(None, description="absolute; default: the task's sandbox")
    resources: Resources = Field(default_factory=Resources)
    count: int = Field(1, ge=1, le=MAX_COUNT, description="tasks; {index} is substituted")
    restart: RestartPolicy = Field(default_factory=RestartPolicy)
    kill_grace: float = Field(5.0, ge=0, le=3600, description="seconds from SIGTERM to SIGKILL")
    time_limit: float | None = Field(
        None,
        gt=0,
        le=365 * 86_400,
        description="seconds a task may run; lets it backfill ahead of a reservation",
    )
    queue: str = Field("default", pattern=QUEUE_NAME)
    priority: int = Field(0, ge=0, le=1000, description="higher runs first and may preempt lower")
    preemptible: bool = True
    strategy: Strategy | None = Field(None, description="default: the cluster's")
    constraints: list[str] = Field(default_factory=list, description="e.g. 'rack == r1', 'kernel >= 5.10'")
    nodes: str | None = Field(None, description="a node set: node[1-20], @group")
    max_per_node: int | None = Field(None, ge=1)
    max_per: dict[str, int] = Field(default_factory=dict, description="attribute -> most tasks per value")
    affinities: list[Affinity] = Field(default_factory=list)
    spread: Spread | None = None
    gang: bool = Field(False, description="start all tasks together or none")
    ports: list[PortSpec] = Field(
        default_factory=list,
        max_length=32,
        description="named ports each task is given: SHOAL_PORT_<NAME>; a name alone, or {name, static}",
    )
    migrate: Migrate = Field(Migrate.RESTART, description="how the rebalancer and drains may move its tasks")
    health: HealthCheck | None = Field(
        None, description="when a task serves (make-before-break waits for it)"
    )
    services: list[ServiceSpec] = Field(
        default_factory=list, max_length=16, description="what each task offers: NAME.service.shoal"
    )
    shutdown_delay: float | None = Field(
        None,
        ge=0,
        le=3600,
        description="seconds from leaving the registry to SIGTERM, so requests under way finish "
        "(default: the master's setting for jobs with services, 0 for others)",
    )
    colocation: list[Colocation] = Field(default_factory=list, max_length=16)
    user: UserName | None = Field(
        None,
        description="the Unix user its tasks run as (default: the submitter's first in the master's "
        "run_as, else each agent's task_user)",
    )

    @property
    def port_names(self) -> list[str]:
        return [p.name for p in self.ports]

    @property
    def checks(self) -> dict[str, HealthCheck]:
        """The checks each task runs, by name (`checks.TASK_CHECK`: the job's own)."""
        named = {s.name: s.check for s in self.services if s.check is not None}
        return {TASK_CHECK: self.health, **named} if self.health is not None else named

    @model_validator(mode="after")
    def _ports_named(self) -> JobSpec:
        names = self.port_names
        if self.health is not None and self.health.port is not None and self.health.port not in names:
            raise ValueError(f"health: port {self.health.port!r} is not one of the job's ports")
        if self.migrate is Migrate.MAKE_BEFORE_BREAK and not self.checks:
            raise ValueError("migrate: make-before-break needs a health check to know the new copy serves")
        return self

    @field_validator("ports", mode="before")
    @classmethod
    def _port_shorthand(cls, value: object) -> object:
        # "http" is short for {name = "http"}
        return [{"name": p} if isinstance(p, str) else p for p in value] if isinstance(value, list) else value

    @field_validator("ports")
    @classmethod
    def _ports_distinct(cls, value: list[PortSpec]) -> list[PortSpec]:
        if len({p.name for p in value}) != len(value):
            raise ValueError("port names repeat")
        static = [p.static for p in value if p.static is not None]
        if len(set(static)) != len(static):
            raise ValueError("static ports repeat")
        return value

    @field_validator("services")
    @classmethod
    def _services_named_and_distinct(
        cls, value: list[ServiceSpec], info: ValidationInfo
    ) -> list[ServiceSpec]:
        names = [s.name for s in value]
        if len(set(names)) != len(names):
            raise ValueError(f"service names repeat: {sorted({n for n in names if names.count(n) > 1})}")
        ports = [p.name for p in info.data.get("ports", [])]
        for i, service in enumerate(value):
            if service.port not in ports:
                raise ValueError(f"{i}.port: {service.port!r} is not one of the job's ports {ports}")
            check = service.check
            if check is not None and check.port is not None and check.port not in ports:
                raise ValueError(f"{i}.check: port {check.port!r} is not one of the job's ports {ports}")
        return value

    @field_validator("command")
    @classmethod
    def _command_not_blank(cls, value: Command) -> Command:
        if isinstance(value, str) and not value.strip():
            raise ValueError("must not be empty")
        return value

    @field_validator("constraints")
    @classmethod
    def _constraints_parse(cls, value: list[str]) -> list[str]:
        for expr in value:
            parse(expr)
        return value

    @field_validator("max_per")
    @classmethod
    def _max_per_positive(cls, value: dict[str, int]) -> dict[str, int]:
        if any(v < 1 for v in value.values()):
            raise ValueError("each limit must be at least 1")
        return value

    @field_validator("workdir")
    @classmethod
    def _workdir_absolute(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith("/"):
            raise ValueError("must be an absolute path")
        return value

    @field_validator("env")
    @classmethod
    def _env_names(cls, value: dict[str, str], info: ValidationInfo) -> dict[str, str]:
        return env_names(value, reserved=not (info.context or {}).get("stored"))

    def argv(self, index: int) -> list[str]:
        """The command line of task `index`: `{index}` substituted, strings run by sh."""
        if isinstance(self.command, str):
            return ["/bin/sh", "-c", _substitute(self.command, index)]
        return [_substitute(arg, index) for arg in self.command]

    def task_env(self, index: int) -> dict[str, str]:
        return {k: _substitute(v, index) for k, v in self.env.items()}


RESERVED_ENV = "SHOAL_"


def env_names(value: dict[str, str], reserved: bool = True) -> dict[str, str]:
    """`value`, the variables of a task, if their names are good; ValueError at the first not.
    SHOAL_ names are shoal's: the master's and the agent's, set for each task."""
    for key in value:
        if not key or "=" in key or "\0" in key:
            raise ValueError(f"invalid variable name {key!r}")
        if reserved and key.startswith(RESERVED_ENV):
            raise ValueError(
                f"{key}: names beginning {RESERVED_ENV} are those shoal sets for a task "
                "(SHOAL_TASK_ID, SHOAL_SANDBOX, SHOAL_PORT_<NAME>, ...): name it otherwise"
            )
    return value


def _substitute(text: str, index: int) -> str:
    # Plain replacement rather than str.format: shell commands are full of braces.
    return text.replace("{index}", str(index))


class TaskState(str, enum.Enum):
    PENDING = "pending"
    ASSIGNED = "assigned"
    RUNNING = "running"
    FINISHED = "finished"
    FAILED = "failed"
    KILLED = "killed"
    LOST = "lost"
    PREEMPTED = "preempted"
    MIGRATED = "migrated"  # stopped to run again elsewhere (rebalancing, drain)

    @property
    def terminal(self) -> bool:
        return self in TERMINAL

    @property
    def active(self) -> bool:
        """Holds resources on a node."""
        return self in ACTIVE


ACTIVE = frozenset({TaskState.ASSIGNED, TaskState.RUNNING})
TERMINAL = frozenset(
    {
        TaskState.FINISHED,
        TaskState.FAILED,
        TaskState.KILLED,
        TaskState.LOST,
        TaskState.PREEMPTED,
        TaskState.MIGRATED,
    }
)

# Legal task transitions. FAILED and LOST go back to PENDING when the restart policy
# grants another attempt, PREEMPTED and MIGRATED always do; FINISHED and KILLED are final.
TRANSITIONS: dict[TaskState, frozenset[TaskState]] = {
    TaskState.PENDING: frozenset({TaskState.ASSIGNED, TaskState.KILLED}),
    TaskState.ASSIGNED: TERMINAL | {TaskState.RUNNING},
    TaskState.RUNNING: TERMINAL,
    TaskState.FINISHED: frozenset(),
    TaskState.KILLED: frozenset(),
    TaskState.FAILED: frozenset({TaskState.PENDING}),
    TaskState.LOST: frozenset({TaskState.PENDING}),
    TaskState.PREEMPTED: frozenset({TaskState.PENDING}),
    TaskState.MIGRATED: frozenset({TaskState.PENDING}),
}


class NodeStatus(str, enum.Enum):
    UP = "up"
    DOWN = "down"


NODE_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"  # letters, digits, '.', '_', '-'; not first '.', '_', '-'
NodeName = Annotated[str, Field(min_length=1, max_length=253, pattern=NODE_NAME)]


class NodeInfo(BaseModel):
    """What an agent reports about its node when it registers."""

    model_config = ConfigDict(frozen=True)

    name: NodeName
    hostname: str
    capacity: Resources
    labels: dict[str, str] = Field(default_factory=dict)
    attributes: dict[str, str] = Field(default_factory=dict)
    gpu_models: list[str] = Field(default_factory=list)
    port_range: tuple[int, int] = (20000, 32000)  # where tasks' dynamic ports come from
    address: IPv4 | Literal[""] = ""  # the address its tasks are reached at (its services' endpoints)


class RunUsage(BaseModel):
    """What one run has used, measured by its agent (its cgroup, or its process tree)."""

    # No NaN nor infinity: a single one would poison every smoothed load after it.
    model_config = ConfigDict(frozen=True, allow_inf_nan=False)

    cpu_seconds: float = Field(0.0, ge=0)  # since it started
    rss: int = Field(0, ge=0)  # MiB now


class Usage(BaseModel):
    """Live utilization of a node, measured by its agent."""

    model_config = ConfigDict(frozen=True, allow_inf_nan=False)

    cpu_percent: float = Field(0.0, ge=0, le=100)  # of the whole node
    mem_used: int = Field(0, ge=0)
    load1: float = Field(0.0, ge=0)
    runs: dict[str, RunUsage] = Field(default_factory=dict)  # by run id


class TaskLoad(BaseModel):
    """A task's use as the master judges it: CPU smoothed over heartbeats."""

    cpu_percent: float = 0.0  # of one core: 150 is a core and a half
    rss: int = 0  # MiB


class NodeRecord(BaseModel):
    """The ledger's view of one node: what it reported, whether it is alive, what it holds."""

    info: NodeInfo
    status: NodeStatus = NodeStatus.UP
    connected: bool = True
    last_seen: float = 0.0
    usage: Usage = Field(default_factory=Usage)
    drained: bool = False  # takes no new work; its tasks are being moved off
    drain_deadline: float | None = None  # then even tasks that never migrate are moved
    load: float = Field(0.0, description="CPU utilization in percent, smoothed over heartbeats")
    history: list[float] = Field(default_factory=list, description="the smoothed load, oldest first")
    # Its record stays (the node table's rows are never removed), but it is listed no more
    # until it joins and registers again.
    removed: float | None = Field(
        None, description="when an admin took it out of the cluster (`shoal node remove`)"
    )

    @property
    def name(self) -> str:
        return self.info.name


class Attempt(BaseModel):
    """One finished run of a task, kept in the task's history."""

    attempt: int
    node: str | None
    state: TaskState
    exit_code: int | None = None
    message: str = ""
    started_at: float | None = None
    finished_at: float | None = None
    cpu_seconds: float | None = None  # CPU time the run used in all, as its agent measured at its end
    peak_mem: int | None = None  # MiB: the most memory it held at once (None: not measured)


@dataclass(slots=True)
class Successor:
    """A new copy of a running task starting on another node (make-before-break): it takes
    over once its health check passes, and only then is the old copy stopped."""

    node: str
    attempt: int
    since: float
    gpus: list[int] = field(default_factory=list)
    ports: dict[str, int] = field(default_factory=dict)
    checks: dict[str, CheckResult] = field(default_factory=dict)  # what its checks last said


@dataclass(slots=True)
class TaskRecord:
    """The ledger's view of one task of a job (the current attempt plus history).

    A plain dataclass, not a pydantic model: the ledger creates and changes these by the
    hundred thousand, and reads them back through `TASK_RECORD` (validated) from the store."""

    id: str
    job_id: int
    index: int
    state: TaskState = TaskState.PENDING
    attempt: int = 0
    node: str | None = None
    exit_code: int | None = None
    message: str = ""
    kill_requested: bool = False
    evicted_by: int | None = None  # the job this task is being preempted for
    nominated: str | None = None  # the node preemption is making room on for it
    not_before: float = 0.0
    started_at: float | None = None
    finished_at: float | None = None
    cpu_seconds: float | None = None  # of the run that ended, as in `Attempt`
    peak_mem: int | None = None
    history: list[Attempt] = field(default_factory=list)
    gpus: list[int] = field(default_factory=list)  # device indices on its node
    ports: dict[str, int] = field(default_factory=dict)
    load: TaskLoad | None = None  # while it runs: what it uses
    migrating: str | None = None  # being stopped to run again on this node ("": wherever it fits)
    moved_at: float | None = None  # when it was last moved
    checkpoint: str | None = None  # the blob of the state it saved when last stopped (checkpoint mode)
    checks: dict[str, CheckResult] = field(default_factory=dict)  # what its checks last said, by name
    successor: Successor | None = None  # its new copy, while a make-before-break move is under way

    @property
    def run_id(self) -> str:
        return run_id(self.id, self.attempt)

    @property
    def next_attempt(self) -> int:
        """The number of the task's next run: above every run it had, a new copy given up
        included, so no run id is ever used twice."""
        return 1 + max([self.attempt, *(a.attempt for a in self.history)])


TASK_RECORD = TypeAdapter(TaskRecord)


def run_id(task_id: str, attempt: int) -> str:
    """The agent-side name of one attempt of a task: unique across restarts."""
    return f"{task_id}.{attempt}"


def parse_run_id(run: str) -> tuple[str, int]:
    """The task id and attempt named by a run id."""
    task_id, _, attempt = run.rpartition(".")
    return task_id, int(attempt)


class JobState(str, enum.Enum):
    PENDING = "pending"
    RUNNING = "running"
    COMPLETE = "complete"
    FAILED = "failed"
    KILLED = "killed"


class JobRecord(BaseModel):
    id: int
    owner: str
    spec: JobSpec
    submitted_at: float
    killed: bool = False
    node_names: list[str] | None = None  # `spec.nodes` as resolved when it was submitted
    framework: str | None = None  # the framework that launched it (its one task), if one did

    @field_validator("spec", mode="before")
    @classmethod
    def _as_kept(cls, value: object) -> object:
        # A job kept before SHOAL_ names were reserved loads as it was accepted.
        return JobSpec.model_validate(value, context={"stored": True}) if isinstance(value, dict) else value


def job_state(job: JobRecord, tasks: list[TaskRecord]) -> JobState:
    """A job's state, derived from its tasks' states (never stored)."""
    states = {t.state for t in tasks}
    if not states <= TERMINAL:
        return JobState.RUNNING if states & {TaskState.ASSIGNED, TaskState.RUNNING} else JobState.PENDING
    if job.killed or TaskState.KILLED in states:
        return JobState.KILLED
    if states == {TaskState.FINISHED}:
        return JobState.COMPLETE
    return JobState.FAILED


class Role(str, enum.Enum):
    ADMIN = "admin"
    USER = "user"
    READER = "reader"


class Caller(BaseModel):
    """Who is calling the API: the token's name and role."""

    model_config = ConfigDict(frozen=True)

    name: str
    role: Role
    roles: tuple[str, ...] = Field((), description="the roles (queues) its frameworks may subscribe in")

    def may_see(self, owner: str) -> bool:
        return self.role is not Role.USER or owner == self.name

    def may_change(self, owner: str) -> bool:
        return self.role is Role.ADMIN or (self.role is Role.USER and owner == self.name)


class Migration(BaseModel):
    """One move of a task, as `shoal events` shows it."""

    id: int
    at: float
    task_id: str
    job_id: int
    source: str
    target: str  # "" when the scheduler picks (a drain)
    reason: str
    mode: Migrate
    running_at: float | None = None  # when it ran again
    node: str | None = None  # where it ran again
    failed: str = ""  # why the move was given up (the task runs on where it was)

    @property
    def duration(self) -> float | None:
        return None if self.running_at is None else self.running_at - self.at
