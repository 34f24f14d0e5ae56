"""What a parallel command asks for, and the stream of events that answers it.

The master answers `POST /v1/exec` with a stream of msgpack maps, one event each, as they
happen: which nodes were chosen, output chunks, ends. The CLI, the SSH transport and the
`--json` records all consume the same events, so gathering and exit codes behave the same
whichever way the command travelled.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgpack
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, model_validator

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


class ExecRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    select: Selection
    command: Command = Field(description="a shell string, or an argv list run as is")
    connect_timeout: float = Field(10.0, gt=0, le=3600, description="seconds for a node to start it (-t)")
    command_timeout: float | None = Field(None, gt=0, description="seconds it may run (-u)")
    fanout: int | None = Field(None, ge=1, le=100_000, description="nodes running it at once (-f)")

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
    """Who ran what where, and how it ended: kept for every parallel command."""

    id: int = 0
    at: float
    who: str
    command: Command
    nodes: str = Field(description="the node set it was sent to")
    ended_at: float | None = None
    results: dict[str, str] = Field(
        default_factory=dict, description="exit code or failure -> the node set that had it"
    )


Event = Annotated[Targets | Output | Ended, Field(discriminator="kind")]
_EVENT = TypeAdapter(Event)


def pack(event: _Event) -> bytes:
    return msgpack.packb(event.model_dump(mode="python"), use_bin_type=True)


class Unpacker:
    """Events back out of a byte stream cut anywhere."""

    def __init__(self) -> None:
        self._unpacker = msgpack.Unpacker(raw=False)

    def feed(self, data: bytes) -> list[Targets | Output | Ended]:
        self._unpacker.feed(data)
        return [_EVENT.validate_python(item) for item in self._unpacker]
