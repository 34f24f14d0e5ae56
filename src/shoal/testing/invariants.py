"""The master's invariants, checked against its state as it is: what every test of the
ledger asserts after every step (SimCluster after each delivery, the state-machine property
test after each event).

- The node table's allocation of each node is exactly what its active tasks, their
  make-before-break copies and the offers on it hold, and never more than the node has.
- A node that is down holds nothing.
- The usage book is the sum of the active tasks, per queue and consumer.
- Every active task and copy stands on a node its job may use (node set, constraints),
  within the job's `max_per_node` and `max_per`, with its own GPU devices and ports, each
  in use by one copy only: no node holds a port twice, a static one included; a static
  port is its number, a dynamic one is of its node's range.
- No active task or copy shares its node with a task of a job or service its job's hard
  colocation rules keep away (its own job's other tasks count). Rules that need a job or
  service nearby are checked when a task is placed, not after: what it went to may end.
- The tags of each node in the table are those its active tasks and copies put there.
"""

from __future__ import annotations

from collections import Counter, defaultdict

import numpy as np

from shoal.core.fairness import UsageBook
from shoal.core.tags import PORT, Tag
from shoal.master.registry import Registry
from shoal.master.shapes import presence, running
from shoal.master.state import MasterState
from shoal.master.views import COPY
from shoal.model import JobRecord, JobSpec, NodeStatus, TaskRecord
from shoal.placing import Colocation


def check(state: MasterState) -> None:
    _allocations(state)
    _usage(state)
    _releases(state)
    _placements(state)
    _colocation(state)
    _tags(state)
    _registry(state)


def _registry(state: MasterState) -> None:
    """The registry, kept up to date change by change, holds what one built afresh from the
    ledger would: no endpoint missed, none left behind."""
    registry = state.registry
    fresh = Registry(state.ledger, registry.policy, registry.registrations.values(), registry.masters)
    assert fresh.summaries() == registry.summaries(), f"{registry.summaries()} != {fresh.summaries()}"
    for summary in registry.summaries():
        name = summary.name
        assert fresh.endpoints(name, passing=False) == registry.endpoints(name, passing=False), name


def _allocations(state: MasterState) -> None:
    ledger = state.ledger
    table = ledger.table
    held = np.zeros((len(table), len(table.dims)))
    for task in ledger.active_tasks():
        assert task.node in table.index, f"task {task.id} is on unknown node {task.node}"
        vec = ledger.vector(task)
        held[table.index[task.node], : len(vec)] += vec
        if task.successor is not None:
            held[table.index[task.successor.node], : len(vec)] += vec
    for offer in state.frameworks.offers.values():
        held[offer.row, : len(offer.amount)] += offer.amount
    # Whole matrices at once (np.allclose row by row, in the same order, costs far more).
    allocated, capacity = table.allocated, table.capacity
    agrees = _close(allocated, held, atol=1e-6)
    fits = (allocated <= capacity + 1e-6).all(axis=1)
    kept = _close(table.free, capacity - allocated)
    holds = held.any(axis=1)
    for name, row in table.index.items():
        got = allocated[row]
        assert agrees[row], f"{name}: allocated {got} but holders hold {held[row]}"
        assert fits[row], f"{name} is over-committed: {got}"
        assert kept[row], f"{name}: free room drifted"
        if ledger.nodes[name].status is NodeStatus.DOWN:
            assert not holds[row], f"{name} is down but still holds {held[row]}"


def _close(a: np.ndarray, b: np.ndarray, atol: float = 1e-8) -> np.ndarray:
    """Whether each row of `a` is close to the same row of `b`: np.isclose's rule (rtol 1e-5;
    infinities close only to themselves, NaN to nothing) without its overhead, which costs
    more than the comparison on a few rows checked after every event."""
    with np.errstate(invalid="ignore"):
        near = (np.abs(a - b) <= atol + 1e-5 * np.abs(b)) & np.isfinite(b)
    return (near | (a == b)).all(axis=1)


def _usage(state: MasterState) -> None:
    ledger = state.ledger
    expected = UsageBook.of(ledger.table, (running(ledger.jobs[t.job_id], t) for t in ledger.active_tasks()))
    for books in ("by_user", "by_queue"):
        have, truth = getattr(ledger.usage, books), getattr(expected, books)
        keys = list(have.keys() | truth.keys())
        # One row per key, both books zero-padded to one width, compared at once.
        width = max([len(ledger.table.dims), *map(len, have.values()), *map(len, truth.values())])
        got, want = np.zeros((len(keys), width)), np.zeros((len(keys), width))
        for i, key in enumerate(keys):
            for book, rows in ((have, got), (truth, want)):
                if key in book:
                    rows[i, : len(book[key])] = book[key]
        close = _close(got, want)
        for i, key in enumerate(keys):
            assert close[i], f"usage book of {key} drifted: {got[i]} against {want[i]}"


