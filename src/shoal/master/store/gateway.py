"""A small synchronous client of etcd's v3 JSON gateway: HTTP POST to `/v3/...` over httpx.

etcd serves its gRPC API as JSON too (grpc-gateway): keys and values travel base64-encoded,
int64 fields come back as strings, and a field left out means zero, false or empty. This
module turns that into typed results (`KeyValue`, `RangeResult`, `TxnResult`, `Event`) and
builds the operations and comparisons of a transaction (`put_op`, `delete_op`, `range_op`,
`created_at`, `absent`, `present`), so no caller writes etcd's JSON.

It is synchronous on purpose: the master renews its lease and watches on threads of their
own, sharing one `Gateway` (httpx.Client is thread-safe). Chosen over etcd3gw (a thread per
watch, no resumption) and the grpc `etcd3` package (unmaintained).

Endpoints and failures
- A request goes to the endpoint that last answered; when it cannot be reached the next is
  tried, and so on round the list. When none answers, `EtcdUnavailable`.
- A request that may have reached etcd before the connection failed (a read timeout, a
  member killed mid-answer) is sent again elsewhere only when sending it twice is harmless
  (reads, lease renewals, compaction). A write (put, delete, txn) is not: its outcome is
  unknown, and `EtcdUnavailable` says so.
- An answer of etcd's with an error (4xx/5xx) raises `EtcdError` carrying etcd's message,
  except "unavailable" (gRPC code 14: no leader, a member cut off), which is treated as the
  endpoint failing.
"""

from __future__ import annotations

import base64
import contextlib
import json
import socket
import threading
import urllib.parse
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import httpx

from shoal.errors import ShoalError

Key = bytes | str
_UNAVAILABLE = 14  # gRPC's code for "unavailable": no leader, or this member is cut off
_NOT_FOUND = 5  # gRPC's code for "not found" (a lease that is gone)
DEFAULT_PORT = 2379  # etcd's client port


class EtcdError(ShoalError):
    """etcd answered with an error: `code` is its gRPC code, `status` the HTTP status."""

    def __init__(self, message: str, code: int = 0, status: int = 0) -> None:
        super().__init__(message)
        self.code = code
        self.status = status


class EtcdUnavailable(EtcdError):
    """No endpoint answered, or a write's connection broke before its answer came (so whether
    etcd took it is unknown). Retrying elsewhere is the caller's decision."""


class Compacted(EtcdError):
    """A watch asked for revisions etcd has compacted away; `revision` is the oldest kept."""

    def __init__(self, revision: int) -> None:
        super().__init__(
            f"etcd has compacted its history up to revision {revision}: read the current state"
            f" again and watch from its revision"
        )
        self.revision = revision


# --- values -------------------------------------------------------------------------------


def _bytes(key: Key) -> bytes:
    return key.encode() if isinstance(key, str) else key


def _b64(data: Key) -> str:
    return base64.b64encode(_bytes(data)).decode("ascii")


def _unb64(text: str | None) -> bytes:
    return base64.b64decode(text) if text else b""


@dataclass(frozen=True, slots=True)
class KeyValue:
    key: bytes
    value: bytes
    create_revision: int
    mod_revision: int
    lease: int

    @classmethod
    def from_json(cls, kv: dict[str, Any]) -> KeyValue:
        return cls(
            _unb64(kv.get("key")),
            _unb64(kv.get("value")),
            int(kv.get("create_revision", 0)),
            int(kv.get("mod_revision", 0)),
            int(kv.get("lease", 0)),
        )


@dataclass(frozen=True, slots=True)
class RangeResult:
    kvs: list[KeyValue]
    revision: int  # the store's revision the read saw
    more: bool  # the limit cut it short
    count: int  # keys in the whole range, the limit notwithstanding

    @classmethod
    def from_json(cls, body: dict[str, Any], revision: int) -> RangeResult:
        kvs = [KeyValue.from_json(kv) for kv in body.get("kvs", ())]
        return cls(kvs, revision, bool(body.get("more", False)), int(body.get("count", 0)))


