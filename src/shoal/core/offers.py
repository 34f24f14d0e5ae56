"""The offer allocator: which framework is offered which node's free resources, this cycle.

    allocation = allocate(table, shares, claimants, outstanding, policy, seed)

Frameworks (two-level scheduling, as in Mesos) are offered a node's whole unallocated
resources and decide themselves what to run on them. What is free is divided by weighted
Dominant Resource Fairness in two levels: roles first (a role is a queue of the native
scheduler: the same weights, guarantees and limits govern both), then frameworks within a
role. Native tasks count in their queue's share, so frameworks and native jobs of one role
share one allowance.

One cycle:
1. Claimants take turns, the lowest key first: roles below their guarantee, then the lowest
   weighted dominant share of the role, then of the framework. A turn offers the claimant
   nodes, in a seeded shuffled order, until its key passes the next claimant's (by at least
   `QUANTUM`), never past its role's limit: whole nodes at a time, so a cycle over 10,000
   nodes takes about a hundred vectorized turns, not 10,000 single ones.
2. Offers held and not yet answered count as the holder's, so hoarding raises a framework's
   share and sends it to the back.
3. No starvation: a framework below its fair share that holds no offer and got none from the
   free nodes (because others hold them in offers) is given one anyway: an offer of a
   framework above its own fair share, held long enough to have been answered, is rescinded
   and its node offered to the starved one.
   Fair share is weighted: a role's weight over the weights of the roles asking, split evenly
   among the frameworks of the role.

A node is in at most one offer: rows offered this cycle leave the pool, and the ledger holds
outstanding offers as allocated, so the next cycle does not see them as free. No I/O, no
clock, no randomness beyond the seed.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from shoal.core.cluster import NodeTable
from shoal.core.fairness import Shares
from shoal.core.scheduler import Policy

QUANTUM = 0.01  # how far past the next claimant's share one turn carries a claimant
MIN_CPUS = 0.01  # less than this and MIN_MEM of both is not worth offering (Mesos's rule)
MIN_MEM = 32.0


@dataclass(frozen=True, slots=True)
class Claimant:
    """A framework that wants offers: subscribed and not suppressed."""

    id: str
    role: str
    filtered: frozenset[int] = frozenset()  # rows it declined, while their filters last
    holds_offer: bool = False


@dataclass(frozen=True, slots=True)
class Outstanding:
    """An offer made in an earlier cycle and not answered yet."""

    id: str
    framework: str
    role: str
    row: int
    amount: np.ndarray
    rescindable: bool = True  # held long enough that its holder had time to answer


@dataclass(frozen=True, slots=True)
class Offered:
    """Offers to one framework: one per row, `amounts[i]` on `rows[i]`."""

    framework: str
    rows: np.ndarray
    amounts: np.ndarray


@dataclass(frozen=True, slots=True)
class Allocation:
    offers: tuple[Offered, ...] = ()
    rescinded: tuple[str, ...] = ()  # ids of outstanding offers taken back for starved frameworks
    fair: Mapping[str, float] = field(default_factory=dict)  # framework -> its fair dominant share


def offerable(free: np.ndarray) -> np.ndarray:
    """Per row: whether its free resources are worth an offer."""
    return (free[:, 0] >= MIN_CPUS - 1e-9) | (free[:, 1] >= MIN_MEM - 1e-9)


def fair_shares(claimants: Sequence[Claimant], policy: Policy) -> dict[str, float]:
    """Each claimant's weighted fair dominant share among those asking now."""
    by_role: dict[str, list[str]] = {}
    for c in claimants:
        by_role.setdefault(c.role, []).append(c.id)
    weights = {role: policy.queue(role).weight for role in by_role}
    total = sum(weights.values())
    return {fw: weights[role] / total / len(members) for role, members in by_role.items() for fw in members}


def native_caps(
    shares: Shares, claimants: Sequence[Claimant], backlogged: Iterable[str], policy: Policy
) -> dict[str, float]:
    """Limits (dominant shares) for native queues while frameworks wait.

    The native scheduler places at once whatever frees up; frameworks are offered only what
    it leaves. So while a role with frameworks asking for offers is below its weighted fair
    share, a native queue with pending work that already holds its own fair share may not
    grow: what its tasks free goes to the offer cycle instead. Fair shares are weighted
    among the roles asking now (framework roles and backlogged queues alike)."""
    asking = {c.role for c in claimants}
    roles = asking | set(backlogged)
    weights = {r: policy.queue(r).weight for r in roles}
    total = sum(weights.values())
    fair = {r: w / total for r, w in weights.items()}
    if not any(shares.share(r) < fair[r] - 1e-9 for r in asking):
        return {}
    return {q: fair[q] for q in backlogged if q not in asking and shares.share(q) >= fair[q] - 1e-9}


