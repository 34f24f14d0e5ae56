"""Node groups for ClusterShell node sets: the configured ones, and those shoal derives.

`NodeGroups` is a ClusterShell group resolver, so `NodeSet("@gpu,node[1-4]", resolver=...)`
works with every node set operator ClusterShell has. A group comes first from the group
sources ClusterShell is configured with (`groups.conf`, its YAML files, upcalls): an
operator's explicit groups always win. Otherwise it is derived from what the master knows:

- live state: `@all`, `@up`, `@down`, `@hot` (CPU at or above `HOT_CPU` percent), `@idle`
  (nothing allocated and CPU under `IDLE_CPU` percent);
- a label or attribute as a source: `@rack:r1`, `@os:linux`, `@arch:x86_64`; `@rack:*` is
  every node that has the label;
- a name alone: `@gpu` is the nodes with a resource of that name (`gpus`, `gpu`, or a
  custom scalar), or with a label or attribute of that name that is not false.
"""

from __future__ import annotations

import functools
import math
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from ClusterShell.Defaults import config_paths
from ClusterShell.NodeSet import ILLEGAL_GROUP_CHARS, NodeSet, NodeSetException
from ClusterShell.NodeUtils import GroupResolver, GroupResolverConfig, GroupResolverError, GroupSourceError

from shoal.errors import SpecError
from shoal.model import NodeStatus
from shoal.shell.protocol import Selection
from shoal.views import NodeView

HOT_CPU = 80.0
IDLE_CPU = 10.0
_FALSE = frozenset({"", "0", "false", "no", "off"})
_LIVE = ("all", "up", "down", "hot", "idle")


@functools.cache
def configured_groups() -> GroupResolver:
    """ClusterShell's group sources where an operator configures them (/etc/clustershell,
    ~/.config/clustershell, $CLUSTERSHELL_CFGDIR). The sample configuration pip puts
    beside the package, with its made-up `example[...]` nodes, is left out."""
    paths = [p for p in config_paths("groups.conf") if not p.startswith(sys.prefix)]
    return GroupResolverConfig(paths, ILLEGAL_GROUP_CHARS)


def _facts(node: NodeView) -> dict[str, str]:
    return {**node.info.attributes, **node.info.labels}


def _live(node: NodeView) -> frozenset[str]:
    groups = {"all", "up" if node.status is NodeStatus.UP else "down"}
    cpu = node.usage.cpu_percent
    if node.status is NodeStatus.UP and cpu >= HOT_CPU:
        groups.add("hot")
    if node.status is NodeStatus.UP and cpu < IDLE_CPU and node.allocated.cpus == 0:
        groups.add("idle")
    return frozenset(groups)


def _has(node: NodeView, name: str) -> bool:
    resources = node.info.capacity
    amount = resources.custom.get(name, 0.0)
    if name in ("gpu", "gpus"):
        amount = resources.gpus
    value = _facts(node).get(name)
    return amount > 0 or (value is not None and value.lower() not in _FALSE)


class NodeGroups(GroupResolver):
    """Groups of the configured sources first, then those derived from `nodes`."""

    def __init__(self, nodes: Iterable[NodeView], configured: GroupResolver | None = None) -> None:
        super().__init__()
        self._nodes = sorted(nodes, key=lambda n: n.name)
        self._configured = configured if configured is not None else configured_groups()

    def _from_config(self, group: str, namespace: str | None) -> list[str]:
        try:
            return self._configured.group_nodes(group, namespace)
        except (GroupResolverError, GroupSourceError):
            return []

    def group_nodes(self, group: str, namespace: str | None = None) -> list[str]:
        if configured := self._from_config(group, namespace):
            return configured
        if namespace is not None:
            if not any(namespace in _facts(n) for n in self._nodes):
                raise GroupResolverError(f"no node has a label or attribute {namespace!r}")
            return [n.name for n in self._nodes if _facts(n).get(namespace) == group]
        if group in _LIVE:
            return [n.name for n in self._nodes if group in _live(n)]
        if group not in self.grouplist():
            raise GroupResolverError(f"no group @{group}; see the groups with `shoal nodes --groups`")
        return [n.name for n in self._nodes if _has(n, group)]

    def all_nodes(self, namespace: str | None = None) -> list[str]:
        if namespace is None:
            return [n.name for n in self._nodes]
        return [n.name for n in self._nodes if namespace in _facts(n)]

    def grouplist(self, namespace: str | None = None) -> list[str]:
        if namespace is not None:
            return sorted({f[namespace] for n in self._nodes if namespace in (f := _facts(n))})
        names = {k for n in self._nodes for k, value in _facts(n).items() if value.lower() not in _FALSE}
        names |= {name for n in self._nodes for name in n.info.capacity.custom}
        return sorted({*_LIVE, "gpu", "gpus"} | names)

    def has_node_groups(self, namespace: str | None = None) -> bool:
        return False

    def listing(self) -> dict[str, str]:
        """Every derived group, `@name` or `@key:value`, with its folded node set."""
        groups = {f"@{g}": self.group_nodes(g) for g in self.grouplist()}
        keys = sorted({k for n in self._nodes for k in _facts(n)})
        groups |= {f"@{k}:{v}": self.group_nodes(v, k) for k in keys for v in self.grouplist(k)}
        return {name: str(NodeSet.fromlist(nodes)) for name, nodes in groups.items() if nodes}


