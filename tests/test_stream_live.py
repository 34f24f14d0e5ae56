"""The event stream on a live cluster: a subscriber that reconnects with its last index
misses no event and sees none twice; a user's stream carries no other user's jobs; an index
the master no longer holds is answered 410; one caller holds a few streams at most; a user
sees their own jobs removed; `shoal events -f` follows it."""

from __future__ import annotations

import contextlib
import json
import queue
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Iterator

import httpx
import pytest

from shoal.client import ApiError
from shoal.errors import ShoalError
from shoal.model import JobSpec, Role
from shoal.sse import FOLLOWING, StreamEvent
from shoal.testing.live import LiveCluster, live_cluster

WAIT = 30.0  # seconds a stream may take to bring what a test waits for


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveCluster]:
    with live_cluster(tmp_path_factory.mktemp("stream"), agents=2) as cluster:
        yield cluster


def _token(cluster: LiveCluster, name: str) -> str:
    with cluster.client() as client:
        return client.create_token(name, Role.USER).token


class Follower:
    """Reads a stream on a thread of its own, until it ends or its client is closed;
    `wait_for` waits until what it read satisfies a condition."""

    def __init__(self, cluster: LiveCluster, token: str | None = None, **options: object) -> None:
        self.events: list[StreamEvent] = []
        self.client = cluster.client(token)
        self._stream = self.client.stream(**options)  # type: ignore[arg-type]
        self._enough = threading.Event()
        self.error: ShoalError | None = None
        self._lock = threading.Lock()
        self._closed = False
        self._until = lambda events: False
        self.thread = threading.Thread(target=self._read, daemon=True)

    def start(self) -> Follower:
        self.thread.start()
        return self

    def _read(self) -> None:
        try:
            for event in self._stream:
                with self._lock:
                    if self._closed:
                        return
                    self.events.append(event)
                if self._until(self.events):
                    self._enough.set()
        except ShoalError as e:
            self.error = e  # the stream ended with it

    def wait_for(self, until: object) -> list[StreamEvent]:
        self._until = until  # type: ignore[assignment]
        self._enough.clear()
        if not self._until(self.events):
            assert self._enough.wait(WAIT), f"the stream did not bring it; it brought {self.events[-5:]}"
        return self.events

    def close(self) -> None:
        """Take no more events (the connection goes when the next one comes)."""
        with self._lock:
            self._closed = True
        self.client.close()


def _newest_index(cluster: LiveCluster) -> int:
    """The master's newest index, as a stream from now says first."""
    headers = {"Authorization": f"Bearer {cluster.admin_token}"}
    with httpx.stream("GET", f"{cluster.url}/v1/stream", headers=headers, timeout=WAIT) as response:
        return int(next(response.iter_lines()).removeprefix(FOLLOWING))


def _finished(job_id: int, tasks: int = 1) -> object:
    def enough(events: list[StreamEvent]) -> bool:
        done = {
            e.record["id"]
            for e in events
            if e.topic == "tasks" and e.job == job_id and e.record["state"] == "finished"
        }
        return len(done) >= tasks

    return enough


def test_a_user_stream_carries_only_their_own_jobs(cluster: LiveCluster) -> None:
    alice, bob = _token(cluster, "alice"), _token(cluster, "bob")
    follower = Follower(cluster, alice).start()
    with cluster.client(bob) as b, cluster.client(alice) as a:
        theirs = b.submit(JobSpec(name="bobs", command=["true"]))
        mine = a.submit(JobSpec(name="alices", command=["true"]))
    events = follower.wait_for(_finished(mine))
    follower.close()
    jobs = {e.job for e in events if e.job is not None}
    assert mine in jobs and theirs not in jobs
    assert {e.topic for e in events} <= {"jobs", "tasks", "nodes", "services", "migrations"}


def test_a_subscriber_that_reconnects_from_its_last_index_misses_none_and_sees_none_twice(
    cluster: LiveCluster,
) -> None:
    since = _newest_index(cluster)  # both from one index: neither may see what the other did not
    whole = Follower(cluster, index=since).start()  # stays connected throughout: the reference
    first = Follower(cluster, topics=["jobs", "tasks"], index=since).start()
    with cluster.client() as client:
        one = client.submit(JobSpec(name="one", command=["true"], count=3))
        first.wait_for(_finished(one, 3))
        first.close()  # gone: what follows happens while it is away
        two = client.submit(JobSpec(name="two", command=["true"], count=3))
        again = Follower(cluster, topics=["jobs", "tasks"], index=first.events[-1].index).start()
        again.wait_for(_finished(two, 3))
    end = again.events[-1].index
    whole.wait_for(lambda events: events[-1].index >= end)
    whole.close()
    again.close()
    had = [e.index for e in first.events + again.events]
    reference = [
        e.index
        for e in whole.events
        if e.topic in ("jobs", "tasks") and first.events[0].index <= e.index <= end
    ]
    assert had == reference  # none missed, none twice, in order


