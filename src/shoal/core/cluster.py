"""The cluster as the scheduler sees it: nodes as rows of numpy arrays, updated in place.

A `NodeTable` holds, per node, its capacity, allocation and free room (one column per
resource dimension), whether it takes new work, its live CPU utilization, its attributes
and the tags of the tasks on it (`core/tags.py`).
The ledger keeps it current with `upsert`, `allocate` and `release`: nothing is rebuilt per
scheduling cycle, so a cycle costs what its decisions cost, not what the cluster weighs.
The matrices are column-major: scoring reads one resource over many rows, which is then a
contiguous run of memory.
Rows are never removed (a node that leaves is marked unschedulable), so a row index stays a
valid name for a node for the table's life. `MaskCache` turns constraints and node sets into
boolean masks over the rows, computed once per distinct attribute value and kept until the
table's membership or attributes change.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np

from shoal.core.tags import Tags
from shoal.expressions import Constraint
from shoal.model import Resources

_VECTORS = 4096  # resource vectors remembered (a job's tasks share one)

BASE_DIMS = ("cpus", "mem", "disk", "gpus")


class NodeTable:
    def __init__(self, capacity_hint: int = 64) -> None:
        self.dims: list[str] = list(BASE_DIMS)
        self._dim_index = {d: i for i, d in enumerate(self.dims)}
        self.names: list[str] = []
        self.index: dict[str, int] = {}
        rows = max(capacity_hint, 1)
        self._capacity = _matrix(rows, len(self.dims))
        self._allocated = _matrix(rows, len(self.dims))
        self._free = _matrix(rows, len(self.dims))
        self._schedulable = np.zeros(rows, dtype=bool)
        self._utilization = np.zeros(rows)
        self.attributes: list[Mapping[str, str]] = []
        # Who is on each row (job names, services, ports): kept by the ledger as free room is.
        self.tags = Tags()
        # Bumped whenever attributes or membership change: caches of masks key on it.
        self.version = 0
        self._vectors: dict[int, tuple[Resources, np.ndarray]] = {}  # id -> (resources, vector)
        self._derived: dict[str, np.ndarray] = {}  # totals and inverses, dropped on any change
        self._fits: dict[bytes, bool] = {}

    # --- views over the live rows --------------------------------------------------------

    def __len__(self) -> int:
        return len(self.names)

    @property
    def capacity(self) -> np.ndarray:
        return self._capacity[: len(self.names)]

    @property
    def allocated(self) -> np.ndarray:
        return self._allocated[: len(self.names)]

    @property
    def free(self) -> np.ndarray:
        """Capacity minus allocation, kept in step by every change. A scheduling cycle's
        `Placer` writes its tentative placements here and takes them back before it ends."""
        return self._free[: len(self.names)]

    @property
    def schedulable(self) -> np.ndarray:
        return self._schedulable[: len(self.names)]

    @property
    def utilization(self) -> np.ndarray:
        """Live CPU utilization per node, 0..1, as last reported."""
        return self._utilization[: len(self.names)]

    def total(self) -> np.ndarray:
        """The capacity of the schedulable nodes, per dimension."""
        if "total" not in self._derived:
            self._derived["total"] = (self.capacity * self.schedulable[:, None]).sum(axis=0)
        return self._derived["total"]

    def inverse_capacity(self) -> np.ndarray:
        """1 / capacity per row and dimension (0 where the capacity is 0)."""
        if "inverse" not in self._derived:
            cap = self.capacity
            self._derived["inverse"] = np.divide(1.0, cap, out=np.zeros_like(cap), where=cap > 0)
        return self._derived["inverse"]

    def fits_somewhere(self, vec: np.ndarray) -> bool:
        """Whether some node, even empty, could hold `vec`."""
        key = vec.tobytes()
        if key not in self._fits:
            self._fits[key] = bool(np.any(np.all(self.capacity + 1e-9 >= vec, axis=1)))
        return self._fits[key]

    def _changed(self) -> None:
        self._derived.clear()
        self._fits.clear()

    # --- resource vectors ----------------------------------------------------------------

    def vector(self, resources: Resources) -> np.ndarray:
        """`resources` as a row over this table's dimensions (read-only: it is shared). A read
        never widens the table: a custom resource no node has declared is an error (callers
        refuse such asks first)."""
        # A job's tasks share one Resources object: its vector is made once, not per task.
        hit = self._vectors.get(id(resources))
        if hit is not None and hit[0] is resources and len(hit[1]) == len(self.dims):
            return hit[1]
        row = self._vector(resources)
        row.flags.writeable = False
        if len(self._vectors) >= _VECTORS:
            self._vectors.clear()
        self._vectors[id(resources)] = (resources, row)
        return row

    def _vector(self, resources: Resources) -> np.ndarray:
        row = np.zeros(len(self.dims))
        row[:4] = (resources.cpus, resources.mem, resources.disk, resources.gpus)
        for name, amount in resources.custom.items():
            index = self._dim_index.get(name)
            if index is None:
                raise KeyError(f"no node has a resource named {name!r}")
            row[index] = amount
        return row

    def resources(self, row: np.ndarray) -> Resources:
        """A row over this table's dimensions (a node's allocation, say) as `Resources`."""
        custom = {d: float(v) for d, v in zip(self.dims[4:], row[4:], strict=True) if v}
        return Resources(
            cpus=round(float(row[0]), 6), mem=int(row[1]), disk=int(row[2]), gpus=int(row[3]), custom=custom
        )

    def declare(self, name: str) -> None:
        """A resource dimension, added unless the table has it (new columns are all zero)."""
        if name in self._dim_index:
            return
        self._dim_index[name] = len(self.dims)
        self.dims.append(name)
        self._changed()
        for attr in ("_capacity", "_allocated", "_free"):
            old = getattr(self, attr)
            new = _matrix(old.shape[0], len(self.dims))
            new[:, : old.shape[1]] = old
            setattr(self, attr, new)

    # --- changes -------------------------------------------------------------------------

    def upsert(self, name: str, capacity: Resources, attributes: Mapping[str, str], schedulable: bool) -> int:
        """Add a node or refresh what it reports; returns its row. A custom resource the node
        declares adds a dimension, the one way the table widens."""
        for dim in capacity.custom:
            self.declare(dim)
        vec = self.vector(capacity)
        row = self.index.get(name)
        if row is None:
            row = len(self.names)
            self._grow(row + 1)
            self.names.append(name)
            self.index[name] = row
            self.attributes.append(dict(attributes))
            self.version += 1
        elif self.attributes[row] != attributes:
            self.attributes[row] = dict(attributes)
            self.version += 1
        if not (np.array_equal(self._capacity[row], vec) and self._schedulable[row] == schedulable):
            self._capacity[row] = vec
            self.reset_free(row)
            self._schedulable[row] = schedulable
            self._changed()
        return row

    def set_schedulable(self, name: str, schedulable: bool) -> None:
        self._schedulable[self.index[name]] = schedulable
        self._changed()

    def set_utilization(self, name: str, fraction: float) -> None:
        self._utilization[self.index[name]] = fraction

    def allocate(self, row: int, vec: np.ndarray) -> None:
        self._allocated[row, : len(vec)] += vec
        self.reset_free(row)

    def allocate_many(self, rows: np.ndarray, vecs: np.ndarray) -> None:
        np.add.at(self._allocated[:, : vecs.shape[1]], rows, vecs)
        self.reset_free(rows)

    def release(self, row: int, vec: np.ndarray) -> None:
        self._allocated[row, : len(vec)] -= vec
        self.reset_free(row)

    def reset_free(self, rows: int | np.ndarray) -> None:
        """Free room of `rows` as capacity minus allocation. Always recomputed, never adjusted
        by the amounts that changed: then it is exactly what it would be computed afresh,
        whatever the history (and whatever a cycle took from it tentatively)."""
        self._free[rows] = self._capacity[rows] - self._allocated[rows]

    def _grow(self, rows: int) -> None:
        have = self._capacity.shape[0]
        if rows <= have:
            return
        size = max(rows, have * 2)
        for attr in ("_capacity", "_allocated", "_free"):
            old = getattr(self, attr)
            new = _matrix(size, old.shape[1])
            new[:have] = old
            setattr(self, attr, new)
        for attr, dtype in (("_schedulable", bool), ("_utilization", float)):
            old = getattr(self, attr)
            new = np.zeros(size, dtype=dtype)
            new[:have] = old
            setattr(self, attr, new)


def _matrix(rows: int, dims: int) -> np.ndarray:
    return np.zeros((rows, dims), order="F")


class MaskCache:
    """Boolean masks over a table's rows, per constraint and per node set."""

    def __init__(self, table: NodeTable) -> None:
        self.table = table
        self._version = -1
        self._masks: dict[object, np.ndarray] = {}
        self._columns: dict[str, tuple[list[str | None], np.ndarray]] = {}

    def _fresh(self) -> None:
        if self._version != self.table.version:
            self._masks.clear()
            self._columns.clear()
            self._version = self.table.version

    def constraint(self, c: Constraint) -> np.ndarray:
        self._fresh()
        mask = self._masks.get(c)
        if mask is None:
            values, inverse = self.column(c.attribute)
            verdicts = np.array(
                [c.matches({c.attribute: v} if v is not None else {}) for v in values], dtype=bool
            )
            mask = self._masks[c] = verdicts[inverse] if len(inverse) else np.zeros(0, dtype=bool)
        return mask

    def filters(self, constraints: Iterable[Constraint], names: frozenset[str] | None) -> np.ndarray | None:
        """Rows passing every constraint and inside the node set `names`; None when there
        is neither (every row passes)."""
        constraints = tuple(constraints)
        if not constraints and names is None:
            return None
        mask = np.ones(len(self.table), dtype=bool)
        if names is not None:
            mask &= self.nodes(names)
        for c in constraints:
            mask &= self.constraint(c)
        return mask

    def nodes(self, names: frozenset[str]) -> np.ndarray:
        self._fresh()
        mask = self._masks.get(names)
        if mask is None:
            mask = np.zeros(len(self.table), dtype=bool)
            rows = [self.table.index[n] for n in names if n in self.table.index]
            mask[rows] = True
            self._masks[names] = mask
        return mask

    def column(self, attribute: str) -> tuple[list[str | None], np.ndarray]:
        """The distinct values of `attribute` and, per row, the index of its value."""
        self._fresh()
        col = self._columns.get(attribute)
        if col is None:
            codes: dict[str | None, int] = {}
            inverse = np.fromiter(
                (codes.setdefault(a.get(attribute), len(codes)) for a in self.table.attributes),
                dtype=np.int64,
                count=len(self.table),
            )
            col = self._columns[attribute] = (list(codes), inverse)
        return col
