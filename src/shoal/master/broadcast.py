"""The master's event stream in motion: the log of shoal.master.stream fed from each
dispatch, and its subscribers woken once per dispatch that appended to it.

Each subscriber is one loop over the log from its own index: it writes whatever it has not
had yet, in chunks, and sleeps until the log grows. None has a queue of its own, so a slow
one costs no memory: it falls behind, and once the log no longer holds the index it stands
at, it is sent a `gone` event saying so and its stream ends (the client lists afresh and
follows from the index given).

A subscriber also hears where its stream stands, in the frame its stream began with
(`: following from <index>` and `id: <index>`, no data): when nothing was written to it
for `KEEP_ALIVE` seconds, quiet master or busy one whose events it does not want, and when
the index it would resume after is in the older half of what the log holds. A filtered
stream that reconnects resumes from there, not from its last event, which the log may have
let go meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import weakref
from collections import Counter
from collections.abc import AsyncIterator, Iterable
from itertools import islice
from typing import NamedTuple

from shoal.master.deflate import Piece, squeeze
from shoal.master.events import Persist
from shoal.master.ledger import Ledger
from shoal.master.stream import Event, EventLog, Filter, Gone, Known, record_changes
from shoal.shell.protocol import AuditRecord

# Seconds at most between writes to a stream, so proxies keep it open and the client knows
# where it stands (see above).
KEEP_ALIVE = 15.0
CHUNK = 1024  # events looked at, at most, for one write
# Bytes of frames one write holds at most (past the event that crosses it): a stream whose
# client stopped reading pins its last write, so a write as large as the log would let a
# few streams pin gigabytes.
CHUNK_BYTES = 1 << 20
# Seconds subscribers are woken apart, at least: a busy master dispatches hundreds of times
# a second, and a write per dispatch per subscriber would cost more than the events.
WAKE_EVERY = 0.05
SHARED = 64  # chunks kept for sharing between wakes, at most
EVERYTHING = Filter()  # an admin's stream of every topic: each event admitted without a look


class _Chunk(NamedTuple):
    frames: bytes  # of the events admitted
    reached: int  # the index of the last event looked at
    last: int | None  # the index of the last event admitted (None: none was)


class Broadcast:
    def __init__(self) -> None:
        # Above any index an earlier master gave: see shoal.master.stream.
        self.log = EventLog(base=int(time.time() * 1e6))
        self.subscribers = 0  # streams open, from their admission on (see `follow`)
        self.held: Counter[str] = Counter()  # the same, by whom
        self.known = Known()  # what tags events beyond their records (see shoal.master.stream)
        self.closed = False
        self._grew = asyncio.Event()
        self._told = self.log.last  # the newest index subscribers were woken for
        self._waking: asyncio.TimerHandle | None = None
        # What subscribers at one index with one filter are sent, made once for them all:
        # (index, newest index, filter) -> the chunk. Emptied at each wake, when the newest
        # index moves on.
        self._made: dict[tuple[int, int, Filter], _Chunk] = {}
        # The frames of those chunks compressed, for the streams that take them so
        # (shoal.master.deflate): frames -> their piece (None until a stream asks), emptied at
        # each wake as well.
        self._pieces: dict[bytes, Piece | None] = {}

    def changed(self, changes: Persist, ledger: Ledger) -> None:
        def owner_of(job_id: int) -> str | None:
            job = ledger.jobs.get(job_id)
            return job.owner if job is not None else None

        record_changes(self.log, changes, owner_of, time.time(), self.known)

    def learn(self, ledger: Ledger) -> None:
        """Learn from the ledger what tags the events to come: once, as the master takes
        its ledger, before its first change (the first batch's events are tagged too)."""
        self.known.learn(ledger.jobs.values(), ledger.active_tasks())

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
        """Wake the subscribers, soon, if anything was appended since they were last woken."""
        if self.log.last != self._told and self._waking is None:
            self._waking = asyncio.get_running_loop().call_later(WAKE_EVERY, self._wake_now)

    def _wake_now(self) -> None:
        self._waking = None
        self._told = self.log.last
        self._made.clear()
        self._pieces.clear()
        grew, self._grew = self._grew, asyncio.Event()
        grew.set()

    def _chunk(self, cursor: int, which: Filter) -> _Chunk:
        """The frames after `cursor` that `which` admits, `CHUNK` events looked at and about
        `CHUNK_BYTES` admitted at most."""
        key = (cursor, self.log.last, which)
        if (made := self._made.get(key)) is None:
            everything = which == EVERYTHING
            admitted: list[Event] = []
            reached, size = cursor, 0
            for event in islice(self.log.after(cursor), CHUNK):
                reached = event.index
                if everything or which.admits(event):
                    admitted.append(event)
                    size += len(event.frame)
                    if size >= CHUNK_BYTES:
                        break
            made = _Chunk(
                b"".join(e.frame for e in admitted), reached, admitted[-1].index if admitted else None
            )
            if len(self._made) < SHARED:  # a catch-up from far back is its own, not kept
                self._made[key] = made
                self._pieces.setdefault(made.frames, None)
        return made

    def piece_of(self, frames: bytes) -> Piece:
        """`frames` compressed: once for every stream they are sent to between two wakes, when
        they are a chunk kept for sharing; afresh otherwise (a catch-up, a keep-alive)."""
        if frames not in self._pieces:
            return squeeze(frames)
        if (piece := self._pieces[frames]) is None:
            piece = self._pieces[frames] = squeeze(frames)
        return piece

    def close(self) -> None:
        """This master stops serving: every stream ends (the client follows the leader)."""
        self.closed = True
        if self._waking is not None:
            self._waking.cancel()
        self._grew.set()

    def follow(self, cursor: int, which: Filter, who: str) -> AsyncIterator[bytes]:
        """The frames after `cursor` that `which` admits, as they come, for `who`. Counted
        from now, not from its first chunk, so calls made at once are held to the caps of
        shoal.master.stream_api all the same; and until it ends, or is dropped unread."""
        seat = _Seat(self, who)
        frames = self._frames(cursor, which, seat)
        weakref.finalize(frames, seat.leave)  # never started: its `finally` never runs
        return frames

    async def _frames(self, cursor: int, which: Filter, seat: _Seat) -> AsyncIterator[bytes]:
        """Something is yielded at every wake, if only b"", so what consumes the stream may
        look again at the caller (see shoal.master.deps.while_token_holds)."""
        loop = asyncio.get_running_loop()
        try:
            yield _following(cursor)  # the answer's head goes out now
            told, spoke = cursor, loop.time()  # the index it would resume after; when last written to
            while not self.closed:
                grew = self._grew
                try:
                    chunk = self._chunk(cursor, which)
                except Gone as e:
                    yield _gone(e)
                    return
                more = chunk.reached < self.log.last  # cut short: more is there already
                cursor = chunk.reached
                frames = chunk.frames
                if chunk.last is not None:
                    told, spoke = chunk.last, loop.time()
                elif loop.time() - spoke >= KEEP_ALIVE or self._lapsing(told):
                    frames, told, spoke = _following(cursor), cursor, loop.time()
                yield frames
                if more:
                    continue
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(spoke + KEEP_ALIVE - loop.time()):
                        await grew.wait()
        finally:
            seat.leave()

    def _lapsing(self, index: int) -> bool:
        """Whether `index` is in the older half of what the log holds: a client that would
        resume after it should hear of a newer index before the log lets it go."""
        log = self.log
        return index - log.first < (log.last - log.first) // 2


class _Seat:
    """One stream counted, by whom, from its admission to its end."""

    def __init__(self, hub: Broadcast, who: str) -> None:
        self.hub, self.who, self.seated = hub, who, True
        hub.subscribers += 1
        hub.held[who] += 1

    def leave(self) -> None:
        if self.seated:
            self.seated = False
            self.hub.subscribers -= 1
            self.hub.held[self.who] -= 1
            if not self.hub.held[self.who]:
                del self.hub.held[self.who]


def _following(index: int) -> bytes:
    # The comment for readers of shoal.sse and the dashboard; the id, with no data, for any
    # other: a server-sent-events reader sets its last event id from it, dispatching nothing.
    return b": following from %d\nid: %d\n\n" % (index, index)


def _gone(e: Gone) -> bytes:
    data = json.dumps({"error": str(e), "asked": e.asked, "oldest": e.oldest})
    return b"event: gone\ndata: %s\n\n" % data.encode()
