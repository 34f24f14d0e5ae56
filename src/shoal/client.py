"""The Python SDK: everything the CLI does, it does through this client.

from shoal.client import Client
with Client.from_config() as shoal:
    job = shoal.submit(JobSpec(command="hostname", count=3))
    print(shoal.wait(job).state)

A client may be given several masters ("http://m1:8470,http://m2:8470"): every call goes to
the leader, following a follower's redirect with its token, and past masters that are down
or in an election (see `shoal.masters` for the rules and when a call is repeated).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

# httpx imports its own command line (click, pygments, rich's syntax and progress) unless
# that import fails; the SDK never runs it, and it costs more to import than the rest of httpx.
sys.modules.setdefault("httpx._main", None)

import httpx  # noqa: E402 - after the line above
from pydantic import BaseModel, TypeAdapter  # noqa: E402

from shoal import sse  # noqa: E402
from shoal.api_errors import ApiError, api_error  # noqa: E402
from shoal.calls import Calls, segment  # noqa: E402
from shoal.clientfile import ClientConfig, load_client_config  # noqa: E402
from shoal.errors import ShoalError  # noqa: E402
from shoal.masters import FAILOVER, MASTERS_PATH, PATIENCE, Masters, Patience, Unreachable  # noqa: E402
from shoal.model import TASK_RECORD, Caller, JobSpec, JobState, Migration, Role, TaskRecord  # noqa: E402
from shoal.node_identity import NodeRemoved  # noqa: E402
from shoal.service_watch import (  # noqa: E402
    ENDPOINTS,
    INDEX_HEADER,
    Watch,
    blocking_timeout,
    service_path,
    service_query,
)
from shoal.services import Endpoint, Registration, ServiceSummary  # noqa: E402
from shoal.sse import StreamEvent  # noqa: E402
from shoal.views import (  # noqa: E402
    FrameworkView,
    HistoryPage,
    JobView,
    MasterView,
    NodeView,
    PlannedMove,
    Submitted,
    TokenCreated,
    TokenKind,
    TokenView,
)

if TYPE_CHECKING:  # the parallel shell's types, imported where it is used
    from shoal.shell.protocol import (
        AuditRecord,
        CopyRequest,
        Ended,
        ExecRequest,
        Fetched,
        FetchRequest,
        Output,
        Targets,
    )

# Raised by calls, and so part of the SDK as `shoal.client.ApiError` and friends.
__all__ = ["ApiError", "Client", "Patience", "StreamEvent", "Unreachable", "Verdict", "Watch"]

_JOBS = TypeAdapter(list[JobView])
_NODES = TypeAdapter(list[NodeView])
_MASTERS = TypeAdapter(list[MasterView])
_FRAMEWORKS = TypeAdapter(list[FrameworkView])
_PLANNED = TypeAdapter(list[PlannedMove])
_MIGRATIONS = TypeAdapter(list[Migration])
_SUMMARIES = TypeAdapter(list[ServiceSummary])
_TOKENS = TypeAdapter(list[TokenView])
Verdict = Literal["pass", "warn", "fail"]
_CHUNK = 1 << 20
_ENDED = ("complete", "failed", "killed")
_STREAMING = httpx.Timeout(30.0, read=None)


class Client:
    """Calls to the masters at `url`: one URL, several (a list, or separated by commas), or
    a `Masters` shared with other clients. A call that finds no master serving it keeps trying them for
    `failover` seconds (an election takes a few) before it raises `Unreachable`; one refused
    for the rate goes again as `patience` allows. `ca`: the cluster CA's certificate (a PEM
    file) that https masters' certificates must chain to."""

    def __init__(
        self,
        url: str | Sequence[str] | Masters,
        token: str,
        timeout: float = 30.0,
        failover: float = FAILOVER,
        ca: str | Path | None = None,
        patience: Patience = PATIENCE,
    ) -> None:
        self.known = url if isinstance(url, Masters) else Masters(url)
        self._token = token
        self._calls = Calls(self.known, token, timeout, failover, ca=ca, patience=patience)

    @property
    def url(self) -> str:
        """The master calls go to now: the leader, once one is known."""
        return self.known.current

    @classmethod
    def from_config(cls, config: ClientConfig | None = None) -> Client:
        config = config or load_client_config()
        return cls(config.url, config.token, ca=config.ca or None)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        self._calls.close()

    # --- calls ----------------------------------------------------------------------------

    def submit(self, spec: JobSpec | dict[str, Any]) -> int:
        body = spec.model_dump(mode="json") if isinstance(spec, JobSpec) else spec
        return Submitted.model_validate(self._call("POST", "/v1/jobs", json=body)).id

    def jobs(
        self, state: JobState | None = None, owner: str | None = None, queue: str | None = None
    ) -> list[JobView]:
        """The newest thousand jobs the token may see; of a state, an owner, a queue if asked."""
        asked = {"state": state.value if state else None, "owner": owner, "queue": queue}
        params = {name: value for name, value in asked.items() if value is not None}
        return _JOBS.validate_python(self._call("GET", "/v1/jobs", params=params))

    def job(self, job_id: int, offset: int = 0, limit: int = 1000) -> JobView:
        """The job with tasks `offset` to `offset + limit` (the counts cover them all)."""
        params = {"offset": str(offset), "limit": str(limit)}
        return JobView.model_validate(self._call("GET", f"/v1/jobs/{job_id}", params=params))

    def kill(self, job_id: int) -> JobView:
        return JobView.model_validate(self._call("POST", f"/v1/jobs/{job_id}/kill"))

    def task(self, task_id: str) -> TaskRecord:
        return TASK_RECORD.validate_python(self._call("GET", f"/v1/tasks/{task_id}"))

    def nodes(self) -> list[NodeView]:
        return _NODES.validate_python(self._call("GET", "/v1/nodes"))

    def whoami(self) -> Caller:
        return Caller.model_validate(self._call("GET", "/v1/whoami"))

    def masters(self) -> list[MasterView]:
        """The masters alive, the leader marked (any master answers this)."""
        return _MASTERS.validate_python(self._call("GET", MASTERS_PATH))

    def create_token(
        self,
        name: str,
        role: Role,
        roles: tuple[str, ...] = (),
        *,
        ttl: float | None = None,
        kind: TokenKind = "api",
        uses: int | None = None,
    ) -> TokenCreated:
        """A token for `name` (admin only); `roles` are the roles its frameworks may subscribe
        in; it expires after `ttl` seconds (None: never); a bootstrap token lets nodes join,
        `uses` times (None: any number)."""
        body = {
            "name": name,
            "role": role.value,
            "roles": list(roles),
            "kind": kind,
            "ttl": ttl,
            "uses": uses,
        }
        return TokenCreated.model_validate(self._call("POST", "/v1/tokens", json=body))

    def tokens(self) -> list[TokenView]:
        """Every token, oldest first, without its secret (admin only)."""
        return _TOKENS.validate_python(self._call("GET", "/v1/tokens"))

    def revoke_token(self, token_id: str) -> TokenView:
        """Revoke the token of public id `token_id` (as listed) from now on (admin only)."""
        return TokenView.model_validate(self._call("POST", f"/v1/tokens/{segment(token_id)}/revoke"))

    def rebalance_plan(self) -> list[PlannedMove]:
        """The moves a rebalancing round would make now (a dry run)."""
        return _PLANNED.validate_python(self._call("GET", "/v1/rebalance"))

    def rebalance(self) -> list[Migration]:
        """Run one rebalancing round now (admin only); the migrations it started."""
        return _MIGRATIONS.validate_python(self._call("POST", "/v1/rebalance"))

    def drain(self, node: str, deadline: float | None = None) -> list[Migration]:
        """Give `node` no new work and move its tasks off (admin only)."""
        params = {"deadline": str(deadline)} if deadline is not None else {}
        return _MIGRATIONS.validate_python(self._call("POST", f"/v1/nodes/{node}/drain", params=params))

    def undrain(self, node: str) -> None:
        self._call("POST", f"/v1/nodes/{node}/undrain")

    def remove_node(self, node: str) -> NodeRemoved:
        """Take `node` out of the cluster; it joins again with a new bootstrap token (admin only)."""
        return NodeRemoved.model_validate(self._call("DELETE", f"/v1/nodes/{segment(node)}"))

    def events(self, limit: int = 100) -> list[Migration]:
        """Migrations, newest first."""
        return _MIGRATIONS.validate_python(self._call("GET", "/v1/events", params={"limit": str(limit)}))

    def history(
        self,
        *,
        user: str | None = None,
        states: Sequence[str] = (),
        since: float | None = None,
        until: float | None = None,
        node: str | None = None,
        after: str | None = None,
        limit: int = 100,
    ) -> HistoryPage:
        """A page of the tasks that have ended, newest jobs first, as the master still holds
        them (`GET /v1/history`): only `user`'s, ended in `states`, between the Unix times
        `since` and `until`, last run on `node`. Its `next`, given as `after`, goes on."""
        params: dict[str, Any] = {"state": list(states), "limit": str(limit)}
        chosen = {"user": user, "since": since, "until": until, "node": node, "after": after}
        params |= {k: str(v) for k, v in chosen.items() if v is not None}
        return HistoryPage.model_validate(self._call("GET", "/v1/history", params=params))

    def frameworks(self) -> list[FrameworkView]:
        """Frameworks subscribed (or within their failover timeout), with shares and offers."""
        return _FRAMEWORKS.validate_python(self._call("GET", "/v1/frameworks"))

    # --- the service registry ---------------------------------------------------------------

    def services(self) -> list[ServiceSummary]:
        """Every service with its tags and how many of its endpoints pass, warn and fail."""
        return _SUMMARIES.validate_python(self._call("GET", "/v1/services"))

    def service(
        self,
        name: str,
        *,
        all: bool = False,  # noqa: A002 - the API's own name for it
        tag: str | None = None,
        index: int = 0,
        wait: float | None = None,
    ) -> tuple[list[Endpoint], int]:
        """The service's passing endpoints (`all`: every one, failing or not), in the order the
        master gives them, and the service's index. With `index`, a blocking query: it answers
        once the service has changed past `index`, or after `wait` seconds (None: the master's
        default, five minutes)."""
        response = self._request(
            "GET",
            service_path(name),
            params=service_query(all, tag, index, wait),
            timeout=blocking_timeout(index, wait),
        )
        return ENDPOINTS.validate_python(response.json()), int(response.headers.get(INDEX_HEADER, 0))

    def resolve(self, name: str, tag: str | None = None) -> list[tuple[str, int]]:
        """(address, port) of the service's passing endpoints, in the order the master gives
        (least loaded nodes first): try them in turn."""
        endpoints, _ = self.service(name, tag=tag)
        return [(e.address, e.port) for e in endpoints]

    def watch(
        self,
        name: str,
        *,
        all: bool = False,  # noqa: A002 - as in `service`
        tag: str | None = None,
        wait: float = 60.0,
    ) -> Watch:
        """The service's endpoints now, then at every change, until closed (see `Watch`):

        with client.watch("web") as endpoints:
            for current in endpoints:
                ...
        """
        return Watch(self, name, every=all, tag=tag, wait=wait)

    def register(self, registration: Registration | Mapping[str, Any]) -> int:
        """Register a service shoal does not run (or replace the registration with its id);
        it lapses unless `check`ed within its TTL. Returns the registry's index."""
        if isinstance(registration, Registration):
            body = registration.model_dump(mode="json")
        else:
            body = dict(registration)  # validated by the master, which names a bad field
        return int(self._call("PUT", "/v1/services/register", json=body)["index"])

    def check(self, registration_id: str, verdict: Verdict = "pass", note: str = "") -> int:
        """A registration's TTL check, now: passed, warned or failed, with a note its endpoint
        shows as its output. The TTL starts again whatever the verdict."""
        params = {"note": note} if note else {}
        path = f"/v1/services/{segment(registration_id)}/{verdict}"
        return int(self._call("PUT", path, params=params)["index"])

    def deregister(self, registration_id: str) -> int:
        """Remove a registration (its owner's, or an admin's, to remove)."""
        return int(self._call("PUT", f"/v1/services/deregister/{segment(registration_id)}")["index"])

    def logs(
        self, task_id: str, stream: str = "stdout", offset: int = 0, attempt: int | None = None
    ) -> bytes:
        response = self._request(
            "GET", f"/v1/tasks/{task_id}/logs", params=_log_params(stream, offset, attempt)
        )
        return response.content

    def follow(self, task_id: str, stream: str = "stdout", attempt: int | None = None) -> Iterator[bytes]:
        """A task's output as it is written, until its attempt ends."""
        params = {**_log_params(stream, 0, attempt), "follow": "true"}
        with self._stream("GET", f"/v1/tasks/{task_id}/logs", params=params) as response:
            yield from response.iter_bytes()

    def stream(
        self,
        topics: Sequence[str] = (),
        *,
        job: int | None = None,
        node: str | None = None,
        index: int | None = None,
    ) -> Iterator[StreamEvent]:
        """Every change the ledger makes, as it happens (`GET /v1/stream`), from now or after
        `index`. A stream lost or ended after it began (its master stood down, or the
        connection broke) is followed again from the last event had, on the leader, so none
        is missed or seen twice; `StreamGone` (or a 410 `ApiError`) when the master no longer
        holds that index, a 401 `ApiError` once the token is revoked or expired."""
        params: dict[str, Any] = {"topic": list(topics)}
        params |= {k: str(v) for k, v in {"job": job, "node": node}.items() if v is not None}

        def following(start: int) -> None:
            nonlocal index
            index = start

        while not self._calls.closed.is_set():  # closing the client ends it
            began = False
            try:
                after = {} if index is None else {"index": str(index)}
                with self._stream("GET", "/v1/stream", params=params | after) as response:
                    began = True
                    for event in sse.events(response.iter_lines(), following):
                        index = event.index
                        yield event
            except Unreachable:
                if not began:
                    raise

    def exec(self, request: ExecRequest) -> Iterator[Targets | Output | Ended | Fetched]:
        """Run a command on a node set through the agents (admin only); events as they come:
        the targets first, then output chunks and one end per node. Closing the iterator
        (or an interrupt while reading it) cancels the command everywhere."""
        return self._events("/v1/exec", request)

    def copy(self, request: CopyRequest) -> Iterator[Targets | Output | Ended | Fetched]:
        """Push files already uploaded (see `upload`) to a node set; one end per node."""
        return self._events("/v1/copy", request)

    def rcopy(self, request: FetchRequest) -> Iterator[Targets | Output | Ended | Fetched]:
        """Pull one file from every node of a set: a `Fetched` per node, then its end;
        `download` the blob each `Fetched` names."""
        return self._events("/v1/rcopy", request)

    def upload(self, path: Path) -> str:
        """Put a file's content in the master's blob store (once); returns its sha256."""
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(_CHUNK):
                digest.update(chunk)
        blob = digest.hexdigest()
        if self._calls.send("HEAD", f"/v1/blobs/{blob}").status_code != 200:
            # Content-addressed: a repeat stores the same bytes, so it is safe to repeat.
            self._request("PUT", f"/v1/blobs/{blob}", content=_Chunks(path), safe=True)
        return blob

    def download(self, blob: str, target: Path) -> None:
        """Write a stored blob to `target`, checking its sha256; nothing is left on a mismatch."""
        digest = hashlib.sha256()
        try:
            with self._stream("GET", f"/v1/blobs/{blob}") as response, open(target, "wb") as f:
                for chunk in response.iter_bytes(_CHUNK):
                    digest.update(chunk)
                    f.write(chunk)
        except Unreachable:
            target.unlink(missing_ok=True)
            raise
        if digest.hexdigest() != blob:
            target.unlink()
            raise ShoalError(f"{target}: checksum mismatch (got {digest.hexdigest()}, want {blob})")

    def _events(self, path: str, request: BaseModel) -> Iterator[Targets | Output | Ended | Fetched]:
        from shoal.shell.protocol import Unpacker

        with self._stream("POST", path, json=request.model_dump(mode="json")) as response:
            events = Unpacker()
            for chunk in response.iter_raw():
                yield from events.feed(chunk)

    @contextlib.contextmanager
    def _stream(
        self, method: str, path: str, timeout: httpx.Timeout = _STREAMING, **kwargs: Any
    ) -> Iterator[httpx.Response]:
        """A response read as it arrives, by default with no read timeout (streams may idle);
        it starts as any call does, past followers and masters that are down; API errors
        raised as for any call, a connection lost while reading as Unreachable."""
        response = self._calls.send(method, path, stream=True, timeout=timeout, **kwargs)
        try:
            if response.is_error:
                response.read()
                raise api_error(response)
            yield response
        except httpx.TransportError as e:
            raise Unreachable(
                f"lost the master at {response.url.copy_with(path='/', query=None)}: {e}"
            ) from e
        finally:
            response.close()

    def audit(
        self,
        offset: int = 0,
        limit: int = 100,
        *,
        who: str | None = None,
        kind: str | None = None,
        since: float | None = None,
    ) -> list[AuditRecord]:
        """Calls that changed something, parallel commands among them, newest first (admin
        only); only `who`'s, only of `kind` (job.submit...), only since a Unix time."""
        params = {"offset": str(offset), "limit": str(limit)}
        params |= {k: str(v) for k, v in (("who", who), ("kind", kind), ("since", since)) if v is not None}
        return _audit_records().validate_python(self._call("GET", "/v1/audit", params=params))

    def refusals(self, offset: int = 0, limit: int = 100, *, since: float | None = None) -> list[AuditRecord]:
        """Calls refused before the caller was known, one record a minute per address, kind and
        status with its count, newest first (admin only); only since a Unix time."""
        params = {"offset": str(offset), "limit": str(limit)}
        params |= {} if since is None else {"since": str(since)}
        return _audit_records().validate_python(self._call("GET", "/v1/audit/refused", params=params))

    def audit_start(self, command: str, nodes: str) -> int:
        """Record a parallel command run over SSH (admin only); returns the record's id."""
        from shoal.shell.protocol import AuditRecord

        body = {"command": command, "nodes": nodes, "via": "ssh"}
        return AuditRecord.model_validate(self._call("POST", "/v1/audit", json=body)).id

    def audit_end(self, record_id: int, results: dict[str, str]) -> None:
        self._call("POST", f"/v1/audit/{record_id}/end", json={"results": results})

    def wait(
        self, job_id: int, poll: float = 0.2, timeout: float | None = None, limit: int = 1000
    ) -> JobView:
        """Block until the job has ended; returns its final view (with its first `limit` tasks)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            view = self.job(job_id, limit=limit)
            if view.state.value in _ENDED:
                return view
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} is still {view.state.value} after {timeout}s")
            time.sleep(poll)

    # --- plumbing -------------------------------------------------------------------------

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        response = self._calls.send(method, path, **kwargs)
        if response.is_error:
            raise api_error(response)
        return response

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        return self._request(method, path, **kwargs).json()


class _Chunks:
    """A file's bytes in chunks, read afresh at each iteration: a call redirected or repeated
    sends the whole file again."""

    def __init__(self, path: Path) -> None:
        self._path = path

    def __iter__(self) -> Iterator[bytes]:
        with open(self._path, "rb") as f:
            while chunk := f.read(_CHUNK):
                yield chunk


@functools.cache
def _audit_records() -> TypeAdapter[list[AuditRecord]]:
    from shoal.shell.protocol import AuditRecord

    return TypeAdapter(list[AuditRecord])


def _log_params(stream: str, offset: int, attempt: int | None) -> dict[str, str]:
    params = {"stream": stream, "offset": str(offset)}
    if attempt is not None:
        params["attempt"] = str(attempt)
    return params
