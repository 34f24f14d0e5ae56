"""The book of what tasks hold on their nodes beyond room: GPU devices and ports, and the
tags the scheduler reads of who is where (`core/tags.py`: job names, services, ports,
what hard colocation rules keep away). The ledger marks what it hands a task placed on a
node, and releases it when the task, or a task's new copy, stops holding it.

A static port is the same number on every node; a dynamic one is a free number of the
node's range, never one a live job asks for statically (so a static job is not kept off a
node by a number handed out as a dynamic port after it was submitted).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping

import numpy as np

from shoal.core.cluster import NodeTable
from shoal.core.tags import PORT, Presence, refusal
from shoal.model import JobSpec, NodeInfo, NodeRecord

NO_PORT = "node has too few free ports (stale plan)"


class Book:
    """GPU device indices and ports in use per node, the static ports live jobs ask for, and
    the tags of the tasks on each node (kept in `table.tags`)."""

    def __init__(self, table: NodeTable, nodes: Mapping[str, NodeRecord]) -> None:
        self.devices: dict[str, set[int]] = defaultdict(set)
        self.ports: dict[str, set[int]] = defaultdict(set)
        self._table = table
        self._nodes = nodes  # the ledger's, kept current by it
        self._static: Counter[int] = Counter()  # static port -> live jobs asking for it

    def reserve(self, presence: Presence | None, n: int) -> None:
        """`n` more live jobs (fewer, if negative) ask for `presence`'s static ports."""
        if presence is not None and presence.static:
            self._static.update(dict.fromkeys(presence.static, n))
            self._static = +self._static  # numbers no live job asks for are dynamic again

    def mark(
        self, node: str, presence: Presence | None, gpus: Iterable[int], ports: Mapping[str, int]
    ) -> None:
        self.devices[node].update(gpus)
        self.ports[node].update(ports.values())
        self._tag(node, presence, ports, 1)

    def release(
        self, node: str, presence: Presence | None, gpus: Iterable[int], ports: Mapping[str, int]
    ) -> None:
        self.devices[node].difference_update(gpus)
        self.ports[node].difference_update(ports.values())
        self._tag(node, presence, ports, -1)

    def _tag(self, node: str, presence: Presence | None, ports: Mapping[str, int], n: int) -> None:
        """A copy of a task holding `ports` on `node`: its job's tags, and one per port it
        holds (a dynamic port too: a static job asking for that number cannot go there)."""
        row = self._table.index.get(node)
        if row is None or (presence is None and not ports):
            return
        static = presence.static if presence is not None else ()
        if presence is not None:
            self._table.tags.add(row, presence.provides, n)
        if dynamic := [(PORT, p) for p in ports.values() if p not in static]:
            self._table.tags.add(row, dynamic, n)

    def free_ports(self, node: str) -> int:
        """Numbers of the node's range a dynamic port may still take."""
        low, high = self._nodes[node].info.port_range
        taken = self.ports[node] | self._static.keys()
        return high - low + 1 - sum(1 for p in taken if low <= p <= high)

    def port_room(self, spec: JobSpec) -> np.ndarray | None:
        """Per row of the table: whether its node has free ports for `spec`'s dynamic ports
        (None when it asks for none; where its static ports are free is read from the tags)."""
        ports = sum(1 for p in spec.ports if p.static is None)
        if not ports:
            return None
        names = self._table.names
        return np.fromiter((self.free_ports(n) >= ports for n in names), bool, len(names))

    def take(
        self, info: NodeInfo, spec: JobSpec, presence: Presence | None
    ) -> tuple[list[int], dict[str, int]] | str:
        """Devices and ports for one copy of a task of `spec`, marked as held; or why the
        node cannot take it now (another task holds one of its static ports, a colocation
        rule refuses it, or too few devices or ports are free)."""
        row = self._table.index[info.name]
        if presence is not None and (why := refusal(self._table.tags, row, presence)) is not None:
            return f"node {why} (stale plan)"
        used = self.devices[info.name]
        gpus = [i for i in range(info.capacity.gpus) if i not in used][: spec.resources.gpus]
        if len(gpus) < spec.resources.gpus:
            return NO_PORT
        held = self.ports[info.name]
        low, high = info.port_range
        free = (p for p in range(low, high + 1) if p not in held and p not in self._static)
        ports: dict[str, int] = {}
        for asked in spec.ports:
            port = asked.static if asked.static is not None else next(free, None)
            if port is None:
                return NO_PORT
            ports[asked.name] = port
        self.mark(info.name, presence, gpus, ports)
        return gpus, ports
