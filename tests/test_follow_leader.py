"""Clients, agents and frameworks that follow the leader, against a real master.

A stand-in follower on loopback speaks the followers' protocol (`shoal.masters`): a 307 to
the real master, a 503 while it "holds an election", a connection dropped once a call is
read, a WebSocket closed with 4307 naming the real master. Everything past it is real: the
master and its agent are processes, and the SDK, drivers and agents are shoal's own.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from websockets.sync.server import ServerConnection, serve

from shoal.agent.server import stop_runs
from shoal.client import ApiError, Client, Unreachable
from shoal.framework import AsyncDriver, Driver, OfferInfo, Scheduler, TaskLaunch, TaskStatus
from shoal.masters import LEADER_HEADER, MASTERS_PATH, NOT_LEADER_CLOSE
from shoal.model import JobSpec, JobState, NodeStatus, Role, TaskState
from shoal.testing.live import LiveCluster, free_port, live_cluster, wait_for

pytestmark = pytest.mark.timeout(120)

Answer = Callable[[BaseHTTPRequestHandler], None]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveCluster]:
    with live_cluster(tmp_path_factory.mktemp("cluster"), agents=1) as c:
        yield c


class Follower:
    """A stand-in follower: an HTTP server in a thread that answers each call as `answer`
    says, and keeps each call's method, path and Authorization header."""

    def __init__(self, answer: Answer) -> None:
        calls: list[tuple[str, str, str | None]] = []

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def answer(self) -> None:
                calls.append((self.command, self.path, self.headers.get("Authorization")))
                answer(self)

            do_GET = do_HEAD = do_POST = do_PUT = answer

            def log_message(self, *_: object) -> None:
                """Quiet: the test says what went wrong."""

        self.calls = calls
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True).start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@contextlib.contextmanager
def follower(answer: Answer) -> Iterator[Follower]:
    stand_in = Follower(answer)
    try:
        yield stand_in
    finally:
        stand_in.close()


def read_body(call: BaseHTTPRequestHandler) -> None:
    """Read the call's body, so the connection may carry the next one."""
    if call.headers.get("Transfer-Encoding") == "chunked":
        call.close_connection = True  # not worth parsing: the connection goes with the answer
    else:
        call.rfile.read(int(call.headers.get("Content-Length", 0)))


def reply(call: BaseHTTPRequestHandler, status: int, headers: dict[str, str], body: bytes = b"") -> None:
    read_body(call)
    call.send_response(status)
    for name, value in {**headers, "Content-Length": str(len(body))}.items():
        call.send_header(name, value)
    call.end_headers()
    call.wfile.write(body)


def redirect_to(leader: str) -> Answer:
    return lambda call: reply(call, 307, {"Location": leader + call.path, LEADER_HEADER: leader})


def electing(calls: int, leader: str) -> Answer:
    """503, no leader known, for the first `calls` calls; then a redirect to `leader`."""
    seen = iter(range(10**6))

    def answer(call: BaseHTTPRequestHandler) -> None:
        if next(seen) < calls:
            body = b'{"error": "no master leads yet", "fields": []}'
            reply(
                call, 503, {"Retry-After": "1", LEADER_HEADER: "", "Content-Type": "application/json"}, body
            )
        else:
            redirect_to(leader)(call)

    return answer


def drop(call: BaseHTTPRequestHandler) -> None:
    """Read the call whole, then close the connection without an answer: a master that died
    with the call in hand."""
    read_body(call)
    call.close_connection = True


def dead_url() -> str:
    return f"http://127.0.0.1:{free_port()}"  # nothing listens there


def hello(name: str) -> JobSpec:
    return JobSpec.model_validate(
        {"name": name, "command": "echo hello", "resources": {"cpus": 0.1, "mem": 16}}
    )


# --- the client -------------------------------------------------------------------------------


def test_a_client_given_a_follower_first_runs_a_job_on_the_leader(cluster: LiveCluster) -> None:
    with (
        follower(redirect_to(cluster.url)) as stand_in,
        Client(f"{stand_in.url},{cluster.url}", cluster.admin_token) as client,
    ):
        job = client.submit(hello("through-a-follower"))
        assert client.wait(job, timeout=30).state is JobState.COMPLETE
        assert client.logs(f"{job}.0") == b"hello\n"
        assert client.url == cluster.url  # the leader is known: no more detours
        assert stand_in.calls == [("POST", "/v1/jobs", f"Bearer {cluster.admin_token}")]


