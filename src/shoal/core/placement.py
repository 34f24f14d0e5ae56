"""Placing the tasks of one group: filters as boolean masks, strategies as score vectors.

Every decision here is a numpy operation over node rows. A group's static mask (node up,
in its node set, passing its constraints) comes from the MaskCache; the resource fit and the
score are computed over a window of candidate rows, and each placement updates only the
chosen row, so placing k tasks costs one setup plus k argmaxes. With binpack a node keeps
taking tasks until it is full, so a large array fills node after node in bulk.
A job with static ports or colocation rules (`Group.presence`, `core/tags.py`) also reads
the tags of the tasks on each node, those placed earlier in the cycle included: each
placement adds its job's tags to its node at once, and the cycle takes them back at its end.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from shoal.core import tags
from shoal.core.cluster import MaskCache, NodeTable
from shoal.core.tags import Presence, Tag
from shoal.expressions import Constraint
from shoal.model import Resources, Strategy

NO_NODES = "no nodes yet"  # why every task waits while no node has registered
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


@dataclass(slots=True, eq=False)
class Group:
    """The pending tasks of one job: identical asks, the job's rules, in index order.
    Read-only by convention, not frozen: every cycle makes one per job, and a frozen
    dataclass sets each of these fields through object.__setattr__."""

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
    presence: Presence | None = None  # its static ports and colocation rules


@dataclass
class Placer:
    """One scheduling cycle's working view, and per-job counts. A placement is taken from
    the table's own free matrix the moment it is decided, so every row the cycle looks at is
    current without a copy of the table per cycle (a cycle costs nothing per node it does not
    consider); `restore` recomputes the rows it touched from capacity and allocation, so the
    table leaves the cycle exactly as it came in."""

    table: NodeTable
    masks: MaskCache
    window: int
    _touched: set[int] = field(default_factory=set)
    _turns: int = 0
    _job_rows: dict[int, np.ndarray] = field(default_factory=dict)
    _marks: list[tuple[int, tuple[Tag, ...], int]] = field(default_factory=list)  # (row, tags, n)

    def take(self, row: int, amount: np.ndarray) -> None:
        self.table.free[row, : len(amount)] -= amount
        self._touched.add(row)

    def take_many(self, rows: np.ndarray, amounts: np.ndarray) -> None:
        """`take` on several rows at once (`amounts`: one row of the table's width each)."""
        self.table.free[rows] -= amounts
        self._touched.update(rows.tolist())

    def mark(self, g: Group, row: int, n: int) -> None:
        """`n` more tasks of `g` on `row` (fewer, if negative): their tags are on it."""
        if g.presence is not None:
            self.table.tags.add(row, g.presence.provides, n)
            self._marks.append((row, g.presence.provides, n))

    def restore(self) -> None:
        """Give back all the cycle took: the table's free room and tags as before the cycle."""
        if self._touched:
            self.table.reset_free(np.fromiter(self._touched, dtype=np.int64, count=len(self._touched)))
            self._touched.clear()
        for row, marked, n in reversed(self._marks):
            self.table.tags.add(row, marked, -n)
        self._marks.clear()

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
        """Rows `g` may use, room and per-node limits aside (a fresh array)."""
        filters = self.masks.filters(g.constraints, g.nodes)
        mask = self.table.schedulable.copy() if filters is None else self.table.schedulable & filters
        if (
            g.presence is not None
            and (ok := tags.allowed(self.table.tags, len(mask), g.presence)) is not None
        ):
            mask &= ok
        return mask

    def limits(self, g: Group, rows: Rows) -> np.ndarray | bool:
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

    def _rows(self, g: Group, mask: np.ndarray, ask: np.ndarray) -> tuple[Rows, np.ndarray]:
        """Candidate rows and which of them fit `ask`: the few nodes the job's filters leave,
        or, on a table larger than the window, a window at a point drawn from the job and the
        turn (deterministic, and spread over the table so turns do not crowd its first rows)."""
        n = len(self.table)
        if n <= self.window:
            return slice(0, n), self._fit(g, slice(0, n), mask, ask)
        if g.nodes is not None or g.constraints or (g.presence is not None and g.presence.need):
            hits = np.flatnonzero(mask)
            if len(hits) <= self.window:
                return hits, self._fit(g, hits, mask, ask)
        self._turns += 1
        lo = hash((g.job_id, self._turns)) % n
        rows = slice(lo, min(lo + self.window, n))
        return rows, self._fit(g, rows, mask, ask)

    def _next(self, g: Group, rows: slice, mask: np.ndarray, ask: np.ndarray) -> tuple[slice, np.ndarray]:
        """The window after `rows`, wrapping around the table."""
        lo = rows.stop % len(self.table)
        rows = slice(lo, min(lo + self.window, len(self.table)))
        return rows, self._fit(g, rows, mask, ask)

    def _fit(self, g: Group, rows: Rows, mask: np.ndarray, ask: np.ndarray) -> np.ndarray:
        fit = mask[rows] & self.limits(g, rows)
        free = self.table.free
        for d in np.flatnonzero(ask):
            fit &= free[rows, d] >= ask[d] - _EPS
        return fit

    def score(self, g: Group, strategy: Strategy, rows: Rows, ask: np.ndarray) -> np.ndarray:
        """Higher is better; the strategy's term, plus affinities and spread targets."""
        inverse = self.table.inverse_capacity()
        free = self.table.free
        if strategy is Strategy.LEAST_LOADED:
            taken = self.table.capacity[rows, 0] - self.table.allocated[rows, 0] - free[rows, 0]
            score = -(self.table.utilization[rows] + taken * inverse[rows, 0])
        else:
            left_cpu = (free[rows, 0] - ask[0]) * inverse[rows, 0]
            left_mem = (free[rows, 1] - ask[1]) * inverse[rows, 1]
            score = _fullness(strategy, left_cpu, left_mem)
        for c, weight in g.affinities:
            score = score + (weight / 100.0) * self.masks.constraint(c)[rows]
        if g.presence is not None and g.presence.prefer:
            score = score + tags.score(self.table.tags, len(self.table), g.presence, rows)
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
        size = len(self.table)
        if size == 0:
            return []
        mask = self.static_mask(g)
        rows, fit = self._rows(g, mask, ask)
        looked = _size(rows)
        score = np.where(fit, self.score(g, strategy, rows, ask), _NEG)
        # A job whose tasks change what it reads of a node places one task at a time.
        reflexive = g.presence is not None and g.presence.reflexive
        bulk = strategy is Strategy.BINPACK and g.spread is None and not g.max_per and not reflexive
        counts = self.counts(g) if (g.max_per_node or g.max_per or g.spread) else None
        asked = ask.tolist()
        out: list[tuple[int, int]] = []
        while n > 0 and score.size:
            j = int(score.argmax())
            if score[j] == _NEG:
                if not isinstance(rows, slice) or looked >= size:
                    break  # every node the job may use was looked at
                rows, fit = self._next(g, rows, mask, ask)  # this window is used up
                looked += _size(rows)
                score = np.where(fit, self.score(g, strategy, rows, ask), _NEG)
                continue
            row = _row(rows, j)
            k = self._how_many(g, row, ask, n, counts) if bulk else 1
            self.take(row, k * ask)
            self.mark(g, row, k)
            if counts is not None:
                counts[row] += k
            out.append((row, k))
            n -= k
            if reflexive:
                mask[row] = self._admits(g, row)
            if g.spread is not None or g.max_per:
                score = self._rescore(g, strategy, rows, mask, ask)
            else:
                score[j] = self._refresh(g, strategy, row, mask, asked)
        return out

    def _admits(self, g: Group, row: int) -> bool:
        """Whether `row` takes a task of `g` by the tags on it now (its own tasks' included)."""
        return g.presence is None or tags.refusal(self.table.tags, row, g.presence) is None

    def capacity(self, g: Group, ask: np.ndarray) -> int:
        """At most how many tasks of `g` the free room holds now, each node on its own (exact
        for tasks alike, short of per-value limits and spread targets)."""
        need = np.flatnonzero(ask > _EPS)
        if len(need) == 0:
            return len(g.tasks)
        free = self.table.free
        if len(need) == 1:  # the usual ask, in one dimension that counts: no minimum to take
            d = int(need[0])
            per_row = np.floor((free[:, d] + _EPS) / ask[d])
        else:
            per_row = np.floor(np.min((free[:, need] + _EPS) / ask[need], axis=1))
        filters = self.masks.filters(g.constraints, g.nodes)
        usable = self.table.schedulable if filters is None else self.table.schedulable & filters
        if g.max_per_node is not None or g.max_per:
            usable = usable & self.limits(g, slice(0, len(self.table)))
        if g.max_per_node is not None:
            per_row = np.minimum(per_row, g.max_per_node - self.counts(g))
        if g.presence is not None:
            if (ok := tags.allowed(self.table.tags, len(self.table), g.presence)) is not None:
                usable = usable & ok
            if g.presence.one_per_node:
                per_row = np.minimum(per_row, 1)
        return int(per_row[usable & (per_row > 0)].sum())

    def _how_many(self, g: Group, row: int, ask: np.ndarray, n: int, counts: np.ndarray | None) -> int:
        need = ask > 0
        free = self.table.free[row, : len(ask)]
        room = int(np.floor(np.min((free[need] + _EPS) / ask[need]))) if need.any() else n
        if g.max_per_node is not None and counts is not None:
            room = min(room, g.max_per_node - int(counts[row]))
        return max(1, min(n, room))

    def _refresh(self, g: Group, strategy: Strategy, row: int, mask: np.ndarray, ask: list[float]) -> float:
        """The new score of the one row a placement changed, in plain floats: the hot path
        of placing many tasks."""
        free = self.table.free[row].tolist()
        if not mask[row] or any(f < a - _EPS for f, a in zip(free, ask, strict=False)):
            return _NEG
        if (g.max_per_node or g.max_per) and not np.all(self.limits(g, slice(row, row + 1))):
            return _NEG
        if g.affinities or (g.presence is not None and g.presence.prefer):
            return float(self.score(g, strategy, slice(row, row + 1), np.array(ask))[0])
        inverse = self.table.inverse_capacity()[row]
        if strategy is Strategy.LEAST_LOADED:
            taken = float(self.table.capacity[row, 0] - self.table.allocated[row, 0]) - free[0]
            return -(float(self.table.utilization[row]) + taken * float(inverse[0]))
        return _fullness(
            strategy, (free[0] - ask[0]) * float(inverse[0]), (free[1] - ask[1]) * float(inverse[1])
        )

    def _rescore(
        self, g: Group, strategy: Strategy, rows: Rows, mask: np.ndarray, ask: np.ndarray
    ) -> np.ndarray:
        return np.where(self._fit(g, rows, mask, ask), self.score(g, strategy, rows, ask), _NEG)

    def undo(self, placed: list[tuple[int, int]], g: Group, ask: np.ndarray) -> None:
        counts = self._job_rows.get(g.job_id)
        for row, k in placed:
            self.take(row, -k * ask)
            self.mark(g, row, -k)
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
        if g.presence is not None:
            for failing, one, many in tags.reasons(self.table.tags, len(self.table), g.presence):
                drop(failing, one, many)
        under = self.limits(g, slice(0, len(self.table)))
        if under is not True:
            drop(~under, "holds the job's most tasks", "hold the job's most tasks")
        for d, dim in enumerate(self.table.dims):
            if ask[d] > 0:
                noun = _NOUN.get(dim, dim)
                drop(self.table.free[:, d] < ask[d] - _EPS, f"lacks free {noun}", f"lack free {noun}")
        if not reasons:
            return NO_NODES if len(self.table) == 0 else "no node takes it this cycle"
        return ", ".join(
            f"1 node {one}" if count == 1 else f"{count} nodes {many}"
            for (one, many), count in reasons.items()
        )


def _fullness(strategy: Strategy, left_cpu: Any, left_mem: Any) -> Any:
    """The binpack or spread term from the fractions of a node's cpus and memory left free
    once the task is on it (arrays of rows, or one row's floats)."""
    if strategy is Strategy.BINPACK:
        return -(left_cpu + left_mem) * 0.5 - _BALANCE * abs(left_cpu - left_mem)
    return (left_cpu + left_mem) * 0.5 - _EVEN * abs(left_cpu - left_mem)


_NOUN = {"mem": "memory", "cpus": "cpus", "disk": "disk", "gpus": "gpus"}
