"""Who is on each node, as tags: what static ports and colocation rules are decided on.

A task puts tags on the node it holds room on: its job's name, the services it offers,
every port it holds, and, for each hard rule of its job that keeps a job or service away,
that rule's shunned tag (so the rule binds both ways: a newcomer it keeps away cannot come
either, as Kubernetes' anti-affinity holds for the pods already placed). `Tags` counts them
per row, sparsely, since most tags are on few nodes; the ledger keeps it in step with the
active tasks and their make-before-break copies, and a scheduling cycle adds what it places
and takes it back at the end, as it does with free room.

A job's `Presence` is its part in this: the tags its tasks add, the tags a node must not
have (its static ports, what its hard rules avoid, and its own name and services where
others shun them), the tags a node must have (hard rules towards a job or service) and its
soft weights. A job whose tasks add a tag it avoids takes at most one node each
(`one_per_node`: a static port, or a hard rule against its own name, as Nomad's
`distinct_hosts`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

Tag = tuple[str, str | int]  # (kind, name): ("job", "web"), ("service", "dns"), ("port", 53)
JOB, SERVICE, PORT = "job", "service", "port"
_SHUN = "!"  # before a kind: the tag a hard rule against that kind and name puts on its node


def shunned(tag: Tag) -> Tag:
    """The tag a task whose job keeps `tag` away puts on its node."""
    return (_SHUN + tag[0], tag[1])


@dataclass(frozen=True, slots=True)
class Colocate:
    """Nodes with `tag` (a job's name or a service's) gain `weight` (-100..100) in the score;
    `hard`: a rule instead (negative: never there; positive: only there)."""

    tag: Tag
    weight: float
    hard: bool = False


@dataclass(frozen=True, slots=True)
class Presence:
    """A job's part in who is where (made by `presence`)."""

    provides: tuple[Tag, ...]  # what each of its tasks adds to its node
    static: tuple[int, ...]  # its static port numbers (their tags are in `provides`)
    avoid: tuple[Tag, ...]  # a node with any of these may not take its tasks
    need: tuple[Tag, ...]  # a node without all of these may not take its tasks
    prefer: tuple[tuple[Tag, float], ...]  # soft weights, -100..100
    one_per_node: bool  # its tasks add a tag it avoids
    reflexive: bool  # its tasks add a tag it reads: placing one changes its node for the next


def presence(
    name: str, services: Iterable[str], static: Iterable[int], rules: Iterable[Colocate]
) -> Presence | None:
    """The presence of a job named `name` (may be "") offering `services`, holding the
    `static` ports, under colocation `rules`; None when it has no part at all."""
    identity = ([(JOB, name)] if name else []) + [(SERVICE, s) for s in services]
    ports = tuple(static)
    rules = tuple(rules)
    if not identity and not ports and not rules:
        return None
    provides = (*identity, *((PORT, p) for p in ports), *(shunned(r.tag) for r in rules if _keeps_away(r)))
    avoid = (
        *((PORT, p) for p in ports),
        *(r.tag for r in rules if _keeps_away(r)),
        *(shunned(t) for t in identity),
    )
    need = tuple(r.tag for r in rules if r.hard and r.weight > 0)
    prefer = tuple((r.tag, r.weight) for r in rules if not r.hard)
    read = {*avoid, *need, *(t for t, _ in prefer)}
    return Presence(
        provides=provides,
        static=ports,
        avoid=avoid,
        need=need,
        prefer=prefer,
        one_per_node=bool(set(avoid) & set(provides)),
        reflexive=bool(read & set(provides)),
    )


def _keeps_away(rule: Colocate) -> bool:
    return rule.hard and rule.weight < 0


