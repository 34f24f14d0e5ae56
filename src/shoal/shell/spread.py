"""Spreading a list of commands over nodes: least-loaded first, at most K at a time per node.

Pure bookkeeping for `shoal exec --spread FILE`. The nodes come ordered least-loaded first;
each command takes the free slot of the node with the fewest commands running, earlier
(less loaded) nodes winning ties, so work goes where there is room and the busiest
nodes get work last.
"""

from __future__ import annotations

import heapq


class Slots:
    def __init__(self, nodes: list[str], per_node: int) -> None:
        if per_node < 1:
            raise ValueError("per_node must be at least 1")
        self.per_node = per_node
        self._rank = {node: rank for rank, node in enumerate(nodes)}
        self._running = dict.fromkeys(nodes, 0)
        self._free = [(0, rank, node) for rank, node in enumerate(nodes)]  # (running, rank, node)
        heapq.heapify(self._free)

    def take(self) -> str | None:
        """The node the next command should run on, or None while every slot is busy."""
        while self._free:
            running, _, node = self._free[0]
            if running != self._running[node] or running >= self.per_node:
                heapq.heappop(self._free)  # a stale entry, or a full node
                continue
            heapq.heapreplace(self._free, (running + 1, self._rank[node], node))
            self._running[node] = running + 1
            return node
        return None

    def give_back(self, node: str) -> None:
        """A command on `node` has ended: its slot is free again."""
        running = self._running[node] - 1
        if running < 0:
            raise ValueError(f"{node} has no command running")
        self._running[node] = running
        heapq.heappush(self._free, (running, self._rank[node], node))

    def running(self, node: str) -> int:
        return self._running[node]
