"""Gathering a parallel command's answers: lines per node, identical outputs folded.

Pure: events in, lines and folded node sets out. Output arrives in chunks cut anywhere;
`Gather` splits each node's streams into lines, keeps them in ClusterShell's `MsgTree`
(the structure clush gathers with), and folds nodes with identical output under one node set,
ordered as clush orders them (the largest set first, then by first node). Every transport
(the agents, SSH) feeds the same events, so `-b`, `-S` and the summaries do not depend
on how the command travelled.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

from ClusterShell.MsgTree import MsgTree
from ClusterShell.NodeSet import NodeSet

from shoal.shell.protocol import Ended, Stream

TIMED_OUT_STATUS = 255  # clush -S answers this when any node timed out


@dataclass(frozen=True, slots=True)
class Line:
    node: str
    stream: Stream
    text: bytes


def fold_key(item: tuple[NodeSet, bytes]) -> tuple[int, str]:
    nodes = item[0]
    return -len(nodes), nodes[0]


class Gather:
    def __init__(self) -> None:
        self._trees: dict[str, MsgTree] = {"stdout": MsgTree(), "stderr": MsgTree()}
        self._tails: dict[tuple[str, str], bytes] = {}
        self.ended: dict[str, Ended] = {}

    def feed(self, node: str, stream: Stream, data: bytes) -> list[Line]:
        """Take a chunk of one node's stream; returns the lines it completed."""
        text = self._tails.pop((node, stream), b"") + data
        *complete, tail = text.split(b"\n")
        if tail:
            self._tails[node, stream] = tail
        return [self._add(node, stream, line) for line in complete]

    def end(self, event: Ended) -> list[Line]:
        """Record how `event.node` ended; returns its unterminated last lines, if any."""
        self.ended[event.node] = event
        return [
            self._add(event.node, stream, tail)  # type: ignore[arg-type]
            for stream in ("stdout", "stderr")
            if (tail := self._tails.pop((event.node, stream), None)) is not None
        ]

    def _add(self, node: str, stream: Stream, text: bytes) -> Line:
        self._trees[stream].add(node, text)
        return Line(node, stream, text)

    def folded(self, stream: Stream) -> list[tuple[NodeSet, bytes]]:
        """Each distinct output of `stream` with the node set that printed it (clush -b)."""
        groups = [(NodeSet.fromlist(keys), bytes(elem)) for elem, keys in self._trees[stream].walk()]
        return sorted(groups, key=fold_key)

    def output(self, node: str, stream: Stream) -> bytes:
        elem = self._trees[stream].get(node)
        return b"" if elem is None else bytes(elem) + b"\n"

    def codes(self) -> list[tuple[int, NodeSet]]:
        """Exit codes with the nodes that gave them, lowest code first."""
        by_code: dict[int, list[str]] = defaultdict(list)
        for event in self.ended.values():
            if event.code is not None and not event.failure:
                by_code[event.code].append(event.node)
        return [(code, NodeSet.fromlist(nodes)) for code, nodes in sorted(by_code.items())]

    def failures(self) -> list[tuple[str, str, NodeSet]]:
        """Nodes with no exit code, by why (down, connect-timeout, command-timeout, lost,
        error) and the message that came with it."""
        by_failure: dict[tuple[str, str], list[str]] = defaultdict(list)
        for event in self.ended.values():
            if event.failure:
                by_failure[event.failure, event.message].append(event.node)
        return [
            (failure, message, NodeSet.fromlist(nodes))
            for (failure, message), nodes in sorted(by_failure.items())
        ]

    def status(self, max_code: bool) -> int:
        """The exit status of the whole command: 0, or with `max_code` (clush -S) the
        largest remote code, TIMED_OUT_STATUS if any node timed out or could not be reached."""
        if not max_code:
            return 0
        if self.failures():
            return TIMED_OUT_STATUS
        return max((code for code, _ in self.codes()), default=0)


def outcome(targets: Iterable[str], ended: Iterable[Ended]) -> dict[str, str]:
    """How a parallel command ended, for the audit log: each exit code or failure with the
    node set that had it; targets that never ended are `interrupted`."""
    by_result: dict[str, list[str]] = defaultdict(list)
    for event in ended:
        by_result[event.failure or str(event.code)].append(event.node)
    done = {node for nodes in by_result.values() for node in nodes}
    if interrupted := [node for node in targets if node not in done]:
        by_result["interrupted"] = interrupted
    return {key: str(NodeSet.fromlist(nodes)) for key, nodes in sorted(by_result.items())}