def _releases(state: MasterState) -> None:
    """The book of expected releases holds every active task and every copy a move is
    starting, where they are, from when they started; and nothing else."""
    ledger = state.ledger
    index = ledger.table.index
    holders = 0
    for task in ledger.active_tasks():
        for key, node, since in (
            (task.id, task.node, task.started_at),
            (
                task.id + COPY,
                *((task.successor.node, task.successor.since) if task.successor else (None, None)),
            ),
        ):
            if node is not None and node in index:
                holders += 1
                got = ledger.views.releases.get(key)
                assert got == (index[node], since), (
                    f"release book has {got} for {key}, not {(index[node], since)}"
                )
    assert len(ledger.views.releases) == holders, (
        f"release book holds {len(ledger.views.releases)}, not {holders}"
    )


def _placements(state: MasterState) -> None:
    ledger = state.ledger
    per_node: dict[int, Counter[str]] = defaultdict(Counter)
    devices: Counter[tuple[str, int]] = Counter()
    ports: Counter[tuple[str, int]] = Counter()
    for task in ledger.active_tasks():
        job = ledger.jobs[task.job_id]
        copies = [(task.node or "", task.gpus, task.ports)]
        if task.successor is not None:
            copies.append((task.successor.node, task.successor.gpus, task.successor.ports))
        for node, gpus, named in copies:
            _may_run(state, job, task, node)
            per_node[job.id][node] += 1
            devices.update((node, g) for g in gpus)
            ports.update((node, p) for p in named.values())
            assert len(gpus) == job.spec.resources.gpus, f"{task.id} has devices {gpus}"
            assert sorted(named) == sorted(job.spec.port_names), f"{task.id} has ports {named}"
            low, high = ledger.nodes[node].info.port_range
            for port in job.spec.ports:
                given = named[port.name]
                if port.static is not None:
                    assert given == port.static, f"{task.id}: static port {port.name} is {given}"
                else:
                    assert low <= given <= high, f"{task.id}: port {port.name} {given} out of range"
    assert all(n == 1 for n in devices.values()), f"a GPU is given twice: {devices.most_common(1)}"
    assert all(n == 1 for n in ports.values()), f"a port is given twice: {ports.most_common(1)}"
    for job_id, counts in per_node.items():
        _limits(state, ledger.jobs[job_id], counts)


def _may_run(state: MasterState, job: JobRecord, task: TaskRecord, node: str) -> None:
    ledger = state.ledger
    attributes = ledger.table.attributes[ledger.table.index[node]]
    if job.node_names is not None:
        assert node in job.node_names, f"task {task.id} runs on {node}, outside its node set"
    for constraint in ledger.group(job.id, ()).constraints:
        assert constraint.matches(attributes), f"task {task.id} runs on {node}, which fails {constraint}"


def _limits(state: MasterState, job: JobRecord, counts: Counter[str]) -> None:
    spec = job.spec
    if spec.max_per_node is not None:
        assert max(counts.values()) <= spec.max_per_node, f"job {job.id} has {counts} over max_per_node"
    table = state.ledger.table
    for attribute, limit in spec.max_per.items():
        by_value: Counter[str | None] = Counter()
        for node, n in counts.items():
            by_value[table.attributes[table.index[node]].get(attribute)] += n
        assert max(by_value.values()) <= limit, f"job {job.id} has {by_value} per {attribute}, limit {limit}"


def _copies(task: TaskRecord) -> list[tuple[str, dict[str, int]]]:
    """Where a task and its make-before-break copy stand, with the ports each holds."""
    copies = [(task.node or "", task.ports)]
    if task.successor is not None:
        copies.append((task.successor.node, task.successor.ports))
    return copies


def _colocation(state: MasterState) -> None:
    """Read from the job specs alone (not from the tags the scheduler decided on)."""
    ledger = state.ledger
    on_node: dict[str, list[tuple[str, JobSpec]]] = defaultdict(list)  # node -> (task, its job)
    for task in ledger.active_tasks():
        for node, _ in _copies(task):
            on_node[node].append((task.id, ledger.jobs[task.job_id].spec))
    for node, copies in on_node.items():
        for task_id, spec in copies:
            for rule in spec.colocation:
                if rule.hard and rule.weight < 0:
                    near = [other for other, s in copies if other != task_id and _is(s, rule)]
                    assert not near, (
                        f"{task_id} keeps {rule.job or rule.service} away, yet {near} run on {node}"
                    )


def _is(spec: JobSpec, rule: Colocation) -> bool:
    """Whether a task of `spec` is what `rule` names: its job, or a service it offers."""
    if rule.job is not None:
        return spec.name == rule.job
    return any(s.name == rule.service for s in spec.services)


def _tags(state: MasterState) -> None:
    ledger = state.ledger
    index = ledger.table.index
    want: dict[Tag, Counter[int]] = defaultdict(Counter)
    for task in ledger.active_tasks():
        job_presence = presence(ledger.jobs[task.job_id].spec)
        static = job_presence.static if job_presence is not None else ()
        for node, ports in _copies(task):
            if node not in index:
                continue
            provided = job_presence.provides if job_presence is not None else ()
            for tag in [*provided, *((PORT, p) for p in ports.values() if p not in static)]:
                want[tag][index[node]] += 1
    have = ledger.table.tags.counts()
    assert have == {tag: dict(rows) for tag, rows in want.items()}, f"node tags {have} against {dict(want)}"