def test_an_index_no_longer_held_is_answered_410_and_a_bad_topic_422(cluster: LiveCluster) -> None:
    with cluster.client() as client, pytest.raises(ApiError) as gone:
        next(iter(client.stream(index=5)))
    assert gone.value.status == 410 and "list afresh" in str(gone.value)
    answer = httpx.get(
        f"{cluster.url}/v1/stream",
        params={"topic": "weather"},
        headers={"Authorization": f"Bearer {cluster.admin_token}"},
    )
    assert answer.status_code == 422 and "no topic weather" in answer.text


def test_shoal_events_follow_prints_each_change_as_a_json_line(cluster: LiveCluster) -> None:
    follow = subprocess.Popen(
        [sys.executable, "-m", "shoal", "events", "-f", "--topic", "tasks", "--json"],
        env=cluster.cli_env(),
        stdout=subprocess.PIPE,
        text=True,
    )
    lines: queue.Queue[dict] = queue.Queue()
    assert follow.stdout is not None
    reader = threading.Thread(target=lambda: [lines.put(json.loads(x)) for x in follow.stdout], daemon=True)
    reader.start()
    seen: list[dict] = []
    submitted: set[int] = set()
    deadline = time.monotonic() + WAIT
    try:
        with cluster.client() as client:
            # Until the command has subscribed, a job may come and go unseen: submit again.
            while not any(e["job"] in submitted and e["record"]["state"] == "finished" for e in seen):
                assert time.monotonic() < deadline, f"shoal events -f printed {seen}"
                submitted.add(client.submit(JobSpec(name="cli", command=["true"])))
                with contextlib.suppress(queue.Empty):
                    while True:
                        seen.append(lines.get(timeout=2))
        assert seen and all(e["topic"] == "tasks" for e in seen)
    finally:
        follow.kill()
        follow.wait()


def test_a_stream_ends_once_its_token_is_revoked(cluster: LiveCluster) -> None:
    with cluster.client() as admin:
        made = admin.create_token("carol", Role.USER)
        follower = Follower(cluster, made.token).start()
        with cluster.client(made.token) as carol:
            job = carol.submit(JobSpec(name="carols", command=["true"]))
        follower.wait_for(_finished(job))
        admin.revoke_token(made.id)
        admin.submit(JobSpec(name="after", command=["true"]))  # the stream wakes: not carol's
    follower.thread.join(WAIT)
    assert not follower.thread.is_alive(), "the stream went on after its token was revoked"
    assert isinstance(follower.error, ApiError) and follower.error.status == 401
    assert all(e.job in (None, job) for e in follower.events)


def test_the_audit_topic_is_an_admins_alone(cluster: LiveCluster) -> None:
    with cluster.client() as admin:
        reader = admin.create_token("auditor", Role.READER).token
    answer = httpx.get(
        f"{cluster.url}/v1/stream",
        params={"topic": "audit"},
        headers={"Authorization": f"Bearer {reader}"},
    )
    assert answer.status_code == 403 and "admin" in answer.text
    follower = Follower(cluster, reader).start()
    with cluster.client() as admin:
        job = admin.submit(JobSpec(name="audited", command=["true"]))  # an audit record too
    events = follower.wait_for(_finished(job))
    follower.close()
    assert "audit" not in {e.topic for e in events}


@pytest.fixture(scope="module")
def lean(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveCluster]:
    """No agents; two streams a caller; ended jobs forgotten at once."""
    settings = {"streams_per_caller": "2", "job_retention": "0"}
    with live_cluster(tmp_path_factory.mktemp("lean"), agents=0, master_settings=settings) as cluster:
        yield cluster