def test_the_token_reaches_the_leader_after_a_redirect(cluster: LiveCluster) -> None:
    with cluster.client() as admin:
        token = admin.create_token("erin", Role.USER).token
    with follower(redirect_to(cluster.url)) as stand_in, Client(stand_in.url, token) as erin:
        assert erin.whoami().name == "erin"  # the leader saw erin's token, not none
        assert erin.url == cluster.url
    with follower(redirect_to(cluster.url)) as stand_in, Client(stand_in.url, "not-a-token") as nobody:
        with pytest.raises(ApiError) as refused:
            nobody.jobs()
        assert refused.value.status == 401


def test_a_master_that_is_down_is_passed_over(cluster: LiveCluster) -> None:
    began = time.monotonic()
    with Client(f"{dead_url()},{cluster.url}", cluster.admin_token) as client:
        assert client.whoami().name == "admin"
        assert client.url == cluster.url
    assert time.monotonic() - began < 2.0


def test_no_master_up_is_unreachable_naming_them_after_the_failover_time() -> None:
    first, second = dead_url(), dead_url()
    began = time.monotonic()
    with Client(f"{first},{second}", "token", failover=1.0) as client, pytest.raises(Unreachable) as e:
        client.jobs()
    assert 1.0 <= time.monotonic() - began < 3.0
    assert first in str(e.value) and second in str(e.value) and "within 1s" in str(e.value)
    began = time.monotonic()
    with Client(first, "token") as alone, pytest.raises(Unreachable, match="no master answers at"):
        alone.jobs()  # one master, and it is down: nowhere else to go, no waiting
    assert time.monotonic() - began < 1.0


def test_a_follower_in_an_election_is_waited_out_and_a_submission_made_once(cluster: LiveCluster) -> None:
    with follower(electing(3, cluster.url)) as stand_in, Client(stand_in.url, cluster.admin_token) as client:
        job = client.submit(hello("after-an-election"))
        assert [c[:2] for c in stand_in.calls] == [("POST", "/v1/jobs")] * 4
        assert [j.id for j in client.jobs() if j.name == "after-an-election"] == [job]


def test_a_write_whose_connection_drops_once_sent_is_not_repeated_but_a_read_is(cluster: LiveCluster) -> None:
    with follower(drop) as stand_in, Client(f"{stand_in.url},{cluster.url}", cluster.admin_token) as client:
        with pytest.raises(Unreachable, match="may or may not have been carried out"):
            client.submit(hello("sent-once"))
        names = [j.name for j in client.jobs()]  # repeated at the leader
        assert "sent-once" not in names
        assert [c[:2] for c in stand_in.calls] == [("POST", "/v1/jobs"), ("GET", "/v1/jobs")]


def test_a_leader_not_given_is_asked_for_every_master_once() -> None:
    far = dead_url()

    def leading(call: BaseHTTPRequestHandler) -> None:
        """A leader with no jobs, among three masters."""
        masters = [(given.url, False), (leader.url, True), (far, False)]
        listing = [{"name": f"m{i}", "url": url, "leader": leads} for i, (url, leads) in enumerate(masters)]
        body = json.dumps(listing if call.path == MASTERS_PATH else []).encode()
        reply(call, 200, {"Content-Type": "application/json"}, body)

    with follower(leading) as leader, follower(redirect_to(leader.url)) as given:
        with Client(given.url, "token") as client:
            assert client.jobs() == [] and client.jobs() == []
            assert client.known.urls == [given.url, leader.url, far]
        assert [c[:2] for c in leader.calls] == [
            ("GET", "/v1/jobs"),
            ("GET", MASTERS_PATH),
            ("GET", "/v1/jobs"),
        ]


def test_blobs_go_up_and_come_down_through_a_follower(cluster: LiveCluster, tmp_path: Path) -> None:
    source = tmp_path / "data"
    source.write_bytes(bytes(range(256)) * 8192)  # 2 MiB: more than one chunk
    with follower(redirect_to(cluster.url)) as stand_in, Client(stand_in.url, cluster.admin_token) as client:
        blob = client.upload(source)
        client.download(blob, tmp_path / "back")
    assert blob == hashlib.sha256(source.read_bytes()).hexdigest()
    assert (tmp_path / "back").read_bytes() == source.read_bytes()
    assert stand_in.calls[0][:2] == ("HEAD", f"/v1/blobs/{blob}")


