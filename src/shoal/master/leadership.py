"""This master's seat among several: a lease, a membership, a campaign for the leadership.

Keys, under the store's prefix:

    members/<name>   {"name", "url"} of a master alive, bound to its lease
    leader           {"name", "url"} of the leader, bound to the leader's lease; its
                     create_revision is the leader's fencing token, which every write of
                     its store compares (`EtcdStore`)

Theory of operation
- Each master holds one lease (`ttl` seconds, 2 at least: etcd's minimum) and renews it
  every `ttl / 4` on a thread of its own, so a long turn of the event loop never lets it lapse.
- A leader may act only until the send time of the last renewal etcd confirmed, plus the
  TTL etcd granted, less a margin: etcd counts a lease from when it received the renewal,
  which is after it was sent, so this deadline comes before etcd can expire the lease and
  before any other master can be elected, however late the answer came back. `may_act()`
  says whether it has passed; the master checks it before carrying out anything, and the
  loop's side (`ha.reign`) checks it ten times a second, so the master stands down (no
  launches, no kills, no answers) even when nothing is asked of it. Jepsen's lesson about etcd locks is why
  the deadline is not enough on its own: every write is also fenced by the token.
- Campaigning is one transaction that creates the leader key only where it is absent.
  Followers watch the key and campaign the moment it is deleted: by its lease expiring, or
  by a leader resigning (a graceful shutdown revokes the lease, so a follower takes over at
  once rather than a TTL later).
- Everything the seat learns reaches the event loop through `changed` (an asyncio.Event
  set from the threads with `call_soon_threadsafe`); the loop reads `leading`, `token` and
  `leader` after it fires.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
from dataclasses import dataclass

from shoal.master.store.gateway import (
    EtcdError,
    EtcdUnavailable,
    Gateway,
    Watch,
    absent,
    created_at,
    delete_op,
    prefix_end,
    put_op,
    range_op,
)

log = logging.getLogger("shoal.master")
MIN_TTL = 2.0  # etcd grants no shorter lease
_MARGIN = 0.25  # seconds a leader stops acting before its lease could expire
_RETRY = 0.2  # seconds between attempts while etcd does not answer
_REREAD = 2  # TTLs a follower's watch on the leader key lives before the key is read afresh


@dataclass(frozen=True, slots=True)
class Member:
    """A master as its peers and clients see it: its API, and the port it serves DNS on
    when it leads."""

    name: str
    url: str
    dns_port: int = 0

    def encode(self) -> bytes:
        return json.dumps({"name": self.name, "url": self.url, "dns_port": self.dns_port}).encode()

    @classmethod
    def decode(cls, raw: bytes) -> Member:
        fields = json.loads(raw)
        return cls(str(fields["name"]), str(fields["url"]), int(fields.get("dns_port", 0)))


class Seat:
    """This master's lease, membership and campaign; `start()` runs them on two threads."""

    def __init__(self, gateway: Gateway, prefix: str, me: Member, ttl: float = MIN_TTL) -> None:
        self.gateway = gateway
        self.me = me
        self.ttl = max(ttl, MIN_TTL)
        self.leader_key = f"{prefix}leader".encode()
        self.members_prefix = f"{prefix}members/".encode()
        self._member_key = self.members_prefix + me.name.encode()
        self.changed = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._lease_changed = threading.Condition(self._lock)
        self._lease = 0  # 0: none held
        self._valid_until = 0.0  # time.monotonic() after which a leader must not act
        self.leading = False
        self.token = 0  # the leader key's create_revision while leading
        self.leader: Member | None = None
        self._watch: Watch | None = None
        self._threads: list[threading.Thread] = []
        self._stand_after = 0.0  # time.monotonic() before which this master does not campaign

    # --- the loop's side ------------------------------------------------------------------

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        for target, name in ((self._keep_lease, "lease"), (self._campaign, "campaign")):
            thread = threading.Thread(target=target, name=f"shoal {name}", daemon=True)
            thread.start()
            self._threads.append(thread)

    @property
    def in_touch(self) -> bool:
        """Whether this master holds a lease, so what it says of the leader is current."""
        return self._lease != 0

    def may_act(self) -> bool:
        """Whether this master leads and its lease surely has not expired."""
        return self.leading and self.time_left() > 0

    def time_left(self) -> float:
        """Seconds before the lease could lapse, as far as this master can be sure."""
        return self._valid_until - time.monotonic()

    def members(self) -> list[Member]:
        """The masters alive, from etcd."""
        result = self.gateway.range(self.members_prefix, prefix_end(self.members_prefix))
        return sorted((Member.decode(kv.value) for kv in result.kvs), key=lambda m: m.name)

    def resign(self) -> None:
        """Leave at once: the lease is revoked, so the leader key and this membership go now
        and a follower takes over without waiting out the TTL. The threads stop."""
        self._stopping.set()
        self._release()
        self._close_watch()
        for thread in self._threads:
            thread.join(timeout=self.ttl)

    def abdicate(self, pause: float = 0.0) -> None:
        """Stop leading (a write was refused, or its outcome is unknown): the lease is given
        up, so the leader key goes with it and every master campaigns afresh; this one only
        after `pause` seconds."""
        self._stand_after = time.monotonic() + pause
        self._release()

    def _release(self) -> None:
        """Give the lease up: the leader key and the membership go with it."""
        with self._lock:
            lease, self._lease = self._lease, 0
            self.leading = False
            if self.leader == self.me:
                self.leader = None
            self._lease_changed.notify_all()
        if lease:
            with contextlib.suppress(EtcdError):
                self.gateway.lease_revoke(lease)

    def _notify(self) -> None:
        if self._loop is not None and not self._loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                self._loop.call_soon_threadsafe(self.changed.set)

    # --- the lease thread -----------------------------------------------------------------

    def _keep_lease(self) -> None:
        """Hold a lease and the membership key on it; renew every ttl/4. A lease that lapsed
        (etcd away longer than the TTL) is replaced by a new one."""
        every = self.ttl / 4
        while not self._stopping.is_set():
            sent = time.monotonic()  # etcd counts the lease from after this
            try:
                lease, granted = self.gateway.lease_grant(round(self.ttl))
                self.gateway.put(self._member_key, self.me.encode(), lease=lease)
            except EtcdError as e:
                log.warning("etcd does not grant a lease (%s); retrying", e)
                self._stopping.wait(_RETRY)
                continue
            with self._lock:
                self._lease = lease
                self._valid_until = sent + granted - _MARGIN
                self._lease_changed.notify_all()
            self._renew(lease, every)
            # Let a lease we stopped vouching for go now, if etcd hears it, rather than
            # leave the others waiting out its TTL (a no-op for one already gone).
            with contextlib.suppress(EtcdError):
                self.gateway.lease_revoke(lease, timeout=every)

    def _renew(self, lease: int, every: float) -> None:
        """Renew `lease` until it is gone or the seat stops."""
        while not self._stopping.wait(every) and self._lease == lease:
            sent = time.monotonic()
            try:
                left = self.gateway.lease_keepalive(lease, timeout=every)
            except EtcdError as e:
                log.warning("lease renewal failed (%s)", e)
                if time.monotonic() >= self._valid_until:
                    self._lost(lease, "etcd did not confirm the lease in time")
                    return
                continue
            if left <= 0:
                self._lost(lease, "the lease expired")
                return
            with self._lock:
                if self._lease == lease:
                    self._valid_until = sent + left - _MARGIN

    def _lost(self, lease: int, why: str) -> None:
        with self._lock:
            if self._lease != lease:
                return
            self._lease = 0
            was_leading, self.leading = self.leading, False
            if self.leader == self.me:
                self.leader = None
            self._lease_changed.notify_all()
        if was_leading:
            log.error("leadership lost: %s; standing down", why)
        self._close_watch()
        self._notify()

    # --- the campaign thread --------------------------------------------------------------

    def _campaign(self) -> None:
        """While a lease is held: try for the leader key; failing that, follow the leader
        and watch the key until it is deleted, then try again."""
        while not self._stopping.is_set():
            with self._lock:
                while not self._lease and not self._stopping.is_set():
                    self._lease_changed.wait()
                lease = self._lease
            if self._stopping.wait(max(0.0, self._stand_after - time.monotonic())):
                return
            try:
                self._stand(lease)
            except EtcdError as e:
                log.warning("campaign interrupted (%s); retrying", e)
                self._stopping.wait(_RETRY)

    def _stand(self, lease: int) -> None:
        result = self.gateway.txn(
            [absent(self.leader_key)],
            [put_op(self.leader_key, self.me.encode(), lease=lease)],
            [range_op(self.leader_key)],
        )
        if result.succeeded:
            if self.time_left() <= 0:
                # Won on a lease it can no longer vouch for (etcd slow to confirm it): give
                # the key back at once rather than leave the others waiting out its TTL.
                with contextlib.suppress(EtcdError):
                    self.gateway.txn(
                        [created_at(self.leader_key, result.revision)], [delete_op(self.leader_key)]
                    )
                return
            with self._lock:
                if self._lease != lease:  # lost meanwhile: the key goes with the lease
                    return
                self.token, self.leader = result.revision, self.me
                self.leading = True  # last: whoever sees it leading sees its token
            log.info("elected leader (fencing token %d)", result.revision)
            self._notify()
            self._wait_while_leading(lease)
            return
        kvs = result.responses[0].kvs
        if not kvs:
            return  # deleted between the compare and now: stand again
        self.leader = Member.decode(kvs[0].value)
        self._notify()
        # From the revision the transaction read at, not the key's own: that one may be
        # compacted away long since (every snapshot of the store compacts etcd's history).
        self._wait_for_vacancy(result.revision)

    def _wait_while_leading(self, lease: int) -> None:
        with self._lock:
            while self._lease == lease and self.leading and not self._stopping.is_set():
                self._lease_changed.wait()

    def _wait_for_vacancy(self, seen: int) -> None:
        """Block until the leader key is deleted (or the watch breaks: stand again then).
        The watch is closed, and the key read afresh, every `_REREAD` TTLs besides: a watch
        on a member that froze or was cut off hears nothing, and nothing says so."""
        watch = self.gateway.watch(self.leader_key, start_revision=seen + 1)
        self._watch = watch
        timer = threading.Timer(_REREAD * self.ttl, watch.close)
        timer.daemon = True
        timer.start()
        try:
            for event in watch:
                if event.type == "DELETE":
                    self.leader = None  # known vacant: nobody leads until one stands
                    self._notify()
                    break
                self.leader = Member.decode(event.kv.value)
                self._notify()
        except EtcdUnavailable as e:
            log.info("the watch on the leader broke (%s); standing again", e)
        finally:
            timer.cancel()
            self._close_watch()

    def _close_watch(self) -> None:
        watch, self._watch = self._watch, None
        if watch is not None:
            watch.close()
