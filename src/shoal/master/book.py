"""The book of GPU devices and ports in use on each node: what the ledger hands a task
placed there, and takes back when it stops."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

from shoal.model import JobSpec, NodeInfo


class Book:
    """GPU device indices and ports in use, per node."""

    def __init__(self) -> None:
        self.devices: dict[str, set[int]] = defaultdict(set)
        self.ports: dict[str, set[int]] = defaultdict(set)

    def mark(self, node: str, gpus: Iterable[int], ports: Iterable[int]) -> None:
        self.devices[node].update(gpus)
        self.ports[node].update(ports)

    def release(self, node: str, gpus: Iterable[int], ports: Iterable[int]) -> None:
        self.devices[node].difference_update(gpus)
        self.ports[node].difference_update(ports)

    def free_ports(self, info: NodeInfo) -> int:
        low, high = info.port_range
        return high - low + 1 - len(self.ports[info.name])

    def take(self, info: NodeInfo, spec: JobSpec) -> tuple[list[int], dict[str, int]] | None:
        """Free device indices and named ports for one copy of a task of `spec` (None: too few)."""
        if not spec.resources.gpus and not spec.ports:
            return [], {}
        used = self.devices[info.name]
        gpus = [i for i in range(info.capacity.gpus) if i not in used][: spec.resources.gpus]
        taken = self.ports[info.name]
        low, high = info.port_range
        ports = dict(zip(spec.port_names, (p for p in range(low, high + 1) if p not in taken), strict=False))
        if len(gpus) < spec.resources.gpus or len(ports) < len(spec.ports):
            return None
        self.mark(info.name, gpus, ports.values())
        return gpus, ports
