"""Placing the tasks of one group: filters as boolean masks, strategies as score vectors.

Every decision here is a numpy operation over node rows. A group's static mask (node up,
in its node set, passing its constraints) comes from the MaskCache; the resource fit and the
score are computed over a window of candidate rows, and each placement updates only the
chosen row, so placing k tasks costs one setup plus k argmaxes. With binpack a node keeps
taking tasks until it is full, so a large array fills node after node in bulk.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from shoal.core.cluster import MaskCache, NodeTable
from shoal.core.expressions import Constraint
from shoal.model import Resources, Strategy

_EPS = 1e-9
_NEG = -np.inf
# Binpack fills the fullest node, but one whose cpus and memory fill unevenly strands what is
# left of the other: the score takes off twice the gap (measured against an exact ILP in
# tests/test_binpack_optimality.py: the plain fullest-node rule placed 71% of the optimum).
_BALANCE = 2.0
# Spread leans the same way, more gently: tasks heavy in cpus and tasks heavy in memory then
# share nodes instead of each exhausting one resource on different nodes (measured in
# tests/test_scheduler.py against pooled DRF: without it a quarter of the cluster stranded).
_EVEN = 0.5

# Candidate rows: a contiguous window (a slice: every array below is a view, not a copy), or,
# for a job whose filters leave few nodes, the indices of just those nodes.
Rows = slice | np.ndarray


def _size(rows: Rows) -> int:
    return rows.stop - rows.start if isinstance(rows, slice) else len(rows)


def _row(rows: Rows, j: int) -> int:
    return rows.start + j if isinstance(rows, slice) else int(rows[j])


@dataclass(frozen=True, slots=True)
class SpreadTarget:
    attribute: str
    targets: tuple[tuple[str, float], ...] = ()  # value -> fraction 0..1


@dataclass(frozen=True, slots=True)
class Group:
    """The pending tasks of one job: identical asks, the job's rules, in index order."""

    job_id: int
    tasks: tuple[str, ...]
    ask: Resources
    user: str = "nobody"
    queue: str = "default"
    priority: int = 0
    preemptible: bool = True
    strategy: Strategy | None = None
    constraints: tuple[Constraint, ...] = ()
    nodes: frozenset[str] | None = None
    max_per_node: int | None = None
    max_per: tuple[tuple[str, int], ...] = ()
    affinities: tuple[tuple[Constraint, float], ...] = ()
    spread: SpreadTarget | None = None
    gang: bool = False
    placed: tuple[tuple[str, int], ...] = ()  # the job's tasks already on each node
    nominated: tuple[tuple[str, str], ...] = ()  # (task, node) where preemption makes it room
    time_limit: float | None = None  # seconds a task runs at most


