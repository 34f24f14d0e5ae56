"""The frames exchanged between the master and its agents, and their encoding.

One WebSocket per agent, dialled by the agent; every message is one msgpack frame whose
`kind` names its type. `encode` and `decode` are the only way frames cross a link, in the
live system and in SimCluster alike, so the simulated cluster exercises the real codec.

Delivery: the agent reports every run state change in a `RunReports` frame and repeats
unacknowledged reports until an `Ack` names them; `Register` carries the agent's whole
task table so the master can reconcile after any reconnect.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Literal

import msgpack
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from shoal.checks import CheckResult, HealthCheck
from shoal.model import NodeInfo, Resources, TaskState, Usage
from shoal.shell.protocol import CopyFile


class _Frame(BaseModel):
    model_config = ConfigDict(frozen=True)


@dataclass(slots=True)
class RunSpec:
    """Everything an agent needs to start one attempt of a task. A plain dataclass (not
    frozen: a frozen one sets each field through object.__setattr__), cheap for the master
    to make by the thousand; pydantic still validates it inside a frame."""

    run_id: str
    task_id: str
    attempt: int
    argv: list[str]
    resources: Resources
    env: dict[str, str] = field(default_factory=dict)
    workdir: str | None = None
    kill_grace: float = 5.0
    time_limit: float | None = None
    checkpoint: bool = False  # keeps state in SHOAL_CHECKPOINT_DIR, saved when it is stopped
    restore: str | None = None  # the blob of saved state to unpack there before it starts
    checks: dict[str, HealthCheck] = field(default_factory=dict)  # by name (checks.TASK_CHECK: its own)
    shutdown_delay: float = 0.0  # seconds between a kill and SIGTERM: it has left the registry
    user: str | None = None  # the Unix user it runs as (None: the agent's task_user)


class RunReport(BaseModel):
    """The state of one run as its agent sees it (running or one of the end states)."""

    model_config = ConfigDict(frozen=True)

    run_id: str
    task_id: str
    attempt: int
    state: TaskState
    exit_code: int | None = None
    message: str = ""
    checkpoint: str | None = None  # the blob of the state it saved when it was stopped
    checks: dict[str, CheckResult] = Field(default_factory=dict)  # what its checks last said, by name
    # What an ended run used in all, as its agent measured it when it ended (None: not
    # measured, or an agent from before these were reported).
    cpu_seconds: float | None = Field(None, ge=0, allow_inf_nan=False)
    peak_mem: int | None = Field(None, ge=0, description="MiB: the most it held at once")


# agent -> master


class Register(_Frame):
    kind: Literal["register"] = "register"
    node: NodeInfo
    runs: list[RunReport] = Field(default_factory=list)


class Heartbeat(_Frame):
    kind: Literal["heartbeat"] = "heartbeat"
    usage: Usage


class RunReports(_Frame):
    kind: Literal["reports"] = "reports"
    reports: list[RunReport]


class LogChunk(_Frame):
    kind: Literal["log_chunk"] = "log_chunk"
    request: int
    data: bytes = b""
    offset: int = 0
    error: str = ""


class ExecStarted(_Frame):
    kind: Literal["exec_started"] = "exec_started"
    exec_id: int


class ExecOutput(_Frame):
    kind: Literal["exec_output"] = "exec_output"
    exec_id: int
    stream: Literal["stdout", "stderr"]
    data: bytes


class ExecEnd(_Frame):
    """A parallel-shell command ended on the agent's node: its exit code (negative: the
    signal that killed it), or the reason it could not start."""

    kind: Literal["exec_end"] = "exec_end"
    exec_id: int
    code: int | None = None
    timed_out: bool = False
    error: str = ""


class FileFetched(_Frame):
    """The agent put the file a `FetchFile` named into the master's blob store."""

    kind: Literal["file_fetched"] = "file_fetched"
    exec_id: int
    blob: str
    size: int
    mode: int
    mtime: float


# master -> agent


class Launch(_Frame):
    kind: Literal["launch"] = "launch"
    runs: list[RunSpec]


class Kill(_Frame):
    kind: Literal["kill"] = "kill"
    run_ids: list[str]


class Ack(_Frame):
    """Reports the master has taken; an empty one answers a heartbeat (the agent counts the
    time since it last heard the master by them)."""

    kind: Literal["ack"] = "ack"
    reports: list[tuple[str, TaskState]]


class Welcome(_Frame):
    """The master's answer to a registration: its heartbeat timeout, after which it calls a
    silent node down and its tasks lost, and whether the agent is to stop them before that
    when it is cut off (see AgentState)."""

    kind: Literal["welcome"] = "welcome"
    heartbeat_timeout: float
    fence: bool = False


class LogRequest(_Frame):
    kind: Literal["log_request"] = "log_request"
    request: int
    run_id: str
    stream: Literal["stdout", "stderr"] = "stdout"
    offset: int = 0
    limit: int = 65536


class ExecStart(_Frame):
    """Run one command of the parallel shell now, outside any task (no sandbox, no cgroup)."""

    kind: Literal["exec_start"] = "exec_start"
    exec_id: int
    argv: list[str]
    timeout: float | None = None
    ack_after: float = 0.0  # seconds to wait before `ExecStarted`; an earlier end makes it moot


class CopyFiles(_Frame):
    """Fetch these blobs from the master and write them under `dest` (see CopyRequest)."""

    kind: Literal["copy_files"] = "copy_files"
    exec_id: int
    dest: str
    files: list[CopyFile]
    into: bool = False


class FetchFile(_Frame):
    """Upload this file to the master's blob store, then say so with `FileFetched`."""

    kind: Literal["fetch_file"] = "fetch_file"
    exec_id: int
    path: str


class ExecAck(_Frame):
    """The reader of a command's output has taken `consumed` more bytes of it."""

    kind: Literal["exec_ack"] = "exec_ack"
    exec_id: int
    consumed: int


class ExecCancel(_Frame):
    kind: Literal["exec_cancel"] = "exec_cancel"
    exec_id: int


Frame = Annotated[
    Register
    | Heartbeat
    | RunReports
    | LogChunk
    | ExecStarted
    | ExecOutput
    | ExecEnd
    | FileFetched
    | Launch
    | Kill
    | Ack
    | Welcome
    | LogRequest
    | ExecStart
    | CopyFiles
    | FetchFile
    | ExecAck
    | ExecCancel,
    Field(discriminator="kind"),
]
_FRAME = TypeAdapter(Frame)


def encode(frame: _Frame) -> bytes:
    return msgpack.packb(frame.model_dump(mode="python"), use_bin_type=True)


def decode(data: bytes) -> Frame:
    """Decode one frame; raises pydantic.ValidationError or msgpack errors on garbage."""
    return _FRAME.validate_python(msgpack.unpackb(data, raw=False))