class Tags:
    """How many tasks put each tag on each row (a row absent: none)."""

    def __init__(self) -> None:
        self._rows: dict[Tag, dict[int, int]] = {}

    def add(self, row: int, tags: Iterable[Tag], n: int = 1) -> None:
        """`n` more tasks (fewer, if negative) put `tags` on `row`."""
        for tag in tags:
            rows = self._rows.setdefault(tag, {})
            count = rows.get(row, 0) + n
            if count > 0:
                rows[row] = count
            else:
                rows.pop(row, None)
                if not rows:
                    del self._rows[tag]

    def has(self, tag: Tag) -> bool:
        """Whether some row has `tag`."""
        return tag in self._rows

    def on(self, tag: Tag, row: int) -> bool:
        rows = self._rows.get(tag)
        return rows is not None and row in rows

    def anywhere(self, tags: Iterable[Tag]) -> bool:
        return any(t in self._rows for t in tags)

    def rows(self, tag: Tag) -> dict[int, int]:
        """Row -> how many tasks put `tag` there (a copy)."""
        return dict(self._rows.get(tag, {}))

    def mask(self, tag: Tag, size: int) -> np.ndarray:
        """Per row of a table of `size` rows: whether `tag` is on it."""
        mask = np.zeros(size, dtype=bool)
        if rows := self._rows.get(tag):
            mask[np.fromiter(rows, np.int64, len(rows))] = True
        return mask

    def counts(self) -> dict[Tag, dict[int, int]]:
        """Every tag's rows and counts (a copy): for checks against the records."""
        return {tag: dict(rows) for tag, rows in self._rows.items()}


def allowed(tags: Tags, size: int, p: Presence) -> np.ndarray | None:
    """Rows that may take a task of `p` by its static ports and hard rules, as the nodes are
    now (None: every row)."""
    ok: np.ndarray | None = None
    for tag in p.avoid:
        if tags.has(tag):
            ok = ~tags.mask(tag, size) if ok is None else ok & ~tags.mask(tag, size)
    for tag in p.need:
        ok = tags.mask(tag, size) if ok is None else ok & tags.mask(tag, size)
    return ok


def binding(tags: Tags, p: Presence | None) -> bool:
    """Whether `p` may keep a task off some row now, or once its own first tasks are placed
    (else only room decides where its tasks fit)."""
    return p is not None and (bool(p.need) or p.one_per_node or tags.anywhere(p.avoid))


def score(tags: Tags, size: int, p: Presence, rows: slice | np.ndarray) -> np.ndarray | float:
    """The soft weights' part of the score of `rows` (weight / 100 where the tag is)."""
    total: np.ndarray | float = 0.0
    for tag, weight in p.prefer:
        if tags.has(tag):
            total = total + (weight / 100.0) * tags.mask(tag, size)[rows]
    return total


def refusal(tags: Tags, row: int, p: Presence) -> str | None:
    """Why `row` may not take a task of `p` now (None: it may)."""
    for tag in p.avoid:
        if tags.on(tag, row):
            return _have(tag)[0]
    for tag in p.need:
        if not tags.on(tag, row):
            return _lack(tag)[0]
    return None


def reasons(tags: Tags, size: int, p: Presence) -> Iterator[tuple[np.ndarray, str, str]]:
    """Each rule's failing rows with what it says of one node and of many (for `explain`)."""
    for tag in p.avoid:
        if tags.has(tag):
            yield (tags.mask(tag, size), *_have(tag))
    for tag in p.need:
        yield (~tags.mask(tag, size), *_lack(tag))


def _have(tag: Tag) -> tuple[str, str]:
    kind, name = tag
    if kind == PORT:
        return f"holds port {name}", f"hold port {name}"
    if kind.startswith(_SHUN):
        what = f"keeps {kind[len(_SHUN) :]} {name} away"
        return f"runs a job that {what}", f"run jobs that {what.replace('keeps', 'keep')}"
    return f"runs {kind} {name}", f"run {kind} {name}"


def _lack(tag: Tag) -> tuple[str, str]:
    kind, name = tag
    return f"runs no {kind} {name}", f"run no {kind} {name}"