@dataclass(frozen=True, slots=True)
class TxnResult:
    succeeded: bool  # whether every comparison held (the success branch ran)
    revision: int  # the store's revision after it
    # One per operation of the branch that ran: a range's RangeResult, a delete's number of
    # keys deleted, None for a put.
    responses: list[Any]


@dataclass(frozen=True, slots=True)
class Event:
    type: Literal["PUT", "DELETE"]
    kv: KeyValue  # a DELETE's carries the key and its mod_revision only


@dataclass(frozen=True, slots=True)
class Op:
    """One operation of a transaction, as etcd's JSON spells it (built by the helpers below)."""

    body: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Compare:
    """One comparison of a transaction (built by the helpers below)."""

    body: dict[str, Any]


def prefix_end(prefix: Key) -> bytes:
    """The range end that covers every key starting with `prefix`."""
    raw = bytearray(_bytes(prefix))
    while raw and raw[-1] == 0xFF:
        raw.pop()
    if not raw:
        return b"\0"  # etcd's "to the end of the keyspace"
    raw[-1] += 1
    return bytes(raw)


def _range_body(
    key: Key, range_end: Key | None, limit: int, sort_descend: bool, keys_only: bool, revision: int = 0
) -> dict[str, Any]:
    body: dict[str, Any] = {"key": _b64(key)}
    if range_end is not None:
        body["range_end"] = _b64(range_end)
    if limit:
        body["limit"] = str(limit)
    if revision:
        body["revision"] = str(revision)
    if sort_descend:
        body["sort_order"], body["sort_target"] = "DESCEND", "KEY"
    if keys_only:
        body["keys_only"] = True
    return body


def put_op(key: Key, value: Key, lease: int = 0) -> Op:
    body: dict[str, Any] = {"key": _b64(key), "value": _b64(value)}
    if lease:
        body["lease"] = str(lease)
    return Op({"request_put": body})


def delete_op(key: Key, range_end: Key | None = None) -> Op:
    body = {"key": _b64(key)}
    if range_end is not None:
        body["range_end"] = _b64(range_end)
    return Op({"request_delete_range": body})


def range_op(
    key: Key,
    range_end: Key | None = None,
    *,
    limit: int = 0,
    sort_descend: bool = False,
    keys_only: bool = False,
) -> Op:
    return Op({"request_range": _range_body(key, range_end, limit, sort_descend, keys_only)})


def created_at(key: Key, revision: int) -> Compare:
    """Holds while `key` is the one created at `revision` (a fencing token)."""
    return Compare(
        {"key": _b64(key), "target": "CREATE", "result": "EQUAL", "create_revision": str(revision)}
    )


def absent(key: Key) -> Compare:
    """Holds while `key` does not exist."""
    return created_at(key, 0)


def present(key: Key) -> Compare:
    """Holds while `key` exists."""
    return Compare({"key": _b64(key), "target": "CREATE", "result": "GREATER", "create_revision": "0"})


def _response(op: dict[str, Any], revision: int) -> Any:
    if "response_range" in op:
        return RangeResult.from_json(op["response_range"], revision)
    if "response_delete_range" in op:
        return int(op["response_delete_range"].get("deleted", 0))
    return None


def parse_store_url(url: str) -> list[str]:
    """`etcd://h1:2379,h2:2379` -> ["http://h1:2379", "http://h2:2379"]; a port left out is
    2379. ValueError, saying what is wrong, for anything else."""
    scheme, sep, rest = url.partition("://")
    if scheme != "etcd" or not sep or not rest.strip():
        raise ValueError(
            f"{url!r}: expected etcd://HOST:PORT[,HOST:PORT...], naming one etcd member at least"
        )
    endpoints = []
    for member in rest.split(","):
        try:
            split = urllib.parse.urlsplit(f"//{member.strip()}")
            host, port = split.hostname, split.port or DEFAULT_PORT
        except ValueError:
            raise ValueError(f"{member!r} in {url!r}: the port must be a number from 1 to 65535") from None
        if not host or split.path or split.query or split.fragment or split.username:
            raise ValueError(f"{member!r} in {url!r}: expected HOST:PORT, like 10.0.0.1:2379")
        endpoints.append(f"http://{f'[{host}]' if ':' in host else host}:{port}")
    return endpoints