@dataclass
class Placer:
    """One scheduling cycle's working view: what the cycle has taken per row, and per-job
    counts. Free room is the table's minus `taken`, computed only for the rows looked at,
    so a cycle costs nothing per node it does not consider (np.zeros pages in lazily)."""

    table: NodeTable
    masks: MaskCache
    window: int
    taken: np.ndarray = field(init=False)
    _start: int = 0
    _job_rows: dict[int, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.taken = np.zeros((len(self.table), len(self.table.dims)))

    def free_at(self, row: int) -> np.ndarray:
        dims = self.taken.shape[1]
        return self.table.capacity[row, :dims] - self.table.allocated[row, :dims] - self.taken[row]

    def free_column(self, rows: Rows, d: int) -> np.ndarray:
        return self.table.capacity[rows, d] - self.table.allocated[rows, d] - self.taken[rows, d]

    def take(self, row: int, amount: np.ndarray) -> None:
        if len(amount) > self.taken.shape[1]:  # a custom resource first seen this cycle
            self.taken = np.hstack(
                [self.taken, np.zeros((len(self.taken), len(amount) - self.taken.shape[1]))]
            )
        self.taken[row, : len(amount)] += amount

    def counts(self, g: Group) -> np.ndarray:
        """Tasks of `g`'s job per row: those running plus those placed this cycle."""
        counts = self._job_rows.get(g.job_id)
        if counts is None:
            counts = np.zeros(len(self.table), dtype=np.int64)
            for name, n in g.placed:
                if (row := self.table.index.get(name)) is not None:
                    counts[row] += n
            self._job_rows[g.job_id] = counts
        return counts

    def static_mask(self, g: Group) -> np.ndarray:
        mask = self.table.schedulable.copy()
        if g.nodes is not None:
            mask &= self.masks.nodes(g.nodes)
        for c in g.constraints:
            mask &= self.masks.constraint(c)
        return mask

    def _limits(self, g: Group, rows: Rows) -> np.ndarray | bool:
        """Rows still under the job's per-node and per-value task limits."""
        if g.max_per_node is None and not g.max_per:
            return True
        ok = np.ones(_size(rows), dtype=bool)
        counts = self.counts(g)
        if g.max_per_node is not None:
            ok &= counts[rows] < g.max_per_node
        for attribute, limit in g.max_per:
            _, inverse = self.masks.column(attribute)
            per_value = np.bincount(inverse, weights=counts, minlength=inverse.max(initial=0) + 1)
            ok &= per_value[inverse[rows]] < limit
        return ok

    def _rows(self, g: Group, mask: np.ndarray, ask: np.ndarray, use_window: bool) -> tuple[Rows, np.ndarray]:
        """Candidate rows (a rotating window on big tables, or the few nodes the job's filters
        leave) and which of them fit `ask`."""
        n = len(self.table)
        if (g.nodes is not None or g.constraints) and n > self.window:
            hits = np.flatnonzero(mask)
            if len(hits) <= self.window:
                return hits, self._fit(g, hits, mask, ask)
        if use_window and n > self.window:
            lo = self._start % (n - self.window + 1)
            self._start += self.window
            rows = slice(lo, lo + self.window)
        else:
            rows = slice(0, n)
        return rows, self._fit(g, rows, mask, ask)

    def _fit(self, g: Group, rows: Rows, mask: np.ndarray, ask: np.ndarray) -> np.ndarray:
        fit = mask[rows] & self._limits(g, rows)
        for d in np.flatnonzero(ask):
            fit &= self.free_column(rows, d) + _EPS >= ask[d]
        return fit

    def score(self, g: Group, strategy: Strategy, rows: Rows, ask: np.ndarray) -> np.ndarray:
        """Higher is better; the strategy's term, plus affinities and spread targets."""
        inverse = self.table.inverse_capacity()
        cap = self.table.capacity
        if strategy is Strategy.LEAST_LOADED:
            added = self.taken[rows, 0] * inverse[rows, 0]
            score = -(self.table.utilization[rows] + added)
        else:
            cpu = (cap[rows, 0] - self.free_column(rows, 0) + ask[0]) * inverse[rows, 0]
            mem = (cap[rows, 1] - self.free_column(rows, 1) + ask[1]) * inverse[rows, 1]
            fullness = (cpu + mem) * 0.5
            score = (
                fullness - _BALANCE * np.abs(cpu - mem)
                if strategy is Strategy.BINPACK
                else -fullness - _EVEN * np.abs(cpu - mem)
            )
        for c, weight in g.affinities:
            score = score + (weight / 100.0) * self.masks.constraint(c)[rows]
        if g.spread is not None:
            # Heavier than any strategy or affinity term: the targets are what the job asked for.
            score = score + 10.0 * self._spread_bonus(g, rows)
        return score

    def _spread_bonus(self, g: Group, rows: Rows) -> np.ndarray:
        """How far each row's attribute value is below its target share of the job."""
        assert g.spread is not None
        values, inverse = self.masks.column(g.spread.attribute)
        counts = np.bincount(inverse, weights=self.counts(g), minlength=len(values))
        live = np.bincount(inverse, weights=self.table.schedulable, minlength=len(values)) > 0
        named = dict(g.spread.targets)
        target = np.array([named.get(v, np.nan) if v is not None else 0.0 for v in values])
        rest = np.isnan(target) & live
        left = max(0.0, 1.0 - sum(named.values())) if named else 1.0
        target[np.isnan(target)] = 0.0
        if rest.any():
            target[rest] = left / rest.sum()
        total = counts.sum() + 1
        return (target - (counts + 1) / total)[inverse[rows]]

    def place(self, g: Group, n: int, strategy: Strategy, ask: np.ndarray) -> list[tuple[int, int]]:
        """Up to `n` tasks of `g` on the best rows; returns (row, how many) pairs."""
        if len(self.table) == 0:
            return []
        mask = self.static_mask(g)
        rows, fit = self._rows(g, mask, ask, use_window=True)
        score = np.where(fit, self.score(g, strategy, rows, ask), _NEG)
        bulk = strategy is Strategy.BINPACK and g.spread is None and not g.max_per
        counts = self.counts(g) if (g.max_per_node or g.max_per or g.spread) else None
        out: list[tuple[int, int]] = []
        while n > 0 and score.size:
            j = int(np.argmax(score))
            if score[j] == _NEG:
                if not isinstance(rows, slice) or _size(rows) == len(self.table):
                    break  # every node the job may use was looked at
                # The window is used up: the rest of the table decides, not the window.
                rows, fit = self._rows(g, mask, ask, use_window=False)
                score = np.where(fit, self.score(g, strategy, rows, ask), _NEG)
                continue
            row = _row(rows, j)
            k = self._how_many(g, row, ask, n, counts) if bulk else 1
            self.take(row, k * ask)
            if counts is not None:
                counts[row] += k
            out.append((row, k))
            n -= k
            if g.spread is not None or g.max_per:
                score = self._rescore(g, strategy, rows, mask, ask)
            else:
                score[j] = self._refresh(g, strategy, row, mask, ask)
        return out

    def _how_many(self, g: Group, row: int, ask: np.ndarray, n: int, counts: np.ndarray | None) -> int:
        need = ask > 0
        room = int(np.floor(np.min((self.free_at(row)[need] + _EPS) / ask[need]))) if need.any() else n
        if g.max_per_node is not None and counts is not None:
            room = min(room, g.max_per_node - int(counts[row]))
        return max(1, min(n, room))

    def _refresh(self, g: Group, strategy: Strategy, row: int, mask: np.ndarray, ask: np.ndarray) -> float:
        """The new score of the one row a placement changed."""
        free = self.free_at(row)
        if not mask[row] or bool((free + _EPS < ask).any()):
            return _NEG
        if (g.max_per_node or g.max_per) and not np.all(self._limits(g, slice(row, row + 1))):
            return _NEG
        if g.affinities:
            return float(self.score(g, strategy, slice(row, row + 1), ask)[0])
        return self._score_one(strategy, row, ask, free)

    def _score_one(self, strategy: Strategy, row: int, ask: np.ndarray, free: np.ndarray) -> float:
        """`score` for a single row in plain floats: the hot path of placing many tasks."""
        cap_cpu, cap_mem = (
            float(self.table.capacity[row, 0]) or 1.0,
            float(self.table.capacity[row, 1]) or 1.0,
        )
        if strategy is Strategy.LEAST_LOADED:
            return -(float(self.table.utilization[row]) + float(self.taken[row, 0]) / cap_cpu)
        cpu, mem = (
            float((cap_cpu - free[0] + ask[0]) / cap_cpu),
            float((cap_mem - free[1] + ask[1]) / cap_mem),
        )
        fullness = (cpu + mem) / 2
        return (
            fullness - _BALANCE * abs(cpu - mem)
            if strategy is Strategy.BINPACK
            else -fullness - _EVEN * abs(cpu - mem)
        )

    def _rescore(
        self, g: Group, strategy: Strategy, rows: Rows, mask: np.ndarray, ask: np.ndarray
    ) -> np.ndarray:
        return np.where(self._fit(g, rows, mask, ask), self.score(g, strategy, rows, ask), _NEG)

    def undo(self, placed: list[tuple[int, int]], g: Group, ask: np.ndarray) -> None:
        counts = self._job_rows.get(g.job_id)
        for row, k in placed:
            self.take(row, -k * ask)
            if counts is not None:
                counts[row] -= k

    def explain(self, g: Group, ask: np.ndarray) -> str:
        """Why no node takes a task of `g`: each node counted at the first filter it fails."""
        left = np.ones(len(self.table), dtype=bool)
        reasons: Counter[tuple[str, str]] = Counter()

        def drop(failing: np.ndarray, one: str, many: str) -> None:
            nonlocal left
            hit = left & failing
            if hit.any():
                reasons[(one, many)] += int(hit.sum())
                left &= ~failing

        drop(~self.table.schedulable, "is down", "are down")
        if g.nodes is not None:
            drop(~self.masks.nodes(g.nodes), "is outside the node set", "are outside the node set")
        for c in g.constraints:
            drop(~self.masks.constraint(c), f"fails {c}", f"fail {c}")
        under = self._limits(g, slice(0, len(self.table)))
        if under is not True:
            drop(~under, "holds the job's most tasks", "hold the job's most tasks")
        for d, dim in enumerate(self.table.dims):
            if ask[d] > 0:
                noun = _NOUN.get(dim, dim)
                free = self.free_column(slice(0, len(self.table)), d)
                drop(free + _EPS < ask[d], f"lacks free {noun}", f"lack free {noun}")
        if not reasons:
            return "no nodes yet" if len(self.table) == 0 else "no node takes it this cycle"
        return ", ".join(
            f"1 node {one}" if count == 1 else f"{count} nodes {many}"
            for (one, many), count in reasons.items()
        )


_NOUN = {"mem": "memory", "cpus": "cpus", "disk": "disk", "gpus": "gpus"}
