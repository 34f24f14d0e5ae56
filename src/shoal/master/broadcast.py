"""The master's event stream in motion: the log of shoal.master.stream fed from each
dispatch, and its subscribers woken once per dispatch that appended to it.

Each subscriber is one loop over the log from its own index: it writes whatever it has not
had yet, in chunks, and sleeps until the log grows. None has a queue of its own, so a slow
one costs no memory: it falls behind, and once the log no longer holds the index it stands
at, it is sent a `gone` event saying so and its stream ends (the client lists afresh and
follows from the index given).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterable
from itertools import islice

from shoal.master.events import Persist
from shoal.master.ledger import Ledger
from shoal.master.stream import EventLog, Filter, Gone, record_changes
from shoal.shell.protocol import AuditRecord

KEEP_ALIVE = 15.0  # seconds between comments on a quiet stream, so proxies keep it open
CHUNK = 1024  # events written at most at once


class Broadcast:
    def __init__(self) -> None:
        # Above any index an earlier master gave: see shoal.master.stream.
        self.log = EventLog(base=int(time.time() * 1e6))
        self.subscribers = 0
        self.closed = False
        self._grew = asyncio.Event()
        self._told = self.log.last  # the newest index subscribers were woken for

    def changed(self, changes: Persist, ledger: Ledger) -> None:
        def owner_of(job_id: int) -> str | None:
            job = ledger.jobs.get(job_id)
            return job.owner if job is not None else None

        record_changes(self.log, changes, owner_of, time.time())

    def offered(self, line: bytes) -> None:
        """Offers made to or taken back from a framework: the line it was sent."""
        self.log.append("offers", "offers", line.rstrip(b"\n"), time.time())

    def audited(self, records: list[AuditRecord]) -> None:
        for record in records:
            self.log.append("audit", "recorded", record.model_dump_json().encode(), record.at)

    def services_changed(self, names: Iterable[str]) -> None:
        for name in names:
            self.log.append("services", "endpoints", {"service": name}, time.time())

    def wake(self) -> None:
        """Wake the subscribers if anything was appended since they were last woken."""
        if self.log.last != self._told:
            self._told = self.log.last
            grew, self._grew = self._grew, asyncio.Event()
            grew.set()

    def close(self) -> None:
        """This master stops serving: every stream ends (the client follows the leader)."""
        self.closed = True
        self._grew.set()

    async def follow(self, cursor: int, which: Filter) -> AsyncIterator[bytes]:
        """The frames after `cursor` that `which` admits, as they come."""
        log = self.log
        self.subscribers += 1
        try:
            yield b": following from %d\n\n" % cursor  # the answer's head goes out now
            while not self.closed:
                grew = self._grew
                try:
                    events = list(islice(log.after(cursor), CHUNK))
                except Gone as e:
                    yield _gone(e)
                    return
                if events:
                    cursor = events[-1].index
                    # Empty when none is admitted: yielded still, so what consumes it may
                    # look again at the caller (see shoal.master.deps.while_token_holds).
                    yield b"".join(e.frame for e in events if which.admits(e))
                    if len(events) == CHUNK:
                        continue  # more is there already
                try:
                    await asyncio.wait_for(grew.wait(), KEEP_ALIVE)
                except TimeoutError:
                    yield b": keep-alive\n\n"
        finally:
            self.subscribers -= 1


def _gone(e: Gone) -> bytes:
    data = json.dumps({"error": str(e), "asked": e.asked, "oldest": e.oldest})
    return b"event: gone\ndata: %s\n\n" % data.encode()