# --- the client ---------------------------------------------------------------------------


class Gateway:
    """etcd's v3 API at `endpoints` (client URLs of the members, e.g. http://10.0.0.1:2379).
    `timeout` (seconds) bounds every call that does not give its own. The caller closes it."""

    def __init__(self, endpoints: Sequence[str], timeout: float = 5.0) -> None:
        if not endpoints:
            raise ValueError("no etcd endpoints given")
        self.endpoints = [e.rstrip("/") for e in endpoints]
        self.timeout = timeout
        self._client = httpx.Client()
        self._preferred = 0  # the endpoint that answered last

    def close(self) -> None:
        self._client.close()

    # --- key-value ------------------------------------------------------------------------

    def range(
        self,
        key: Key,
        range_end: Key | None = None,
        *,
        limit: int = 0,
        sort_descend: bool = False,
        keys_only: bool = False,
        revision: int = 0,
        timeout: float | None = None,
    ) -> RangeResult:
        """The keys from `key` up to `range_end` (just `key` without one), at `revision`
        (0: the latest). A descending sort makes etcd read the whole range before the limit
        applies: keep such ranges narrow."""
        body = _range_body(key, range_end, limit, sort_descend, keys_only, revision)
        answer = self._post("/v3/kv/range", body, timeout, resend=True)
        return RangeResult.from_json(answer, _revision(answer))

    def scan(
        self, key: Key, range_end: Key, *, page: int, revision: int = 0, timeout: float | None = None
    ) -> Iterator[KeyValue]:
        """Every key of the range in order, read `page` keys a request, all at one revision
        (the first page's, unless given), so the pages make one consistent view."""
        start = _bytes(key)
        while True:
            result = self.range(start, range_end, limit=page, revision=revision, timeout=timeout)
            yield from result.kvs
            if not result.more or not result.kvs:
                return
            revision = revision or result.revision  # the header says the latest, not the one read
            start = result.kvs[-1].key + b"\0"

    def txn(
        self,
        compare: Sequence[Compare],
        success: Sequence[Op],
        failure: Sequence[Op] = (),
        *,
        timeout: float | None = None,
    ) -> TxnResult:
        body = {
            "compare": [c.body for c in compare],
            "success": [o.body for o in success],
            "failure": [o.body for o in failure],
        }
        answer = self._post("/v3/kv/txn", body, timeout, resend=False)
        revision = _revision(answer)
        responses = [_response(op, revision) for op in answer.get("responses", ())]
        return TxnResult(bool(answer.get("succeeded", False)), revision, responses)

    def put(self, key: Key, value: Key, *, lease: int = 0, timeout: float | None = None) -> int:
        """Store `value` at `key` (bound to `lease` if given); the revision it made."""
        body = put_op(key, value, lease).body["request_put"]
        return _revision(self._post("/v3/kv/put", body, timeout, resend=False))

    def delete_range(self, key: Key, range_end: Key | None = None, *, timeout: float | None = None) -> int:
        """Delete `key` (or the range up to `range_end`); how many keys went."""
        body = delete_op(key, range_end).body["request_delete_range"]
        return int(self._post("/v3/kv/deleterange", body, timeout, resend=False).get("deleted", 0))

    def compact(self, revision: int, *, timeout: float | None = None) -> None:
        """Let etcd forget every revision before `revision` (already forgotten: no error)."""
        try:
            self._post("/v3/kv/compaction", {"revision": str(revision)}, timeout, resend=True)
        except EtcdError as e:
            if "compacted" not in str(e):
                raise

    # --- leases ---------------------------------------------------------------------------

    def lease_grant(self, ttl: int, *, timeout: float | None = None) -> tuple[int, int]:
        """A new lease of `ttl` seconds (etcd grants 2 at least): (its id, the TTL granted).
        Sent again after a broken connection: a lease granted twice lapses unused."""
        answer = self._post("/v3/lease/grant", {"TTL": str(ttl)}, timeout, resend=True)
        return int(answer["ID"]), int(answer.get("TTL", 0))

    def lease_keepalive(self, lease: int, *, timeout: float | None = None) -> int:
        """Renew `lease`; the seconds it has left, 0 when it is gone."""
        answer = self._post("/v3/lease/keepalive", {"ID": str(lease)}, timeout, resend=True)
        return int(answer.get("result", {}).get("TTL", 0))

    def lease_revoke(self, lease: int, *, timeout: float | None = None) -> None:
        """End `lease` and delete its keys now; a lease already gone is no error."""
        try:
            self._post("/v3/kv/lease/revoke", {"ID": str(lease)}, timeout, resend=True)
        except EtcdError as e:
            if e.code != _NOT_FOUND:
                raise

    # --- watches --------------------------------------------------------------------------

    def watch(self, key: Key, start_revision: int = 0, *, range_end: Key | None = None) -> Watch:
        """The changes of `key` (or the range to `range_end`) from `start_revision` (0: from
        now), as an iterator of events; `close()` it from any thread to end it."""
        return Watch(self, _bytes(key), None if range_end is None else _bytes(range_end), start_revision)

    # --- the wire -------------------------------------------------------------------------

    def _order(self) -> list[int]:
        first = self._preferred
        return [(first + i) % len(self.endpoints) for i in range(len(self.endpoints))]

    def _post(
        self, path: str, body: dict[str, Any], timeout: float | None, *, resend: bool
    ) -> dict[str, Any]:
        failures = []
        for i in self._order():
            endpoint = self.endpoints[i]
            try:
                reply = self._client.post(endpoint + path, json=body, timeout=timeout or self.timeout)
            except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as e:
                failures.append(f"{endpoint}: {_describe(e)}")  # never sent: try the next
                continue
            except httpx.TransportError as e:
                failures.append(f"{endpoint}: {_describe(e)}")
                if not resend:
                    self._preferred = (i + 1) % len(self.endpoints)
                    raise _unknown(path, failures) from e
                continue
            answer = _decode(reply)
            if reply.is_success:
                self._preferred = i
                return answer
            error = _error(answer, reply.status_code)
            if error.code != _UNAVAILABLE:
                raise error
            failures.append(f"{endpoint}: {error}")
            if not resend:
                self._preferred = (i + 1) % len(self.endpoints)
                raise _unknown(path, failures) from error
        raise EtcdUnavailable(
            "no etcd endpoint answered (" + "; ".join(failures) + "): check that a majority of the"
            " etcd members runs and that this machine reaches them, or name others in the store URL"
        )

    def _open_watch(self, body: dict[str, Any]) -> httpx.Response:
        """A streaming watch on the first endpoint that takes it."""
        failures = []
        for i in self._order():
            endpoint = self.endpoints[i]
            request = self._client.build_request(
                "POST",
                endpoint + "/v3/watch",
                json=body,
                # A member cut off from the others ends the watch rather than go silent.
                headers={"Grpc-Metadata-hasleader": "true"},
                timeout=httpx.Timeout(self.timeout, read=None),  # events may be hours apart
            )
            try:
                response = self._client.send(request, stream=True)
            except httpx.TransportError as e:
                failures.append(f"{endpoint}: {_describe(e)}")
                continue
            if response.is_success:
                self._preferred = i
                return response
            response.read()
            response.close()
            raise _error(_decode(response), response.status_code)
        raise EtcdUnavailable(
            "no etcd endpoint takes a watch (" + "; ".join(failures) + "): check that the etcd"
            " members run and that this machine reaches them"
        )


