"""Where a task that moves goes: the target of a migration or of a drain (pure).

A moving task is one more task of its job while its present copy still runs (a
make-before-break copy starts before the old one stops; a restarted one is placed again
by a plan), so a target must pass what the scheduler checks for any task of the job: the
node takes work, is in the job's node set, passes its constraints, and stays within
`max_per_node` and `max_per` counting every copy of the job, and keeps to its static ports
and hard colocation rules (`core/tags.py`). A job that spreads over an attribute keeps its
spread: its tasks move only between nodes of the same value.
"""

from __future__ import annotations

import numpy as np

from shoal.core.cluster import MaskCache, NodeTable
from shoal.core.placement import Group, Placer
from shoal.core.tags import binding
from shoal.model import Strategy

_EPS = 1e-9


def admissible(table: NodeTable, masks: MaskCache, g: Group, source: str) -> np.ndarray | None:
    """Rows that may take the task of `g` moving off `source`, room aside (None: every
    row the table calls schedulable)."""
    if g.nodes is None and not g.constraints and not _limited(g) and not binding(table.tags, g.presence):
        return None
    placer = Placer(table, masks, window=max(len(table), 1))
    ok = placer.static_mask(g)
    if _limited(g):
        ok &= placer.limits(g, slice(0, len(table)))
    if g.spread is not None and (row := table.index.get(source)) is not None:
        _, inverse = masks.column(g.spread.attribute)
        ok &= inverse == inverse[row]
    return ok


def best_target(
    table: NodeTable,
    masks: MaskCache,
    g: Group,
    source: str,
    strategy: Strategy,
    usable: np.ndarray | None = None,
) -> str | None:
    """The node a task of `g` moving off `source` should go to, by the job's strategy, among
    the admissible nodes with room for it now (and in `usable`, where given: say, those with
    free ports); None when there is none."""
    ask = table.vector(g.ask)
    ok = table.schedulable.copy() if usable is None else table.schedulable & usable
    if (allowed := admissible(table, masks, g, source)) is not None:
        ok &= allowed
    for d in np.flatnonzero(ask):
        ok &= table.free[:, d] >= ask[d] - _EPS
    if (row := table.index.get(source)) is not None:
        ok[row] = False
    rows = np.flatnonzero(ok)
    if not len(rows):
        return None
    placer = Placer(table, masks, window=max(len(table), 1))
    score = placer.score(g, strategy, rows, ask)
    return table.names[int(rows[int(np.argmax(score))])]


def _limited(g: Group) -> bool:
    return bool(g.max_per_node or g.max_per or g.spread)