def test_one_caller_holds_streams_per_caller_at_most_and_others_are_not_held_back(lean: LiveCluster) -> None:
    cluster = lean
    with contextlib.ExitStack() as streams:
        dave, erin = _token(cluster, "dave"), _token(cluster, "erin")

        def follow(token: str) -> httpx.Response:
            http = streams.enter_context(httpx.Client(timeout=WAIT))
            headers = {"Authorization": f"Bearer {token}"}
            return streams.enter_context(http.stream("GET", f"{cluster.url}/v1/stream", headers=headers))

        first, second = follow(dave), follow(dave)
        assert first.status_code == second.status_code == 200
        with cluster.client(dave) as client, pytest.raises(ApiError) as refused:
            next(iter(client.stream()))
        assert refused.value.status == 429
        assert "dave holds 2 streams" in str(refused.value) and "streams_per_caller" in str(refused.value)
        assert follow(erin).status_code == 200  # another caller's count is its own
        first.close()  # its seat is given back once the master sees the connection go
        deadline = time.monotonic() + WAIT
        while (again := follow(dave)).status_code == 429:
            assert time.monotonic() < deadline, "a stream ended and its caller's count stayed"
            time.sleep(0.1)
        assert again.status_code == 200


def test_a_user_sees_their_own_jobs_removed_and_no_one_elses(lean: LiveCluster) -> None:
    alice, bob = _token(lean, "alice"), _token(lean, "bob")
    follower = Follower(lean, alice, topics=["jobs"]).start()
    with lean.client(alice) as a, lean.client(bob) as b:
        theirs = b.submit(JobSpec(name="bobs", command=["true"]))
        b.kill(theirs)  # ended (it never ran), and forgotten: the master keeps no ended job
        mine = a.submit(JobSpec(name="alices", command=["true"]))
        a.kill(mine)  # ended after bob's: removed with it or after
    events = follower.wait_for(lambda events: any(e.type == "removed" and e.job == mine for e in events))
    follower.close()
    assert theirs not in {e.job for e in events}


def _frames(body: bytes) -> list[bytes]:
    return [f for f in body.split(b"\n\n") if f.startswith(b"id: ")]


def _read_whole(body: Iterator[bytes], into: list[bytes]) -> threading.Thread:
    """Reads what is left of `body` on a thread, until it ends."""

    def read() -> None:
        with contextlib.suppress(httpx.HTTPError):
            into.extend(body)

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    return thread


def test_a_stream_is_sent_deflated_to_whom_takes_it_and_ends_as_a_whole_zlib_stream(
    lean: LiveCluster,
) -> None:
    with lean.client() as admin:
        made = admin.create_token("frank", Role.USER)
    url = f"{lean.url}/v1/stream"
    with httpx.Client(timeout=WAIT) as http:

        def follow(encoding: str, **params: int) -> httpx.Response:
            headers = {"Authorization": f"Bearer {made.token}", "Accept-Encoding": encoding}
            return http.send(http.build_request("GET", url, headers=headers, params=params), stream=True)

        plain = follow("identity")
        plain_raw = plain.iter_raw()  # as it came, not decoded
        head = next(plain_raw)  # ": following from <index>"
        since = int(head.split()[-1])
        squeezed = follow("gzip;q=0.5, deflate", index=since)
        assert "content-encoding" not in plain.headers and plain.headers["vary"] == "Accept-Encoding"
        assert squeezed.headers["content-encoding"] == "deflate"
        plain_body, squeezed_body = [head], []
        readers = [_read_whole(plain_raw, plain_body), _read_whole(squeezed.iter_raw(), squeezed_body)]
        with lean.client(made.token) as frank:
            job = frank.submit(JobSpec(name="franks", command=["true"], count=3))
            frank.kill(job)
        record = f'"record":{{"id":{job},'.encode()

        def killed(body: bytes) -> bool:  # the job's last change is in
            return any(record in f and b'"killed":true' in f for f in _frames(body))

        deadline = time.monotonic() + WAIT
        while not (
            killed(b"".join(plain_body)) and killed(zlib.decompressobj().decompress(b"".join(squeezed_body)))
        ):
            assert time.monotonic() < deadline, "the streams did not bring the job's kill"
            time.sleep(0.05)
        with lean.client() as admin:
            admin.revoke_token(made.id)  # both streams end, as a whole
            admin.submit(JobSpec(name="after", command=["true"]))  # the streams wake: not frank's
        for reader in readers:
            reader.join(WAIT)
            assert not reader.is_alive(), "the stream went on after its token was revoked"
        plain.close()
        squeezed.close()
    inflater = zlib.decompressobj()
    inflated = inflater.decompress(b"".join(squeezed_body))
    assert inflater.eof and not inflater.unused_data, "the deflated stream did not end as a whole"
    seen = _frames(inflated)
    assert seen == _frames(b"".join(plain_body))
    assert sum(f'"job":{job}'.encode() in f for f in seen) >= 1 + 3 + 1  # made, its tasks killed, killed
