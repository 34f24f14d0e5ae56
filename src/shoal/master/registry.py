"""The service registry: where every service answers and whether it serves (pure, no I/O).

Endpoints come from four places:
- tasks of jobs with `services`: a running task is an endpoint of each of its job's
  services, at its node's address and its named port, with what the service's check last
  said (no check: passing while it runs; a check not yet run: critical);
- registrations from outside (`Registration`), kept while their TTL is refreshed;
- the agents (`shoal-agent`, one endpoint per node: passing while it is up and connected,
  warning while drained) and the masters (`shoal-master`).

Rules
- A task leaves its services the moment it is asked to stop (a kill, a move, a
  preemption): before its agent sends SIGTERM, which waits out the job's shutdown delay. A
  make-before-break move switches the endpoint when the new copy passes, as the task then
  lives there. A lost node's tasks are LOST, so their endpoints go with them.
- Every change of a service's endpoints raises the registry's index and gives it to the
  service, so a blocking query on one service is woken by that service's changes only
  (`take_changed`). A service left without endpoints is forgotten (what grows is bounded by
  what is registered now); its index, and any unknown service's, is then the index of the
  last such removal, so a client holding an older one is answered at once.
- Indexes start from the master's start time in microseconds: above what the master before
  it gave, unless that one changed a million times a second. A client holding an index above
  the current one is answered at once all the same, as Consul clients expect.
- The registry is rebuilt from the ledger on a restart: tasks keep their checks' results
  and registrations are stored, each given a full TTL again.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from shoal.checks import CheckStatus
from shoal.errors import NotFound, SpecError
from shoal.master.ledger import Ledger
from shoal.model import JobRecord, NodeRecord, NodeStatus, TaskRecord, TaskState
from shoal.services import (
    AGENT_SERVICE,
    MASTER_SERVICE,
    Endpoint,
    Registration,
    RegistrationRecord,
    ServiceSpec,
    ServiceSummary,
)


@dataclass(frozen=True, slots=True)
class RegistryPolicy:
    shutdown_delay: float = 3.0  # seconds a stopped task with services waits before SIGTERM
    load_aware: bool = True  # answers list endpoints on the least loaded nodes first
    load_band: float = 10.0  # loads (percent) within the same band of this width are ties
    max_registrations: int = 10_000  # registrations from outside, in all
    registrations_per_owner: int = 1_000


class Registry:
    def __init__(
        self,
        ledger: Ledger,
        policy: RegistryPolicy,
        registrations: Iterable[RegistrationRecord] = (),
        masters: Iterable[Endpoint] = (),
        now: float = 0.0,
    ) -> None:
        self.ledger = ledger
        self.policy = policy
        self.masters = tuple(masters)
        self.index = max(1, int(now * 1_000_000))  # grows with every change of any service
        self._endpoints: dict[str, dict[str, Endpoint]] = {}  # service -> id -> endpoint
        self._indexes: dict[str, int] = {}  # service -> the index of its last change
        self._removed = self.index  # the index of the last removal of a whole service
        self._of_task: dict[str, set[tuple[str, str]]] = {}  # task id -> (service, endpoint id)
        self._changed: set[str] = set()
        self.registrations: dict[str, RegistrationRecord] = {}
        self._lapses: dict[str, float] = {}  # registration id -> when its TTL runs out
        self._node_names: dict[str, str] = {}  # lowercase -> as the node spells it
        for master in self.masters:
            self._put(master)
        for record in registrations:
            self._registered(record, now)
        for node in ledger.nodes.values():
            self._node_changed(node)
        for task_id in ledger.active:
            self._task_changed(ledger.tasks[task_id])
        self._changed.clear()

    # --- following the ledger ---------------------------------------------------------------

    def follow(self, tasks: Iterable[TaskRecord], nodes: Iterable[NodeRecord]) -> None:
        """Bring the endpoints of changed tasks and nodes up to date."""
        for node in nodes:
            self._node_changed(node)
        for task in tasks:
            self._task_changed(task)

    def _task_changed(self, task: TaskRecord) -> None:
        job = self.ledger.jobs.get(task.job_id)
        if job is None or not job.spec.services:
            return
        now = {(e.service, e.id): e for e in self._task_endpoints(job, task)}
        before = self._of_task.pop(task.id, set())
        for service, endpoint_id in before - now.keys():
            self._drop(service, endpoint_id)
        for endpoint in now.values():
            self._put(endpoint)
        if now:
            self._of_task[task.id] = set(now)

    def _task_endpoints(self, job: JobRecord, task: TaskRecord) -> list[Endpoint]:
        stopping = task.kill_requested or task.migrating is not None or task.evicted_by is not None
        node = self.ledger.nodes.get(task.node or "")
        if task.state is not TaskState.RUNNING or stopping or node is None:
            return []
        return [self._task_endpoint(job, task, node, s) for s in job.spec.services]

    @staticmethod
    def _task_endpoint(job: JobRecord, task: TaskRecord, node: NodeRecord, service: ServiceSpec) -> Endpoint:
        if service.check is None:
            status, output, since = CheckStatus.PASSING, "no check: passing while it runs", task.started_at
        elif (result := task.checks.get(service.name)) is None:
            status, output, since = CheckStatus.CRITICAL, "not checked yet", task.started_at
        else:
            status, output, since = result.status, result.output, result.since
        return Endpoint(
            id=f"{task.id}/{service.name}",
            service=service.name,
            kind="task",
            address=node.info.address,
            port=task.ports[service.port],
            node=node.name,
            tags=tuple(service.tags),
            meta=service.meta,
            status=status,
            output=output,
            since=since or 0.0,
            task_id=task.id,
        )

    def _node_changed(self, node: NodeRecord) -> None:
        self._node_names[node.name.lower()] = node.name
        known = self._endpoints.get(AGENT_SERVICE, {}).get(node.name)
        if known is not None and known.address != node.info.address:
            for task_id in self.ledger.active:  # its tasks' endpoints are at its new address
                if (task := self.ledger.tasks[task_id]).node == node.name:
                    self._task_changed(task)
        if node.status is not NodeStatus.UP or not node.connected:
            status, output = (
                CheckStatus.CRITICAL,
                "down" if node.status is NodeStatus.DOWN else "disconnected",
            )
        elif node.drained:
            status, output = CheckStatus.WARNING, "drained: takes no new work"
        else:
            status, output = CheckStatus.PASSING, "up"
        self._put(
            Endpoint(
                id=node.name,
                service=AGENT_SERVICE,
                kind="agent",
                address=node.info.address,
                port=0,
                node=node.name,
                status=status,
                output=output,
            )
        )

    # --- registrations from outside -----------------------------------------------------------

    def register(self, owner: str, spec: Registration, now: float) -> None:
        """Add a registration, or replace the one with its id. It starts passing, as a service
        registering itself is up; it lapses unless passed again within its TTL."""
        if (old := self.registrations.get(spec.id)) is None:
            self._may_add(owner)
        elif old.spec.name != spec.name:
            self._drop(old.spec.name, spec.id)
        self._save(RegistrationRecord(owner=owner, spec=spec, since=now), now)

    def _may_add(self, owner: str) -> None:
        policy = self.policy
        if len(self.registrations) >= policy.max_registrations:
            raise SpecError(
                "id", f"the registry holds {policy.max_registrations} registrations, its most", 429
            )
        held = sum(r.owner == owner for r in self.registrations.values())
        if held >= policy.registrations_per_owner:
            raise SpecError(
                "id", f"{owner} holds {held} registrations, the most one may: deregister some first", 429
            )

    def refresh(self, registration: str, status: CheckStatus, output: str, now: float) -> None:
        """A registration's TTL check was passed (or warned, or failed): it has `ttl` again."""
        record = self._registration(registration)
        if record.status is not status or record.output != output:
            self._save(record.model_copy(update={"status": status, "output": output, "since": now}), now)
        else:
            self._lapses[registration] = now + record.spec.ttl

    def _save(self, record: RegistrationRecord, now: float) -> None:
        self.ledger.save_registration(record)
        self._registered(record, now)

    def _registered(self, record: RegistrationRecord, now: float) -> None:
        spec = record.spec
        self.registrations[spec.id] = record
        self._lapses[spec.id] = now + spec.ttl
        self._put(
            Endpoint(
                id=spec.id,
                service=spec.name,
                kind="external",
                address=spec.address,
                port=spec.port,
                tags=tuple(spec.tags),
                meta=spec.meta,
                status=record.status,
                output=record.output,
                since=record.since,
            )
        )

    def deregister(self, registration: str) -> None:
        record = self._registration(registration)
        del self.registrations[registration], self._lapses[registration]
        self.ledger.forget_registration(registration)
        self._drop(record.spec.name, registration)

    def owner(self, registration: str) -> str:
        return self._registration(registration).owner

    def _registration(self, registration: str) -> RegistrationRecord:
        if (record := self.registrations.get(registration)) is None:
            raise NotFound(f"no registration {registration!r}; `shoal services` lists what is registered")
        return record

    def tick(self, now: float) -> None:
        for registration, lapses in list(self._lapses.items()):
            if now >= lapses:
                self.deregister(registration)

    def next_due(self) -> float:
        """When the next TTL lapses (math.inf: none)."""
        return min(self._lapses.values(), default=math.inf)

    # --- reading --------------------------------------------------------------------------

    def take_changed(self) -> set[str]:
        """The services changed since the last call."""
        changed, self._changed = self._changed, set()
        return changed

    def index_of(self, service: str) -> int:
        """The index of the service's last change (a service without endpoints: of the last
        removal of one)."""
        return self._indexes.get(service, self._removed)

    def summaries(self) -> list[ServiceSummary]:
        out = []
        for name, endpoints in sorted(self._endpoints.items()):
            counts = {s: 0 for s in CheckStatus}
            tags: set[str] = set()
            for endpoint in endpoints.values():
                counts[endpoint.status] += 1
                tags.update(endpoint.tags)
            out.append(
                ServiceSummary(name=name, tags=sorted(tags), **{s.value: n for s, n in counts.items()})
            )
        return out

    def endpoints(self, service: str, *, passing: bool = True, tag: str | None = None) -> list[Endpoint]:
        """The service's endpoints (only those passing, unless `passing` is False), by id."""
        found = self._endpoints.get(service, {})
        return [
            e
            for _, e in sorted(found.items())
            if (not passing or e.status is CheckStatus.PASSING) and (tag is None or tag in e.tags)
        ]

    def ordered(self, endpoints: list[Endpoint], shuffle: Callable[[list[Endpoint]], None]) -> list[Endpoint]:
        """`endpoints` as answers give them: on the least loaded nodes first (loads in the same
        band are ties, put in the order `shuffle` leaves them), or all shuffled when answers are
        not load-aware. Endpoints without a node (registrations, masters) count as unloaded."""
        shuffled = list(endpoints)
        shuffle(shuffled)
        if not self.policy.load_aware:
            return shuffled
        nodes, band = self.ledger.nodes, self.policy.load_band
        return sorted(shuffled, key=lambda e: nodes[e.node].load // band if e.node in nodes else 0.0)

    def node_address(self, name: str) -> str | None:
        """The address of the node `name` (any case, as DNS names go), None for no such node."""
        node = self.ledger.nodes.get(self._node_names.get(name.lower(), name))
        return node.info.address if node is not None else None

    # --- the one writer of endpoints --------------------------------------------------------------

    def list_masters(self, masters: Iterable[Endpoint]) -> None:
        """The masters alive now (several on etcd): those gone leave `shoal-master`."""
        masters = tuple(masters)
        for gone in {m.id for m in self.masters} - {m.id for m in masters}:
            self._drop(MASTER_SERVICE, gone)
        for master in masters:
            self._put(master)
        self.masters = masters

    def _put(self, endpoint: Endpoint) -> None:
        known = self._endpoints.setdefault(endpoint.service, {})
        if known.get(endpoint.id) != endpoint:
            known[endpoint.id] = endpoint
            self._bump(endpoint.service)

    def _drop(self, service: str, endpoint_id: str) -> None:
        known = self._endpoints.get(service, {})
        if known.pop(endpoint_id, None) is None:
            return
        self._bump(service)
        if not known:
            del self._endpoints[service], self._indexes[service]
            self._removed = self.index

    def _bump(self, service: str) -> None:
        self.index += 1
        self._indexes[service] = self.index
        self._changed.add(service)
