"""How `shoal exec` shows a parallel command's answers, the way clush shows them.

Live (the default): each line as it comes, prefixed `node: `, stderr kept on stderr.
`-b`: stdout gathered, identical outputs folded under one node set header; `-B`: stderr
gathered with it. `-L`: ordered by node instead of headers. `-N`: no node prefixes.
Afterwards, on stderr: non-zero exit codes, timeouts and unreachable nodes, each as one
folded node set, so they never hide in the output.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from typing import BinaryIO

from ClusterShell.NodeSet import NodeSet

from shoal.shell.gather import Gather, Line
from shoal.shell.protocol import Ended, Output, Targets

_SEP = b"-" * 15
_FAILURES = {
    "down": "down",
    "connect-timeout": "connect timeout",
    "command-timeout": "command timeout",
    "lost": "lost its agent while running",
    "error": "failed",
}


@dataclass(frozen=True, slots=True)
class Style:
    gather: bool = False  # -b
    gather_stderr: bool = False  # -B
    by_node: bool = False  # -L
    label: bool = True  # not -N
    quiet: bool = False  # -q
    max_code: bool = False  # -S
    as_json: bool = False  # --json
    prog: str = "shoal"


class Display:
    def __init__(self, style: Style, out: BinaryIO | None = None, err: BinaryIO | None = None) -> None:
        self.style = style
        self.gather = Gather()
        self.targets = Targets(nodes=[])
        self._out = out or sys.stdout.buffer
        self._err = err or sys.stderr.buffer
        self._live = not (style.gather or style.by_node or style.as_json)

    def show(self, events: Iterable[Targets | Output | Ended]) -> int:
        """Show every event; returns the exit status for the whole command."""
        for event in events:
            match event:
                case Targets():
                    self.targets = event
                case Output(node=node, stream=stream, data=data):
                    if stream == "stderr" and self.style.gather_stderr:
                        stream = "stdout"
                    self._lines(self.gather.feed(node, stream, data))
                case Ended():
                    self._lines(self.gather.end(event))
        self.finish()
        return self.gather.status(self.style.max_code)

    def _lines(self, lines: list[Line]) -> None:
        for line in lines:
            if self._live or (line.stream == "stderr" and not self.style.as_json):
                self._print(line.stream, line.node, line.text)
        self._out.flush()
        self._err.flush()

    def _print(self, stream: str, nodes: str, text: bytes) -> None:
        sink = self._err if stream == "stderr" else self._out
        prefix = f"{nodes}: ".encode() if self.style.label else b""
        sink.write(prefix + text + b"\n")

    def finish(self) -> None:
        if self.style.as_json:
            self._json()
            return
        if self.style.by_node and not self.style.gather:
            for node in NodeSet.fromlist(self.gather.ended):
                for text in self.gather.output(node, "stdout").splitlines():
                    self._print("stdout", node, text)
        elif self.style.gather:
            for nodes, text in self.gather.folded("stdout"):
                if self.style.by_node:
                    for line in text.splitlines():
                        self._print("stdout", str(nodes), line)
                else:
                    self._header(nodes, text)
        self._summary()
        self._out.flush()
        self._err.flush()

    def _header(self, nodes: NodeSet, text: bytes) -> None:
        if self.style.label:
            count = f" ({len(nodes)})" if len(nodes) > 1 else ""
            self._out.write(b"%s\n%s%s\n%s\n" % (_SEP, str(nodes).encode(), count.encode(), _SEP))
        self._out.write(text + b"\n")

    def _summary(self) -> None:
        if self.style.quiet and self.style.max_code:
            return
        prog = self.style.prog
        for code, nodes in self.gather.codes():
            if code != 0:
                self._err.write(f"{prog}: {nodes}: exited with exit code {code}\n".encode())
        for failure, message, nodes in self.gather.failures():
            why = f" ({message})" if message else ""
            self._err.write(f"{prog}: {nodes}: {_FAILURES[failure]}{why}\n".encode())

    def _json(self) -> None:
        records = [self._record(node) for node in NodeSet.fromlist(self.gather.ended)]
        self._out.write(json.dumps(records, indent=2).encode() + b"\n")

    def _record(self, node: str) -> dict[str, object]:
        ended = self.gather.ended[node]
        return {
            "node": node,
            "stdout": self.gather.output(node, "stdout").decode(errors="replace"),
            "stderr": self.gather.output(node, "stderr").decode(errors="replace"),
            "code": ended.code,
            "duration": round(ended.duration, 6),
            "failure": ended.failure or None,
            "message": ended.message,
        }
