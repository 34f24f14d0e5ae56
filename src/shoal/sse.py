"""The event stream (`GET /v1/stream`) read back: server-sent-event frames as `StreamEvent`s."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from shoal.errors import ShoalError

TOPICS = ("jobs", "tasks", "nodes", "frameworks", "offers", "migrations", "services", "audit")


@dataclass(frozen=True, slots=True)
class StreamEvent:
    index: int
    topic: str  # one of TOPICS
    type: str  # changed, removed, registered, ...
    at: float
    job: int | None
    node: str | None
    record: Any  # the record as JSON: a job, a task, a node, ...

    @classmethod
    def of(cls, data: str) -> StreamEvent:
        fields = json.loads(data)
        return cls(
            index=fields["index"],
            topic=fields["topic"],
            type=fields["type"],
            at=fields["at"],
            job=fields.get("job"),
            node=fields.get("node"),
            record=fields.get("record"),
        )


class StreamGone(ShoalError):
    """The master no longer holds the events after the index asked for: list afresh."""


def frames(lines: Iterable[str]) -> Iterator[tuple[str, str]]:
    """(event name, data) of each frame in `lines`, as the server-sent-events format has them:
    fields up to a blank line, comments (":") and ids skipped, data lines joined."""
    name, data = "message", []
    for line in lines:
        if not line:
            if data:
                yield name, "\n".join(data)
            name, data = "message", []
        elif line.startswith("event:"):
            name = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))


def events(lines: Iterable[str]) -> Iterator[StreamEvent]:
    """The events of a stream; `StreamGone` when the master says it ended for that reason."""
    for name, data in frames(lines):
        if name == "gone":
            raise StreamGone(json.loads(data)["error"])
        yield StreamEvent.of(data)