def resolve(
    groups: NodeGroups,
    nodes: Iterable[str] = (),
    exclude: Iterable[str] = (),
    group: Iterable[str] = (),
    exclude_group: Iterable[str] = (),
    everything: bool = False,
) -> NodeSet:
    """The node set clush's `-w`, `-x`, `-g`, `-X` and `-a` select, in the same way.

    Raises SpecError naming the option when a pattern does not parse or a group is unknown."""
    chosen = NodeSet(resolver=groups)
    parts = [("nodes", p) for p in nodes] + [("groups", f"@{g.removeprefix('@')}") for g in group]
    if everything:
        parts.append(("all", "@all"))
    for field, pattern in parts:
        chosen.update(_parse(groups, field, pattern))
    for field, pattern in [("exclude", p) for p in exclude] + [
        ("exclude_groups", f"@{g.removeprefix('@')}") for g in exclude_group
    ]:
        chosen.difference_update(_parse(groups, field, pattern))
    return chosen


def _parse(groups: NodeGroups, field: str, pattern: str) -> NodeSet:
    try:
        return NodeSet(pattern, resolver=groups)
    except (NodeSetException, GroupResolverError, GroupSourceError) as e:
        raise SpecError(field, f"{pattern!r} is not a node set: {e}") from None


@dataclass(frozen=True, slots=True)
class Chosen:
    """Where a command goes: nodes that can take it now, and chosen nodes known to be down."""

    targets: list[str]
    down: dict[str, str]  # node -> why it is skipped


def load(node: NodeView | None) -> tuple[float, float]:
    """Ordering key, least loaded first: live CPU, then the share of CPUs allocated; a node
    the master does not know comes last."""
    if node is None:
        return (math.inf, math.inf)
    capacity = node.info.capacity.cpus or 1.0
    return (node.usage.cpu_percent, node.allocated.cpus / capacity)


def choose(
    nodes: list[NodeView], select: Selection, shuffle: Callable[[list[str]], None], via_agents: bool = True
) -> Chosen:
    """The nodes `select` names, split into reachable and down; with `pick`, only that many
    of the reachable ones: the least loaded, or a random few (`shuffle` is the randomness).

    Through the agents a node is reachable when its agent is connected; over SSH
    (`via_agents=False`) every named node is tried, known to the master or not."""
    try:
        s = select
        names = resolve(NodeGroups(nodes), s.nodes, s.exclude, s.groups, s.exclude_groups, s.all)
    except SpecError as e:
        raise SpecError(f"select.{e.field}", e.reason) from None
    known = {n.name: n for n in nodes}
    down = {}
    if via_agents:
        down = {
            name: "no agent of that name has joined"
            if name not in known
            else "down: its agent is not connected"
            for name in names
            if name not in known or not known[name].connected
        }
    targets = [name for name in names if name not in down]
    if select.pick is not None:
        if select.least_loaded:
            targets.sort(key=lambda name: load(known.get(name)))
        else:
            shuffle(targets)
        targets = targets[: select.pick]
    return Chosen(targets, down)
