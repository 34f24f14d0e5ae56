"""What one `MasterState.handle` changed and must say: the records to store, then the
frames, replies and streams' events, in the order the I/O shell must carry them out."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from shoal.framework.protocol import FrameworkRecord, TaskStatus
from shoal.master.events import Command, Persist, Send
from shoal.model import JobRecord, Migration, NodeRecord, TaskRecord
from shoal.services import RegistrationRecord
from shoal.wire import Launch, RunSpec


@dataclass
class Outbox:
    """Filled by the ledger as it changes; emptied into commands once per `handle`."""

    jobs: dict[int, JobRecord] = field(default_factory=dict)
    tasks: dict[str, TaskRecord] = field(default_factory=dict)
    nodes: dict[str, NodeRecord] = field(default_factory=dict)
    frameworks: dict[str, FrameworkRecord] = field(default_factory=dict)
    updates: list[tuple[str, TaskStatus]] = field(default_factory=list)
    acked: list[str] = field(default_factory=list)
    migrations: dict[int, Migration] = field(default_factory=dict)
    counters: dict[str, int] = field(default_factory=dict)
    forgotten_jobs: list[int] = field(default_factory=list)
    forgotten_migrations: list[int] = field(default_factory=list)
    registrations: dict[str, RegistrationRecord] = field(default_factory=dict)
    forgotten_registrations: dict[str, None] = field(default_factory=dict)
    seen_nodes: dict[str, NodeRecord] = field(default_factory=dict)  # connection changed: not stored
    out: list[Command] = field(default_factory=list)
    launches: dict[str, list[RunSpec]] = field(default_factory=lambda: defaultdict(list))

    def commands(self) -> list[Command]:
        """One `Persist` first (when anything is to be stored), then the launches per node,
        then the frames, replies and events in the order they were made."""
        commands: list[Command] = []
        forgotten = set(self.forgotten_jobs)
        tasks = tuple(self.tasks.values())
        if forgotten:  # a job pruned in this handle takes its tasks' changes with it
            tasks = tuple(t for t in tasks if t.job_id not in forgotten)
        stored = (
            self.jobs,
            tasks,
            self.nodes,
            self.frameworks,
            self.updates,
            self.acked,
            self.migrations,
            forgotten,
            self.forgotten_migrations,
            self.registrations,
            self.forgotten_registrations,
            self.counters,
        )
        if any(stored):
            commands.append(
                Persist(
                    tuple(self.jobs.values()),
                    tasks,
                    tuple(self.nodes.values()),
                    tuple(self.frameworks.values()),
                    tuple(self.updates),
                    tuple(self.acked),
                    tuple(self.migrations.values()),
                    tuple(self.forgotten_jobs),
                    tuple(self.forgotten_migrations),
                    tuple(self.registrations.values()),
                    tuple(self.forgotten_registrations),
                    tuple(self.counters.items()),
                )
            )
        commands.extend(Send(node, Launch(runs=runs)) for node, runs in self.launches.items())
        commands.extend(self.out)
        return commands
