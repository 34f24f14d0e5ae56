"""Resource limits for runs, through Linux control groups.

Each run gets its own group with a CPU quota (`cpus` of the spec) and a memory limit (`mem`
MiB), under `shoal/<node>/` in the unified hierarchy (cgroup v2) or in the `cpu` and `memory`
hierarchies (cgroup v1), whichever the machine has. The run's wrapper shell writes its own pid
into the groups before it starts the command, so nothing the command forks escapes them.
Where neither is writable, runs go unlimited and the agent says so once.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path

from shoal.model import Resources

log = logging.getLogger("shoal.agent")
PERIOD_US = 100_000


@dataclass(frozen=True)
class Cgroups:
    """Where this agent's groups live: one base directory per hierarchy in use."""

    version: int
    bases: tuple[Path, ...]

    @classmethod
    def detect(cls, node: str, root: Path = Path("/sys/fs/cgroup")) -> Cgroups | None:
        if (root / "cgroup.controllers").exists():
            found = cls._v2(root, node)
        elif (root / "cpu").is_dir() and (root / "memory").is_dir():
            found = cls(1, (root / "cpu" / "shoal" / node, root / "memory" / "shoal" / node))
        else:
            found = None
        try:
            if found is not None:
                for base in found.bases:
                    base.mkdir(parents=True, exist_ok=True)
                return found
        except OSError as e:
            log.warning("cannot create cgroups (%s): tasks run without cpu and memory limits", e)
            return None
        log.warning("no cgroup hierarchy with cpu and memory: tasks run without limits")
        return None

    @classmethod
    def _v2(cls, root: Path, node: str) -> Cgroups | None:
        if not {"cpu", "memory"} <= set((root / "cgroup.controllers").read_text().split()):
            return None
        shoal = root / "shoal"
        try:
            shoal.mkdir(exist_ok=True)
            (root / "cgroup.subtree_control").write_text("+cpu +memory")
            (shoal / "cgroup.subtree_control").write_text("+cpu +memory")
            (shoal / node).mkdir(exist_ok=True)
            (shoal / node / "cgroup.subtree_control").write_text("+cpu +memory")
        except OSError as e:
            log.warning("cannot enable cgroup v2 controllers (%s)", e)
            return None
        return cls(2, (shoal / node,))

    def create(self, run_id: str, resources: Resources) -> list[Path]:
        """The groups of one run, with its limits set; their directories."""
        groups = [base / run_id for base in self.bases]
        for group in groups:
            group.mkdir(exist_ok=True)
        quota = max(1000, int(resources.cpus * PERIOD_US)) if resources.cpus > 0 else None
        memory = resources.mem * 1024 * 1024 if resources.mem > 0 else None
        if self.version == 2:
            (groups[0] / "cpu.max").write_text(f"{quota or 'max'} {PERIOD_US}")
            (groups[0] / "memory.max").write_text(str(memory or "max"))
        else:
            cpu, mem = groups
            (cpu / "cpu.cfs_period_us").write_text(str(PERIOD_US))
            (cpu / "cpu.cfs_quota_us").write_text(str(quota or -1))
            if memory is not None:
                (mem / "memory.limit_in_bytes").write_text(str(memory))
        return groups

    def remove(self, run_id: str) -> None:
        """Drop a run's groups once its processes are gone (left alone if some linger)."""
        for base in self.bases:
            with contextlib.suppress(OSError):
                (base / run_id).rmdir()
