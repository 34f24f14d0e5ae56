"""What happens to the master (events) and what it asks its I/O shell to do (commands).

`MasterState.handle(*events) -> list[Command]` speaks only these types. Events carry their
time (`now`); a `request` number ties an awaited event to the `Reply` that answers it.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

from shoal.checks import CheckStatus
from shoal.errors import ShoalError
from shoal.framework import protocol as p
from shoal.model import TASK_RECORD, Caller, JobRecord, JobSpec, Migration, NodeRecord, TaskRecord
from shoal.services import Endpoint, Registration, RegistrationRecord
from shoal.wire import Ack, Heartbeat, Kill, Launch, Register, RunReports, Welcome

# --- events ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Submit:
    """A job to queue; `node_names` is its node set, resolved by the shell (groups need I/O)."""

    request: int
    owner: str
    spec: JobSpec
    now: float
    node_names: frozenset[str] | None = None


@dataclass(frozen=True, slots=True)
class KillJob:
    request: int
    job_id: int
    now: float


@dataclass(frozen=True, slots=True)
class FromAgent:
    node: str
    frame: Register | Heartbeat | RunReports
    now: float


@dataclass(frozen=True, slots=True)
class AgentGone:
    """The connection of `node` closed (the node is not down until its timeout)."""

    node: str
    now: float


@dataclass(frozen=True, slots=True)
class Tick:
    now: float


@dataclass(frozen=True, slots=True)
class Principal:
    """Who calls: the token's name, whether it is an admin's, and the roles it may use."""

    name: str
    admin: bool = False
    roles: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class SubscribeFramework:
    request: int
    principal: Principal
    body: p.Subscribe
    connection: int  # the stream the shell opened for it
    now: float


@dataclass(frozen=True, slots=True)
class FrameworkCall:
    request: int
    principal: Principal
    framework_id: str
    call: p.Call
    now: float


@dataclass(frozen=True, slots=True)
class StreamClosed:
    connection: int
    now: float


@dataclass(frozen=True, slots=True)
class Drain:
    """Move every task off `node` and give it no new work (`drain=False`: take work again)."""

    request: int
    node: str
    drain: bool
    now: float
    deadline: float | None = None  # seconds; then tasks that never migrate are moved too


@dataclass(frozen=True, slots=True)
class RemoveNode:
    """Put `node` out of the cluster as a lost node is (its tasks end LOST, to run elsewhere
    as their restart policy says) and close its connection; it comes back only by joining
    again. Answered with the ids of the tasks it held."""

    request: int
    node: str
    now: float


@dataclass(frozen=True, slots=True)
class RebalanceNow:
    """Run one rebalancing round now, whatever the loop's timer says."""

    request: int
    now: float


@dataclass(frozen=True, slots=True)
class RegisterService:
    """A service shoal does not run, registered from outside (replaces one with its id)."""

    request: int
    caller: Caller
    spec: Registration
    now: float


@dataclass(frozen=True, slots=True)
class CheckService:
    """A registration's TTL check, refreshed with a verdict (pass, warn or fail)."""

    request: int
    caller: Caller
    registration: str
    status: CheckStatus
    output: str
    now: float


@dataclass(frozen=True, slots=True)
class DeregisterService:
    request: int
    caller: Caller
    registration: str
    now: float


ServiceCall = RegisterService | CheckService | DeregisterService
Request = (
    Submit | KillJob | SubscribeFramework | FrameworkCall | Drain | RemoveNode | RebalanceNow | ServiceCall
)  # awaited


@dataclass(frozen=True, slots=True)
class MastersSeen:
    """The masters alive now, as the registry lists them (`shoal-master`)."""

    masters: tuple[Endpoint, ...]
    now: float


Event = Request | FromAgent | AgentGone | Tick | StreamClosed | MastersSeen

# --- commands -------------------------------------------------------------------------------


@dataclass(frozen=True)  # not slots: it keeps its jobs' and tasks' JSON once made (below)
class Persist:
    jobs: tuple[JobRecord, ...] = ()
    tasks: tuple[TaskRecord, ...] = ()
    nodes: tuple[NodeRecord, ...] = ()
    frameworks: tuple[p.FrameworkRecord, ...] = ()
    updates: tuple[tuple[str, p.TaskStatus], ...] = ()  # (framework, status) to deliver
    acked: tuple[str, ...] = ()  # uuids of updates delivered and acknowledged
    migrations: tuple[Migration, ...] = ()
    forgotten_jobs: tuple[int, ...] = ()  # finished jobs past retention: gone with their tasks
    forgotten_migrations: tuple[int, ...] = ()
    registrations: tuple[RegistrationRecord, ...] = ()  # services registered from outside
    forgotten_registrations: tuple[str, ...] = ()  # their ids: deregistered or lapsed
    # The next id of each kind, so an id is never given twice, even once its record is pruned.
    counters: tuple[tuple[str, int], ...] = ()

    @cached_property
    def job_docs(self) -> tuple[str, ...]:
        """Each of `jobs` as JSON: made once, for the store and the event stream alike."""
        return tuple(j.model_dump_json() for j in self.jobs)

    @cached_property
    def task_docs(self) -> tuple[bytes, ...]:
        """Each of `tasks` as JSON: made once, for the store and the event stream alike."""
        return tuple(TASK_RECORD.dump_json(t) for t in self.tasks)


@dataclass(frozen=True, slots=True)
class Send:
    node: str
    frame: Launch | Kill | Ack | Welcome


@dataclass(frozen=True, slots=True)
class Reply:
    request: int
    value: object = None
    error: ShoalError | None = None


@dataclass(frozen=True, slots=True)
class Disconnect:
    node: str
    reason: str = ""  # said to the agent when it is put out (a policy-violation close): why


@dataclass(slots=True)
class Offer:
    id: str
    framework: str
    node: str
    row: int
    amount: np.ndarray
    made_at: float


@dataclass(frozen=True, slots=True)
class OffersMade:
    """New offers for one framework: the ledger's own records, put in JSON by `encode` (a
    cycle can make 10,000 of them; building a model for each would cost more than deciding)."""

    offers: tuple[Offer, ...]


@dataclass(frozen=True, slots=True)
class ToFramework:
    connection: int
    event: p.Told | OffersMade


@dataclass(frozen=True, slots=True)
class CloseStream:
    connection: int


Command = Persist | Send | Reply | Disconnect | ToFramework | CloseStream
