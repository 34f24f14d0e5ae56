"""What a parallel command asks for, and the stream of events that answers it.

The master answers `POST /v1/exec` with a stream of msgpack maps, one event each, as they
happen: which nodes were chosen, output chunks, ends. The CLI, the SSH transport and the
`--json` records all consume the same events, so gathering and exit codes behave the same
whichever way the command travelled.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgpack
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, field_validator, model_validator

from shoal.model import Command

Stream = Literal["stdout", "stderr"]


class Selection(BaseModel):
    """clush's node selection: `-w`, `-x`, `-g`, `-X`, `-a`, plus load-aware picking."""

    nodes: list[str] = Field(default_factory=list, max_length=256, description="node sets (-w)")
    exclude: list[str] = Field(default_factory=list, max_length=256, description="node sets left out (-x)")
    groups: list[str] = Field(default_factory=list, max_length=256, description="groups (-g)")
    exclude_groups: list[str] = Field(
        default_factory=list, max_length=256, description="groups left out (-X)"
    )
    all: bool = Field(False, description="every node the master knows (-a)")
    pick: int | None = Field(None, ge=1, description="run on only this many of the chosen nodes")
    least_loaded: bool = Field(False, description="with pick: the least-loaded first, else at random")

    @model_validator(mode="after")
    def _something(self) -> Selection:
        if not (self.nodes or self.groups or self.all):
            raise ValueError("choose nodes: nodes (-w), groups (-g) or all (-a)")
        return self


_SHA256 = r"^[0-9a-f]{64}$"


class CopyFile(BaseModel):
    """One file of a push: where it goes under the destination, and what it must be."""

    model_config = ConfigDict(frozen=True)

    path: str = Field(min_length=1, max_length=4096, description="relative to the destination")
    blob: str = Field(pattern=_SHA256, description="sha256 of the content, uploaded to /v1/blobs first")
    size: int = Field(ge=0)
    mode: int = Field(0o644, ge=0, le=0o7777)
    mtime: float = 0.0

    @field_validator("path")
    @classmethod
    def _inside(cls, value: str) -> str:
        if value.startswith("/") or ".." in value.split("/"):
            raise ValueError("must be a relative path that stays inside the destination")
        return value


class _Fanout(BaseModel):
    model_config = ConfigDict(extra="forbid")

    select: Selection
    connect_timeout: float = Field(10.0, gt=0, le=3600, description="seconds for a node to start (-t)")
    command_timeout: float | None = Field(None, gt=0, description="seconds it may take (-u)")
    fanout: int | None = Field(None, ge=1, le=100_000, description="nodes at work at once (-f)")


class CopyRequest(_Fanout):
    """Push files to every chosen node: `dest` is a directory when `into` is set or when it
    already is one on the node (as scp and clush --copy decide), else the single file's name."""

    dest: str = Field(pattern=r"^/", max_length=4096, description="an absolute path on the nodes")
    files: list[CopyFile] = Field(min_length=1, max_length=100_000)
    into: bool = False


class FetchRequest(_Fanout):
    """Pull one file from every chosen node (clush --rcopy)."""

    path: str = Field(pattern=r"^/", max_length=4096, description="an absolute path on the nodes")


class ExecRequest(_Fanout):
    command: Command = Field(description="a shell string, or an argv list run as is")

    @model_validator(mode="after")
    def _not_blank(self) -> ExecRequest:
        if isinstance(self.command, str) and not self.command.strip():
            raise ValueError("command is empty")
        return self

    @property
    def argv(self) -> list[str]:
        return ["/bin/sh", "-c", self.command] if isinstance(self.command, str) else self.command


class _Event(BaseModel):
    model_config = ConfigDict(frozen=True)


class Targets(_Event):
    """The first event: the nodes the command goes to, and those skipped as down."""

    kind: Literal["targets"] = "targets"
    nodes: list[str]
    down: list[str] = Field(default_factory=list)


class Output(_Event):
    kind: Literal["output"] = "output"
    node: str
    stream: Stream
    data: bytes


class Ended(_Event):
    """How the command ended on one node: an exit code, or why there is none."""

    kind: Literal["ended"] = "ended"
    node: str
    code: int | None = None
    duration: float = 0.0
    failure: Literal["", "down", "connect-timeout", "command-timeout", "lost", "error"] = ""
    message: str = ""


class AuditRecord(BaseModel):
    """Who did what to what, from where, and how the master answered: kept for every call
    that changes something. A parallel command's record also says where it ran and how it
    ended on each node."""

    id: int = 0
    at: float
    who: str = Field(description="a token's name, agent:<node>, bootstrap:<token name>, or anonymous")
    role: str = Field("", description="the role of the caller's token, when it has one")
    kind: str = Field("exec", description="what was asked: job.submit, token.revoke, exec, copy...")
    target: str = Field("", description="what it was asked of: a job, a node, a token (from the path)")
    source: str = Field("", description="the address the call came from")
    status: int | None = Field(None, description="the HTTP status of the answer")
    count: int = Field(
        1, description="the calls it stands for: refusals are kept one a minute per address, kind and status"
    )
    command: Command = Field("", description="a parallel command's")
    nodes: str = Field("", description="the node set a parallel command was sent to")
    via: Literal["agents", "ssh"] = "agents"
    ended_at: float | None = None
    results: dict[str, str] = Field(
        default_factory=dict, description="exit code or failure -> the node set that had it"
    )


class AuditStart(BaseModel):
    """A parallel command that did not pass through the master (`shoal exec --ssh`),
    recorded by the admin who runs it."""

    model_config = ConfigDict(extra="forbid")

    command: Command
    nodes: str = Field(max_length=100_000)
    via: Literal["ssh"] = "ssh"


class AuditEnd(BaseModel):
    model_config = ConfigDict(extra="forbid")

    results: dict[str, str] = Field(max_length=1000)


class Fetched(_Event):
    """A node's file, pulled into the master's blob store: fetch it from /v1/blobs."""

    kind: Literal["fetched"] = "fetched"
    node: str
    blob: str
    size: int
    mode: int
    mtime: float


Event = Annotated[Targets | Output | Ended | Fetched, Field(discriminator="kind")]
_EVENT = TypeAdapter(Event)


def pack(event: _Event) -> bytes:
    return msgpack.packb(event.model_dump(mode="python"), use_bin_type=True)


class Unpacker:
    """Events back out of a byte stream cut anywhere."""

    def __init__(self) -> None:
        self._unpacker = msgpack.Unpacker(raw=False)

    def feed(self, data: bytes) -> list[Targets | Output | Ended | Fetched]:
        self._unpacker.feed(data)
        return [_EVENT.validate_python(item) for item in self._unpacker]