def test_a_watch_follows_the_client_to_the_leader(cluster: LiveCluster) -> None:
    with (
        follower(electing(1, cluster.url)) as stand_in,
        Client(f"{dead_url()},{stand_in.url}", cluster.admin_token) as client,
    ):
        with client.watch("nobody-serves-this", wait=1) as watch:
            assert next(watch) == []
        assert client.url == cluster.url


# --- frameworks ------------------------------------------------------------------------------


class OneTask(Scheduler):
    """Launches one short task on the first offer, and keeps the states it is told of."""

    def __init__(self) -> None:
        self.launched = False
        self.states: list[TaskState] = []

    def resource_offers(self, driver: Driver, offers: list[OfferInfo]) -> None:
        if not self.launched:
            self.launched = True
            driver.launch([offers[0].id], [TaskLaunch(name="via", command="true", resources={"mem": 16})])
        driver.decline([o.id for o in offers[1:]])

    def status_update(self, driver: Driver, status: TaskStatus) -> None:
        self.states.append(status.state)


def test_a_driver_subscribes_and_launches_through_a_follower(cluster: LiveCluster) -> None:
    scheduler = OneTask()
    with follower(redirect_to(cluster.url)) as stand_in:
        url = f"{dead_url()},{stand_in.url}"
        driver = Driver(scheduler, "followed", url=url, token=cluster.admin_token).start()
        wait_for(lambda: TaskState.FINISHED in scheduler.states, timeout=30, what="the task finished")
        assert driver.url == cluster.url
        driver.stop()
        driver.join(10)
    assert stand_in.calls[0][:2] == ("POST", "/v1/frameworks/subscribe")


def test_an_async_driver_subscribes_and_calls_through_a_follower_in_an_election(cluster: LiveCluster) -> None:
    class Subscribes(Scheduler):
        """Once subscribed, a call (revive), then the end (teardown): both at the leader."""

        def __init__(self) -> None:
            self.framework_id: str | None = None

        async def registered(self, driver: AsyncDriver, framework_id: str) -> None:
            self.framework_id = framework_id
            await driver.revive()
            await driver.stop()

    scheduler = Subscribes()
    with follower(electing(1, cluster.url)) as stand_in:
        runner = AsyncDriver(scheduler, "followed-async", url=stand_in.url, token=cluster.admin_token)
        asyncio.run(asyncio.wait_for(runner.run(), 30))
    assert scheduler.framework_id is not None and runner.url == cluster.url
    assert [c[:2] for c in stand_in.calls] == [("POST", "/v1/frameworks/subscribe")] * 2
    with cluster.client() as client:
        assert "followed-async" not in {f.name for f in client.frameworks()}  # torn down at the leader


# --- the agent (last: its agents join the cluster the tests share, and leave it lost) ----------


class ClosingFollower:
    """A stand-in follower's agent endpoint: each WebSocket is accepted, then closed with
    4307 and `leader` as the reason."""

    def __init__(self, leader: str) -> None:
        self.dials = 0
        self._leader = leader
        self._server = serve(self._refuse, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self._server.socket.getsockname()[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def _refuse(self, ws: ServerConnection) -> None:
        self.dials += 1
        ws.close(NOT_LEADER_CLOSE, self._leader)

    def close(self) -> None:
        self._server.shutdown()


@contextlib.contextmanager
def agent(cluster: LiveCluster, root: Path, name: str, masters: str) -> Iterator[subprocess.Popen[bytes]]:
    state = root / name
    with open(root / f"{name}.log", "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "shoal", "agent", "--master", masters, "--name", name]
            + ["--state-dir", str(state), "--cpus", "1", "--mem", "256", "--heartbeat-interval", "0.3"]
            + ["--utilization", "tasks"],
            env=cluster.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait(10)
        stop_runs(state)


def test_an_agent_joins_the_leader_a_follower_names_or_passes_one_that_names_none(
    cluster: LiveCluster, tmp_path: Path
) -> None:
    naming, knowing_none = ClosingFollower(cluster.url), ClosingFollower("")
    try:
        with (
            agent(cluster, tmp_path, "redirected", naming.url),
            agent(cluster, tmp_path, "passed-on", f"{knowing_none.url},{cluster.url}"),
            cluster.client() as client,
        ):

            def joined() -> bool:
                up = {n.name for n in client.nodes() if n.status is NodeStatus.UP and n.connected}
                return {"redirected", "passed-on"} <= up

            wait_for(joined, timeout=30, what="both agents registered with the leader")
            assert naming.dials >= 1 and knowing_none.dials >= 1
    finally:
        naming.close()
        knowing_none.close()