class Watch:
    """A running watch: iterate for events. A connection that breaks is opened again, on the
    next endpoint that answers, from the revision after the last event seen, so no event is
    lost or repeated; `EtcdUnavailable` when none answers, `Compacted` when etcd no longer
    has the revisions to resume from. `close()`, from any thread, ends the iteration."""

    def __init__(self, gateway: Gateway, key: bytes, range_end: bytes | None, start_revision: int) -> None:
        self._gateway = gateway
        self._key = key
        self._range_end = range_end
        self.next_revision = start_revision  # where a resumed watch starts (0: from now)
        self._lock = threading.Lock()
        self._response: httpx.Response | None = None
        self._closed = False

    def __enter__(self) -> Watch:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        """End the watch; a thread blocked reading it wakes up and its iteration ends."""
        with self._lock:
            self._closed = True
            response = self._response
        if response is not None:
            _shut(response)

    def __iter__(self) -> Iterator[Event]:
        while True:
            response = self._open()
            if response is None:
                return
            try:
                yield from self._events(response)
            except (httpx.TransportError, EtcdUnavailable):
                # The member died, dropped us or lost its leader: carry on from the next
                # revision wherever a member answers (`_open` raises when none does).
                if self._closed:
                    return
            finally:
                response.close()
            if self._closed:
                return

    def _open(self) -> httpx.Response | None:
        create: dict[str, Any] = {"key": _b64(self._key)}
        if self._range_end is not None:
            create["range_end"] = _b64(self._range_end)
        if self.next_revision:
            create["start_revision"] = str(self.next_revision)
        response = self._gateway._open_watch({"create_request": create})
        with self._lock:
            if self._closed:
                response.close()
                return None
            self._response = response
        return response

    def _events(self, response: httpx.Response) -> Iterator[Event]:
        for line in response.iter_lines():
            if not line.strip():
                continue
            message = json.loads(line)
            if "error" in message:
                error = _error(message["error"], int(message["error"].get("http_code", 500)))
                if error.code == _UNAVAILABLE:
                    raise EtcdUnavailable(str(error), error.code, error.status)
                raise error
            result = message.get("result", {})
            if int(result.get("compact_revision", 0)):
                raise Compacted(int(result["compact_revision"]))
            if result.get("canceled"):
                raise EtcdError(f"etcd cancelled the watch: {result.get('cancel_reason', 'no reason given')}")
            if result.get("created") and not self.next_revision:
                self.next_revision = _revision(result) + 1  # "from now" is this revision on
            for event in result.get("events", ()):
                kv = KeyValue.from_json(event.get("kv", {}))
                self.next_revision = kv.mod_revision + 1
                yield Event("DELETE" if event.get("type") == "DELETE" else "PUT", kv)