def allocate(
    table: NodeTable,
    shares: Shares,
    claimants: Sequence[Claimant],
    outstanding: Iterable[Outstanding],
    policy: Policy,
    seed: int,
) -> Allocation:
    """Offers for this cycle. `shares` holds what runs (by role and framework) and is grown
    here by every offer, outstanding or new; `table`'s allocation includes outstanding offers."""
    claimants = sorted(claimants, key=lambda c: c.id)
    outstanding = list(outstanding)
    if not claimants or len(table) == 0:
        return Allocation()
    for o in outstanding:
        shares.add(o.role, o.framework, o.amount)
    free = np.maximum(table.free, 0.0)
    pool = table.schedulable & offerable(free)
    order = np.random.default_rng(seed).permutation(len(table))
    turns = _Turns(table, shares, claimants, policy, free, pool, order)
    turns.run()
    fair = fair_shares(claimants, policy)
    rescinded = turns.relieve_starved(fair, outstanding)
    return Allocation(tuple(turns.offers), tuple(rescinded), fair)


class _Turns:
    """The working state of one allocation cycle."""

    def __init__(
        self,
        table: NodeTable,
        shares: Shares,
        claimants: Sequence[Claimant],
        policy: Policy,
        free: np.ndarray,
        pool: np.ndarray,
        order: np.ndarray,
    ) -> None:
        self.table = table
        self.shares = shares
        self.claimants = {c.id: c for c in claimants}
        self.policy = policy
        self.free = free
        self.pool = pool
        self.line = order[pool[order]]  # the rows to offer, in the cycle's order
        self.start = 0  # rows of `line` before this are all offered
        self.dims = len(table.dims)
        self.total = table.total()
        self.inverse_total = np.divide(1.0, self.total, out=np.zeros_like(self.total), where=self.total > 0)
        self.offers: list[Offered] = []
        self.got: set[str] = set()
        self._masks: dict[str, np.ndarray] = {}
        # Parts of the claimants' keys, dropped when the usage under them changes.
        self._levels: dict[str, tuple[int, float]] = {}
        self._mine: dict[str, float] = {}

    def key(self, c: Claimant) -> tuple[int, float, float, str]:
        level = self._levels.get(c.role)
        if level is None:
            guarantee = self.policy.queue(c.role).guarantee
            share = self.shares.share(c.role)
            if share < guarantee:
                level = self._levels[c.role] = (0, share / guarantee)
            else:
                level = self._levels[c.role] = (1, self.shares.of_queue(c.role))
        mine = self._mine.get(c.id)
        if mine is None:
            mine = self._mine[c.id] = self.shares.of_user(c.role, c.id)
        return (*level, mine, c.id)

    def candidates(self, c: Claimant, size: int) -> np.ndarray:
        """The first `size` rows `c` may be offered, in the cycle's shuffled order. Rows leave
        the pool mostly from the front of that order, so this looks at a window just past
        what is gone: a turn costs what it offers, not what the cluster holds."""
        mask = self._mask(c)
        line = self.line
        while self.start < len(line) and not self.pool[line[self.start]]:
            window = line[self.start : self.start + 256]
            alive = self.pool[window]
            self.start += int(np.argmax(alive)) if alive.any() else len(window)
        span = 2 * size
        while True:
            rows = line[self.start : self.start + span]
            ok = self.pool[rows] if mask is None else self.pool[rows] & mask[rows]
            picked = rows[ok]
            if len(picked) >= size or self.start + span >= len(line):
                return picked[:size]
            span *= 4

    def _mask(self, c: Claimant) -> np.ndarray | None:
        """Where `c` may be offered (None: anywhere)."""
        if not c.filtered:
            return None
        mask = self._masks.get(c.id)
        if mask is None:
            mask = np.ones(len(self.table), dtype=bool)
            mask[[r for r in c.filtered if r < len(mask)]] = False
            self._masks[c.id] = mask
        return mask

    def run(self) -> None:
        live = list(self.claimants.values())
        while live and self.pool.any():
            live.sort(key=self.key)
            rival = live[1] if len(live) > 1 else None
            if not self._turn(live[0], rival):
                live.pop(0)  # nothing it may take: out of this cycle

    def _turn(self, c: Claimant, rival: Claimant | None) -> bool:
        """Offer `c` the nodes that carry its key past the rival's; False if it can take none."""
        first = self.candidates(c, 1)
        if not len(first):
            return False
        headroom = self._headroom(c.role)
        amount = self.free[first[0], : self.dims]
        if np.any(amount > headroom + 1e-9):
            partial = np.minimum(amount, headroom)[None, :]
            if not offerable(partial)[0]:
                return False
            self._offer(c, first, partial)
            return True
        rows = self._enough(c, rival, headroom)
        self._offer(c, rows, self.free[rows, : self.dims].copy())
        return True

    def _enough(self, c: Claimant, rival: Claimant | None, headroom: np.ndarray) -> np.ndarray:
        """The candidates that carry `c` past the rival's key without passing its role's limit
        (at least one), from a prefix that grows until it has the answer."""
        used, weight, target = self._race(c, rival)
        size = 64
        while True:
            rows = self.candidates(c, size)
            cumulative = np.cumsum(self.free[rows, : self.dims], axis=0)
            within = np.all(cumulative <= headroom + 1e-9, axis=1)
            fits = int(np.argmin(within)) if not within.all() else len(rows)
            if target is not None:
                after = np.max((used + cumulative[:fits]) * self.inverse_total, axis=1) / weight
                passed = after > target + QUANTUM
                if passed.any():
                    return rows[: int(np.argmax(passed)) + 1]
            if fits < len(rows) or len(rows) < size:
                return rows[: max(fits, 1)]
            size *= 2

    def _race(self, c: Claimant, rival: Claimant | None) -> tuple[np.ndarray, float, float | None]:
        """What `c` must pass the rival in: its usage, its weight and the rival's level."""
        if rival is None:
            return np.zeros(self.dims), 1.0, None
        next_key = self.key(rival)
        if next_key[0] == 0 or rival.role != c.role:
            # Roles differ (or the rival's role is below its guarantee): compare role shares.
            used = self.shares.queue[c.role][: self.dims]
            return used, self.policy.queue(c.role).weight, next_key[1] if next_key[0] == 1 else 0.0
        used = self.shares.user[(c.role, c.id)][: self.dims]
        return used, self.policy.user_weights.get(c.id, 1.0), next_key[2]

    def _headroom(self, role: str) -> np.ndarray:
        limit = self.policy.queue(role).limit
        if limit >= 1.0:
            return np.full(self.dims, np.inf)
        return np.maximum(limit * self.total - self.shares.queue[role][: self.dims], 0.0)

    def _offer(self, c: Claimant, rows: np.ndarray, amounts: np.ndarray) -> None:
        self.offers.append(Offered(c.id, rows, amounts))
        self.pool[rows] = False
        self.free[rows, : amounts.shape[1]] -= amounts
        self.shares.add(c.role, c.id, amounts.sum(axis=0))
        self.got.add(c.id)
        self._forget(c)

    def _forget(self, c: Claimant) -> None:
        self._levels.pop(c.role, None)
        self._mine.pop(c.id, None)

    def _without(self, o: Outstanding) -> np.ndarray:
        """What would be free on `o`'s node were `o` rescinded. An offer made before a node
        brought a resource new to the cluster has fewer dimensions than the table now."""
        free = self.free[o.row, : self.dims].copy()
        free[: len(o.amount)] += o.amount
        return free

    def relieve_starved(self, fair: Mapping[str, float], outstanding: list[Outstanding]) -> list[str]:
        """Rescind an over-share framework's offer for each starved one; their ids."""
        rescinded: list[str] = []
        held: dict[str, list[Outstanding]] = {}
        for o in outstanding:
            if o.rescindable and o.framework in fair:
                held.setdefault(o.framework, []).append(o)
        for c in sorted(self.claimants.values(), key=self.key):
            if c.id in self.got or c.holds_offer or self._dominant(c.id) >= fair[c.id] - 1e-9:
                continue
            headroom = self._headroom(c.role)
            over = sorted(
                (f for f in held if f != c.id and self._dominant(f) > fair[f] + 1e-9),
                key=lambda f: (-self._dominant(f), f),
            )
            taken = next(
                (
                    o
                    for f in over
                    for o in held[f]
                    if o.row not in c.filtered
                    and offerable(np.minimum(self._without(o), headroom)[None, :])[0]
                ),
                None,
            )
            if taken is None:
                continue
            held[taken.framework].remove(taken)
            rescinded.append(taken.id)
            donor = self.claimants[taken.framework]
            self.shares.add(donor.role, donor.id, -taken.amount)
            self._forget(donor)
            self.free[taken.row, : len(taken.amount)] += taken.amount
            amount = np.minimum(self.free[taken.row, : self.dims], headroom)[None, :]
            self._offer(c, np.array([taken.row]), amount)
        return rescinded

    def _dominant(self, framework: str) -> float:
        return self.shares.dominant(self.claimants[framework].role, framework)
