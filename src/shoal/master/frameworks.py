"""The frameworks' desk: subscriptions, offers, filters and status updates (pure, no I/O).

Frameworks draw from the same ledger as native jobs: a task a framework launches is a
one-task job of the framework's role (its queue), placed by a plan the ledger checks, so it
holds resources, runs on an agent, is reconciled, lost and killed exactly as a native task
is; only the choice of its node came from the framework. `MasterState` hands the desk the
framework events; the desk keeps the records below and speaks through the ledger's API
(which records what it changes for the store, and carries its commands out).

Theory of operation
- Offers are held in the node table as allocated, so neither the native scheduler nor the
  next offer cycle can hand the same resources out twice. An offer ends by ACCEPT, DECLINE,
  rescission (expiry, SUPPRESS, a lost connection or node, or a starved framework's claim),
  and its resources go back to the pool at once.
- Status updates of a framework's tasks are persisted with the task change that caused
  them and delivered, in order, on every (re)subscription and every `retry` seconds until
  acknowledged: at least once, in order per task, across master restarts.
- A framework whose stream closes keeps its tasks for its failover timeout, counted from
  the disconnection (or from a master restart); after it, its tasks are killed.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import numpy as np

from shoal.core.fairness import Shares
from shoal.core.offers import Claimant, Outstanding, allocate, fair_shares, native_caps
from shoal.core.plan import Placement, Plan
from shoal.core.scheduler import Policy
from shoal.errors import Forbidden, NotFound, SpecError
from shoal.framework import protocol as p
from shoal.master.events import (
    CloseStream,
    FrameworkCall,
    Offer,
    OffersMade,
    Principal,
    StreamClosed,
    SubscribeFramework,
    ToFramework,
)
from shoal.master.ledger import Ledger
from shoal.master.offer_lines import OfferLines
from shoal.model import JobRecord, TaskRecord, TaskState
from shoal.views import FrameworkView


@dataclass(frozen=True, slots=True)
class FrameworkPolicy:
    offer_timeout: float = 30.0  # seconds an unanswered offer lives
    patience: float = 1.0  # seconds an offer is held before a starved framework may claim it
    retry: float = 10.0  # seconds between deliveries of an unacknowledged update
    heartbeat: float = 5.0  # seconds between heartbeats on an idle stream
    # Seconds at least between offer cycles: what frees up meanwhile goes out as one larger
    # offer per node, not a trickle of small ones each costing its framework a round trip.
    interval: float = 0.0


@dataclass(frozen=True, slots=True)
class _Filter:
    """Resources a framework refused on a node: not offered to it again until `until`, unless
    the node has more free than that by then (as Mesos's refusal filters)."""

    until: float
    amount: np.ndarray

    def holds(self, free: np.ndarray, now: float) -> bool:
        n = min(len(free), len(self.amount))
        return now < self.until and bool(np.all(free[:n] <= self.amount[:n] + 1e-9))


@dataclass
class _Framework:
    record: p.FrameworkRecord
    connection: int | None = None
    offers: dict[str, None] = field(default_factory=dict)
    filters: dict[int, _Filter] = field(default_factory=dict)  # by row
    updates: dict[str, p.TaskStatus] = field(default_factory=dict)  # uuid -> unacknowledged, in order
    sent_at: float = -math.inf  # when the unacknowledged updates were last delivered
    tasks: dict[str, int] = field(default_factory=dict)  # task name -> job id (the latest)


class FrameworkDesk:
    def __init__(
        self,
        ledger: Ledger,
        scheduling: Policy,
        policy: FrameworkPolicy,
        records: list[p.FrameworkRecord],
        updates: list[tuple[str, p.TaskStatus]],
        now: float,
    ) -> None:
        self.ledger = ledger
        self.scheduling = scheduling  # the queues (roles), their weights and limits
        self.policy = policy
        self.frameworks: dict[str, _Framework] = {}
        for record in records:
            if not record.removed:
                # A restarted master gives every framework its whole failover timeout.
                record = record.model_copy(update={"connected": False, "disconnected_at": now})
            self.frameworks[record.id] = _Framework(record)
        for framework_id, status in updates:
            if (fw := self.frameworks.get(framework_id)) is not None:
                fw.updates[status.uuid or ""] = status
        for job in sorted(ledger.jobs.values(), key=lambda j: j.id):  # a name is its newest job's
            if job.framework is not None and job.framework in self.frameworks:
                self.frameworks[job.framework].tasks[job.spec.name] = job.id
        self.offers: dict[str, Offer] = {}
        self.by_connection: dict[int, str] = {}
        self._epoch = f"{int(now * 1000):x}"  # ids made by this ledger never repeat a former one's
        self._serial = 0
        self.needs_cycle = True
        self._wakeup = math.inf  # the earliest filter expiry
        self.cycles = 0
        self.last_cycle = -math.inf
        self._lines = OfferLines(ledger)

    # --- subscription -------------------------------------------------------------------

    def subscribe(self, e: SubscribeFramework) -> None:
        body = e.body
        if not (e.principal.admin or body.role in e.principal.roles):
            self._deny(
                e.request, Forbidden(f"{e.principal.name} may not subscribe frameworks in role {body.role!r}")
            )
            return
        if body.role not in self.scheduling.queues:
            known = ", ".join(sorted(self.scheduling.queues))
            self._deny(
                e.request, SpecError("role", f"no role (queue) named {body.role!r}; there are: {known}")
            )
            return
        if body.framework_id is None:
            record = p.FrameworkRecord(
                id=self._new_id("fw"),
                name=body.name,
                principal=e.principal.name,
                role=body.role,
                failover_timeout=body.failover_timeout,
                registered_at=e.now,
            )
            fw = self.frameworks[record.id] = _Framework(record)
        else:
            fw = self.frameworks.get(body.framework_id)  # type: ignore[assignment]
            if fw is None or fw.record.removed or not self._may(e.principal, fw):
                self._deny(
                    e.request,
                    SpecError(
                        "framework_id",
                        f"no framework {body.framework_id} to take up (it ended, or its failover "
                        "timeout passed): subscribe without framework_id to start a new one",
                        status=404,
                    ),
                )
                return
            if fw.connection is not None:
                self._close(fw, "a newer subscription of this framework took over")
            fw.record.name = body.name
            fw.record.failover_timeout = body.failover_timeout
        fw.record.connected = True
        fw.record.disconnected_at = None
        fw.connection = e.connection
        self.by_connection[e.connection] = fw.record.id
        self._persist(fw)
        self._emit(fw, p.Subscribed(framework_id=fw.record.id, heartbeat_interval=self.policy.heartbeat))
        self._deliver_updates(fw, e.now)
        self.needs_cycle = True
        self.ledger.reply(e.request, fw.record.id)

    def stream_closed(self, e: StreamClosed) -> None:
        framework_id = self.by_connection.pop(e.connection, None)
        fw = self.frameworks.get(framework_id or "")
        if fw is None or fw.connection != e.connection:
            return
        fw.connection = None
        fw.record.connected = False
        fw.record.disconnected_at = e.now
        self._persist(fw)
        for offer_id in list(fw.offers):
            self._drop_offer(offer_id)  # nobody to answer them

    # --- calls --------------------------------------------------------------------------

    def call(self, e: FrameworkCall) -> None:
        fw = self.frameworks.get(e.framework_id)
        if fw is None or fw.record.removed or not self._may(e.principal, fw):
            self._deny(e.request, NotFound(f"no framework {e.framework_id} of yours"))
            return
        try:
            value = self._do(fw, e.call, e.now)
        except (SpecError, NotFound, Forbidden) as error:
            self._deny(e.request, error)
            return
        self.ledger.reply(e.request, value)

    def _do(self, fw: _Framework, call: p.Call, now: float) -> object:
        match call:
            case p.Accept():
                return self._accept(fw, call, now)
            case p.Decline():
                for offer_id in call.offer_ids:
                    offer = self.offers.get(offer_id)
                    if offer is not None and offer.framework == fw.record.id:
                        if call.refuse_seconds:
                            self._refuse(fw, offer.row, offer.amount, now + call.refuse_seconds)
                        self._drop_offer(offer_id)
            case p.Suppress():
                fw.record.suppressed = True
                self._persist(fw)
                for offer_id in list(fw.offers):
                    self._rescind(offer_id)
            case p.Revive():
                fw.record.suppressed = False
                fw.filters.clear()
                self._persist(fw)
                self.needs_cycle = True
            case p.Kill():
                self._kill(fw, call.task)
            case p.Acknowledge():
                for uuid in call.uuids:
                    if fw.updates.pop(uuid, None) is not None:
                        self.ledger.acknowledged(uuid)
            case p.Reconcile():
                self._reconcile(fw, call.tasks, now)
            case p.Teardown():
                self._teardown(fw, "torn down at its request", now)
        return {}

    def _accept(self, fw: _Framework, call: p.Accept, now: float) -> p.Accepted:
        offers = []
        for offer_id in call.offer_ids:
            offer = self.offers.get(offer_id)
            if offer is None or offer.framework != fw.record.id:
                raise SpecError(
                    "offer_ids",
                    f"offer {offer_id} is not outstanding for this framework (unknown, used, declined, "
                    "rescinded or expired); wait for the next offers",
                    status=409,
                )
            offers.append(offer)
        if len({o.node for o in offers}) > 1:
            raise SpecError("offer_ids", "the offers of one ACCEPT must all be of one node")
        if len(set(call.offer_ids)) != len(call.offer_ids):
            raise SpecError("offer_ids", "an offer is named twice")
        ledger = self.ledger
        node, row = offers[0].node, offers[0].row
        offered = sum((o.amount for o in offers), np.zeros(len(ledger.table.dims)))
        specs = [t.spec(fw.record.role) for t in call.tasks]
        for i, spec in enumerate(specs):
            if unknown := ledger.unknown_resources(spec.resources):
                raise SpecError(
                    f"tasks.{i}.resources.custom.{unknown[0]}", f"no node has a resource named {unknown[0]!r}"
                )
        asked = sum((ledger.table.vector(s.resources) for s in specs), np.zeros(len(ledger.table.dims)))
        offered = np.pad(offered, (0, len(asked) - len(offered)))
        for d, dim in enumerate(ledger.table.dims):
            if asked[d] > offered[d] + 1e-9:
                raise SpecError(
                    "tasks", f"the tasks ask for {asked[d]:g} {dim}; the offers hold {offered[d]:g}"
                )
        names = [launch.name for launch in call.tasks]
        if len(set(names)) != len(names):
            raise SpecError(
                "tasks", "a task name is given twice: names are the framework's ids for its tasks"
            )
        for i, launch in enumerate(call.tasks):
            job_id = fw.tasks.get(launch.name)
            if job_id is not None and not ledger.tasks_of(job_id)[0].state.terminal:
                raise SpecError(f"tasks.{i}.name", f"task {launch.name} of this framework is still live")
        ports = sum(len(s.ports) for s in specs)
        if ports > ledger.free_ports(node):
            raise SpecError("tasks", f"the tasks ask for {ports} ports; {node} has fewer free")
        for offer in offers:
            self._drop_offer(offer.id)
        if call.refuse_seconds:
            self._refuse(fw, row, offered - asked, now + call.refuse_seconds)
        jobs = {}
        placements = []
        for launch, spec in zip(call.tasks, specs, strict=True):
            job = ledger.add_job(fw.record.principal, spec, now, framework=fw.record.id)
            fw.tasks[launch.name] = jobs[launch.name] = job.id
            placements.append(Placement(f"{job.id}.0", node, spec.resources))
        # The offers held this room until a moment ago: the plan is checked all the same.
        verdict = ledger.place(Plan(tuple(placements)), now)
        for task_id, reason in verdict.rejected.items():
            ledger.transition(ledger.tasks[task_id], TaskState.KILLED, now, message=f"not placed: {reason}")
        return p.Accepted(jobs=jobs)

    def _kill(self, fw: _Framework, name: str) -> None:
        job_id = fw.tasks.get(name)
        if job_id is None:
            raise NotFound(f"no task {name} of this framework")
        self.ledger.request_kill(self.ledger.tasks_of(job_id)[0])

    def _reconcile(self, fw: _Framework, names: list[str], now: float) -> None:
        if not names:
            names = [n for n, j in fw.tasks.items() if not self.ledger.tasks_of(j)[0].state.terminal]
        for name in names:
            job_id = fw.tasks.get(name)
            if job_id is None:
                status = p.TaskStatus(
                    task=name, state=TaskState.LOST, job_id=0, message="unknown task", at=now
                )
            else:
                status = self._status(self.ledger.tasks_of(job_id)[0], name, now).model_copy(
                    update={"uuid": None}
                )
            self._emit(fw, p.Update(status=status))

    def _teardown(self, fw: _Framework, why: str, now: float) -> None:
        for job_id in fw.tasks.values():
            if not self.ledger.tasks_of(job_id)[0].state.terminal:
                self.ledger.kill_job(job_id, now)
        for offer_id in list(fw.offers):
            self._drop_offer(offer_id)
        self._close(fw, f"framework {fw.record.id} ended: {why}")
        fw.record.removed = True
        fw.record.connected = False
        for uuid in fw.updates:
            self.ledger.acknowledged(uuid)  # nobody is left to hear them
        fw.updates.clear()
        self._persist(fw)

    # --- what the rest of the ledger tells the desk ---------------------------------------

    def task_changed(self, job: JobRecord, task: TaskRecord, now: float) -> None:
        """A framework task moved: its framework hears of it (running and end states)."""
        fw = self.frameworks.get(job.framework or "")
        if fw is None or fw.record.removed or task.state not in _TOLD:
            return
        status = self._status(task, job.spec.name, now)
        fw.updates[status.uuid or ""] = status
        self.ledger.add_update(fw.record.id, status)
        self._emit(fw, p.Update(status=status))

    def forget(self, jobs: list[int]) -> None:
        """Finished jobs the ledger pruned: their tasks' names are free of them."""
        if not jobs:
            return
        gone = set(jobs)
        for fw in self.frameworks.values():
            for name in [n for n, job_id in fw.tasks.items() if job_id in gone]:
                del fw.tasks[name]

    def pinned(self) -> set[int]:
        """Jobs whose updates their frameworks have not acknowledged: kept past retention."""
        return {s.job_id for fw in self.frameworks.values() for s in fw.updates.values()}

    def rescind_node(self, node: str) -> None:
        """Take back the offers of `node` (lost, or taking no new work)."""
        for offer in [o for o in self.offers.values() if o.node == node]:
            self._rescind(offer.id)

    def node_lost(self, node: str) -> None:
        self.rescind_node(node)
        for fw in self.frameworks.values():
            if fw.connection is not None:
                self._emit(fw, p.Failure(node=node))

    def tick(self, now: float) -> None:
        for offer in list(self.offers.values()):
            if now >= self._expires(offer):
                self._rescind(offer.id)
        for fw in self.frameworks.values():
            record = fw.record
            if record.removed:
                continue
            if now > self._gone_after(fw):
                self._teardown(
                    fw, f"not back within its failover timeout ({record.failover_timeout:g}s)", now
                )
            elif now >= self._resend_at(fw):
                self._deliver_updates(fw, now)
        if now >= self._wakeup:
            self.needs_cycle = True

    def next_due(self) -> float:
        """The earliest time `tick`, or the offer cycle after it, has something to do: an
        offer expires, a framework's failover timeout passes, unacknowledged updates are
        due again, a refusal filter lapses, or the next offer cycle (math.inf: none)."""
        cycle = self.due()
        due = min(self._expires(o) for o in self.offers.values()) if self.offers else math.inf
        due = min(due, cycle if cycle is not None else self._wakeup)
        for fw in self.frameworks.values():
            if not fw.record.removed:
                due = min(due, math.nextafter(self._gone_after(fw), math.inf), self._resend_at(fw))
        return due

    def _expires(self, offer: Offer) -> float:
        return offer.made_at + self.policy.offer_timeout

    def _gone_after(self, fw: _Framework) -> float:
        """The end of a disconnected framework's failover timeout (math.inf: connected)."""
        record = fw.record
        if record.disconnected_at is None or fw.connection is not None:
            return math.inf
        return record.disconnected_at + record.failover_timeout

    def _resend_at(self, fw: _Framework) -> float:
        """When its unacknowledged updates are delivered again (math.inf: none, or no stream)."""
        if fw.connection is None or not fw.updates:
            return math.inf
        return fw.sent_at + self.policy.retry

    # --- the offer cycle ----------------------------------------------------------------

    def due(self) -> float | None:
        """When the next offer cycle should run (None: no cycle is needed)."""
        return self.last_cycle + self.policy.interval if self.needs_cycle else None

    def cycle(self, now: float) -> None:
        """Offer what is free to the frameworks that want it (the pure allocator decides)."""
        self.needs_cycle = False
        self.last_cycle = now
        ledger = self.ledger
        self._wakeup = math.inf
        free = ledger.table.free
        claimants = []
        for fw in self.frameworks.values():
            if fw.connection is None or fw.record.suppressed:
                continue
            for row, f in list(fw.filters.items()):
                if f.until <= now:
                    del fw.filters[row]
                else:
                    self._wakeup = min(self._wakeup, f.until)
            filtered = frozenset(row for row, f in fw.filters.items() if f.holds(free[row], now))
            claimants.append(Claimant(fw.record.id, fw.record.role, filtered, bool(fw.offers)))
        if not claimants:
            return
        self.cycles += 1
        outstanding = [
            Outstanding(
                o.id,
                o.framework,
                self.frameworks[o.framework].record.role,
                o.row,
                o.amount,
                now - o.made_at >= self.policy.patience,
            )
            for o in self.offers.values()
        ]
        got = allocate(ledger.table, self.shares(), claimants, outstanding, self.scheduling, self.cycles)
        for offer_id in got.rescinded:
            self._rescind(offer_id)
        names = ledger.table.names
        for offered in got.offers:
            fw = self.frameworks[offered.framework]
            ledger.hold_offers(offered.rows, offered.amounts)
            made = []
            first = self._serial + 1
            self._serial += len(offered.rows)
            for serial, row, amount in zip(
                range(first, self._serial + 1), offered.rows.tolist(), offered.amounts, strict=True
            ):
                offer = Offer(f"{self._epoch}-o{serial}", fw.record.id, names[row], row, amount, now)
                self.offers[offer.id] = offer
                made.append(offer)
            fw.offers.update(dict.fromkeys(o.id for o in made))
            self._emit(fw, OffersMade(tuple(made)))

    def capped(self, policy: Policy, backlogged: set[str]) -> Policy:
        """`policy` with native queues held at their fair share while frameworks that ask
        for offers are below theirs (a framework with nothing to run should SUPPRESS)."""
        asking = [
            Claimant(fw.record.id, fw.record.role)
            for fw in self.frameworks.values()
            if fw.connection is not None and not fw.record.suppressed
        ]
        if not asking:
            return policy
        caps = native_caps(self.shares(), asking, backlogged, policy)
        if not caps:
            return policy
        queues = {
            name: dataclasses.replace(q, limit=min(q.limit, caps[name])) if name in caps else q
            for name, q in policy.queues.items()
        }
        return dataclasses.replace(policy, queues=queues)

    def shares(self) -> Shares:
        policy = self.scheduling
        return Shares(
            self.ledger.table,
            self.ledger.usage,
            {name: q.weight for name, q in policy.queues.items()},
            policy.user_weights,
        )

    def views(self) -> list[FrameworkView]:
        ledger = self.ledger
        live = [fw for fw in self.frameworks.values() if not fw.record.removed]
        shares = self.shares()
        for o in self.offers.values():
            shares.add(self.frameworks[o.framework].record.role, o.framework, o.amount)
        wanting = [
            Claimant(fw.record.id, fw.record.role)
            for fw in live
            if fw.connection is not None and not fw.record.suppressed
        ]
        fair = fair_shares(wanting, self.scheduling)
        return [
            FrameworkView(
                id=fw.record.id,
                name=fw.record.name,
                principal=fw.record.principal,
                role=fw.record.role,
                connected=fw.connection is not None,
                suppressed=fw.record.suppressed,
                share=shares.dominant(fw.record.role, fw.record.id),
                fair_share=fair.get(fw.record.id, 0.0),
                offers=len(fw.offers),
                tasks=sum(1 for j in fw.tasks.values() if ledger.tasks_of(j)[0].state.active),
                unacknowledged=len(fw.updates),
            )
            for fw in live
        ]

    # --- helpers ------------------------------------------------------------------------

    def encode(self, event: p.Told | OffersMade) -> bytes:
        """An event as the JSON line its framework reads."""
        return self._lines.encode(event)

    def _status(self, task: TaskRecord, name: str, now: float) -> p.TaskStatus:
        return p.TaskStatus(
            task=name,
            state=task.state,
            job_id=task.job_id,
            node=task.node,
            exit_code=task.exit_code,
            message=task.message,
            uuid=f"{task.run_id}.{task.state.value}",
            at=now,
        )

    def _deliver_updates(self, fw: _Framework, now: float) -> None:
        fw.sent_at = now
        for status in fw.updates.values():
            self._emit(fw, p.Update(status=status))

    def _drop_offer(self, offer_id: str) -> Offer:
        """End an offer and give its resources back (no event: its holder ended it, or is gone)."""
        offer = self.offers.pop(offer_id)
        self.frameworks[offer.framework].offers.pop(offer_id, None)
        self.ledger.release_offer(offer.row, offer.amount)
        return offer

    def _rescind(self, offer_id: str) -> None:
        offer = self._drop_offer(offer_id)
        self._emit(self.frameworks[offer.framework], p.Rescind(offer_id=offer_id))

    def _refuse(self, fw: _Framework, row: int, amount: np.ndarray, until: float) -> None:
        fw.filters[row] = _Filter(until, amount)

    def _close(self, fw: _Framework, why: str) -> None:
        if fw.connection is None:
            return
        self._emit(fw, p.Error(message=why))
        self.ledger.emit(CloseStream(fw.connection))
        self.by_connection.pop(fw.connection, None)
        fw.connection = None

    def _emit(self, fw: _Framework, event: p.Told | OffersMade) -> None:
        if fw.connection is not None:
            self.ledger.emit(ToFramework(fw.connection, event))

    def _persist(self, fw: _Framework) -> None:
        self.ledger.save_framework(fw.record)

    def _deny(self, request: int, error: Exception) -> None:
        self.ledger.reply(request, error=error)

    def _may(self, principal: Principal, fw: _Framework) -> bool:
        return principal.admin or principal.name == fw.record.principal

    def _new_id(self, kind: str) -> str:
        self._serial += 1
        return f"{self._epoch}-{kind}{self._serial}"


_TOLD = frozenset({TaskState.RUNNING}) | {s for s in TaskState if s.terminal}
