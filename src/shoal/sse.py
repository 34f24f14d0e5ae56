"""The event stream (`GET /v1/stream`) read back: server-sent-event frames as `StreamEvent`s."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
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
    left: str | None = None  # the node a task left with this change

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
            left=fields.get("left"),
        )


class StreamGone(ShoalError):
    """The master no longer holds the events after the index asked for: list afresh."""


# The stream's first line, and its keep-alives: the index it stands after. The events a
# stream's filter admits may be few on a busy master, and the newest index had a long way
# back: a client resumes from the index it was last told, event or keep-alive.
FOLLOWING = ": following from "


def frames(lines: Iterable[str]) -> Iterator[tuple[str, str]]:
    """(event name, data) of each frame in `lines`, as the server-sent-events format has them:
    fields up to a blank line, comments (":") and ids skipped, data lines joined; the
    comments that say where the stream stands as ("following", its index)."""
    name, data = "message", []
    for line in lines:
        if line.startswith(FOLLOWING):
            yield "following", line.removeprefix(FOLLOWING)
        elif not line:
            if data:
                yield name, "\n".join(data)
            name, data = "message", []
        elif line.startswith("event:"):
            name = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))


def events(
    lines: Iterable[str], following: Callable[[int], None] = lambda index: None
) -> Iterator[StreamEvent]:
    """The events of a stream; `StreamGone` when the master says it ended for that reason.
    `following` is told the index the stream stands after, before any event and with each
    keep-alive: a client that must connect again resumes after the newer of that and its
    last event's index, missing nothing it wants and asking for nothing the master let go."""
    for name, data in frames(lines):
        if name == "following":
            following(int(data))
        elif name == "gone":
            raise StreamGone(json.loads(data)["error"])
        else:
            yield StreamEvent.of(data)