def _shut(response: httpx.Response) -> None:
    """Wake a thread blocked reading `response`: closing a socket does not (on Linux), shutting
    it down does."""
    stream = response.extensions.get("network_stream")
    sock = stream.get_extra_info("socket") if stream is not None else None
    if isinstance(sock, socket.socket):
        with contextlib.suppress(OSError):  # already closed by its reader: nothing to wake
            sock.shutdown(socket.SHUT_RDWR)


def _revision(answer: dict[str, Any]) -> int:
    return int(answer.get("header", {}).get("revision", 0))


def _decode(reply: httpx.Response) -> dict[str, Any]:
    try:
        answer = reply.json()
    except ValueError:
        raise EtcdError(
            f"etcd answered {reply.status_code} with no JSON: {reply.text[:200]!r}", status=reply.status_code
        ) from None
    return answer if isinstance(answer, dict) else {}


def _error(answer: dict[str, Any], status: int) -> EtcdError:
    message = answer.get("message") or answer.get("error") or f"HTTP {status}"
    code = answer.get("code", answer.get("grpc_code", 0))  # a stream's errors spell it grpc_code
    return EtcdError(f"etcd: {message}", int(code), status)


def _unknown(path: str, failures: list[str]) -> EtcdUnavailable:
    return EtcdUnavailable(
        f"the connection broke before etcd answered {path} ({'; '.join(failures)}): whether the"
        " write took effect is unknown; read the state again before going on"
    )


def _describe(error: Exception) -> str:
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
