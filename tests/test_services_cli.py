"""The service registry as people and programs meet it: `shoal services`, `shoal service`
and the SDK's `resolve` and `watch`, against a real master and real agents."""

from __future__ import annotations

import json
import os
import queue
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from shoal.client import ApiError, Client, Watch
from shoal.model import JobSpec, Role
from shoal.services import Endpoint
from shoal.testing.live import LiveCluster, live_cluster, wait_for

pytestmark = pytest.mark.timeout(90)

WEB = JobSpec(
    name="web",
    command="exec python3 -m http.server --bind 127.0.0.1 $SHOAL_PORT_HTTP",
    count=2,
    resources={"cpus": 0.1, "mem": 64},
    ports=["http"],
    services=[{"name": "web", "port": "http", "tags": ["v1"], "check": {"http": "http/", "interval": 0.2}}],
)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveCluster]:
    settings = {"shutdown_delay": "0.2", "tick": "0.2"}
    with live_cluster(tmp_path_factory.mktemp("services"), agents=2, master_settings=settings) as c:
        yield c


@pytest.fixture(scope="module")
def client(cluster: LiveCluster) -> Iterator[Client]:
    with cluster.client() as c:
        yield c


class Watcher:
    """A watch read on a thread of its own: each list it gives lands in `lists`."""

    def __init__(self, watch: Watch) -> None:
        self.watch = watch
        self.lists: queue.Queue[list[Endpoint]] = queue.Queue()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        for endpoints in self.watch:
            self.lists.put(endpoints)

    def next(self, timeout: float = 10.0) -> list[Endpoint]:
        return self.lists.get(timeout=timeout)

    def close(self) -> float:
        """Close the watch; how long the reading thread took to end."""
        began = time.monotonic()
        self.watch.close()
        self.thread.join(5)
        assert not self.thread.is_alive()
        return time.monotonic() - began


def kill_task(task_id: str) -> None:
    """SIGKILL the process group of a task's process, as a crash would."""
    for proc in psutil.process_iter(["environ"]):
        try:
            if (proc.info["environ"] or {}).get("SHOAL_TASK_ID") == task_id:
                os.killpg(os.getpgid(proc.pid), signal.SIGKILL)
                return
        except (psutil.Error, ProcessLookupError):
            continue
    raise AssertionError(f"no process of task {task_id}")


def cli_json(cluster: LiveCluster, *args: str) -> object:
    result = cluster.cli(*args, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_a_job_service_is_listed_resolved_and_watched_as_a_replica_dies(
    cluster: LiveCluster, client: Client
) -> None:
    job = client.submit(WEB)
    wait_for(lambda: len(client.service("web")[0]) == 2, timeout=20, what="two replicas passing")

    summaries = cli_json(cluster, "services")
    assert {"name": "web", "tags": ["v1"], "passing": 2, "warning": 0, "critical": 0} in summaries
    table = cluster.cli("services")
    assert table.returncode == 0 and "web" in table.stdout and "shoal-agent" in table.stdout

    endpoints = cli_json(cluster, "service", "web")
    assert sorted(e["task_id"] for e in endpoints) == [f"{job}.0", f"{job}.1"]
    assert {e["status"] for e in endpoints} == {"passing"} and all("200" in e["output"] for e in endpoints)
    shown = cluster.cli("service", "web")
    assert shown.returncode == 0 and all(f"{e['address']}:{e['port']}" in shown.stdout for e in endpoints)
    assert cli_json(cluster, "service", "web", "--tag", "v2") == []

    resolved = client.resolve("web")
    assert sorted(resolved) == sorted((e["address"], e["port"]) for e in endpoints)
    for address, port in resolved:
        assert httpx.get(f"http://{address}:{port}/").status_code == 200

    watcher = Watcher(client.watch("web", wait=5))
    assert sorted(e.task_id for e in watcher.next()) == [f"{job}.0", f"{job}.1"]
    kill_task(f"{job}.0")
    assert [e.task_id for e in watcher.next()] == [f"{job}.1"]
    assert watcher.close() < 1.0  # the query under way is cut off, not waited out
    client.kill(job)


def test_register_check_and_deregister_through_the_cli(cluster: LiveCluster, tmp_path: Path) -> None:
    made = cluster.cli(
        "service", "register", "--id", "db-1", "--name", "db", "--address", "10.0.0.5", "--port", "5432",
        "--tag", "primary", "--meta", "zone=z1", "--ttl", "30",
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    assert "shoal service pass db-1" in made.stdout
    [db] = cli_json(cluster, "service", "db")
    assert (db["id"], db["kind"], db["address"], db["port"]) == ("db-1", "external", "10.0.0.5", 5432)
    assert (db["tags"], db["meta"]) == (["primary"], {"zone": "z1"})

    warned = cluster.cli("service", "warn", "db-1", "--note", "replication lag")
    assert warned.returncode == 0, warned.stderr
    assert cli_json(cluster, "service", "db") == []  # only passing ones, by default
    [db] = cli_json(cluster, "service", "db", "--all")
    assert (db["status"], db["output"]) == ("warning", "replication lag")
    assert "replication lag" in cluster.cli("service", "--all", "db").stdout
    assert cluster.cli("service", "pass", "db-1", "--note", "caught up").returncode == 0
    [db] = cli_json(cluster, "service", "db")
    assert (db["status"], db["output"]) == ("passing", "caught up")

    spec = tmp_path / "cache.toml"
    spec.write_text('id = "cache-1"\nname = "cache"\naddress = "10.0.0.6"\nport = 6379\ntags = ["lru"]\n')
    from_file = cluster.cli("service", "register", str(spec), "--port", "6380")
    assert from_file.returncode == 0, from_file.stderr
    [cache] = cli_json(cluster, "service", "cache", "--tag", "lru")
    assert (cache["id"], cache["port"]) == ("cache-1", 6380)

    for rid in ("db-1", "cache-1"):
        gone = cluster.cli("service", "deregister", rid)
        assert gone.returncode == 0, gone.stderr
    assert cli_json(cluster, "service", "db", "--all") == []
    unknown = cluster.cli("service", "pass", "db-1")
    assert unknown.returncode == 2
    assert "no registration 'db-1'" in unknown.stderr and "shoal services" in unknown.stderr
    absent = cluster.cli("service", "db")
    assert absent.returncode == 0 and "no passing endpoints" in absent.stdout


def test_an_external_registration_lapses_after_its_ttl_and_the_watcher_sees_it_go(client: Client) -> None:
    watcher = Watcher(client.watch("queue", wait=10))
    assert watcher.next() == []  # a service never seen: an empty list, then a blocking wait
    registered = time.monotonic()
    client.register({"id": "mq-1", "name": "queue", "address": "10.0.0.7", "port": 5672, "ttl": 1})
    [mq] = watcher.next()
    assert (mq.id, mq.status.value) == ("mq-1", "passing")
    assert watcher.next() == []
    assert 1.0 <= time.monotonic() - registered < 4.0
    watcher.close()
    with pytest.raises(ApiError) as lapsed:
        client.check("mq-1")
    assert lapsed.value.status == 404


def test_a_bad_service_name_is_refused_naming_the_field(cluster: LiveCluster, client: Client) -> None:
    bad = {"id": "x-1", "name": "Bad_Name", "address": "10.0.0.8", "port": 80}
    with pytest.raises(ApiError) as refused:
        client.register(bad)
    assert refused.value.status == 422 and [f.field for f in refused.value.fields] == ["name"]
    registered = cluster.cli(
        "service", "register", "--id", "x-1", "--name", "Bad_Name", "--address", "10.0.0.8", "--port", "80"
    )
    assert registered.returncode == 2
    assert "name: 'Bad_Name' is not a DNS label" in " ".join(registered.stderr.split())
    shown = cluster.cli("service", "Bad_Name")
    assert shown.returncode == 2 and "name: 'Bad_Name' is not a DNS label" in " ".join(shown.stderr.split())


def test_a_reader_lists_services_but_may_not_register(cluster: LiveCluster, client: Client) -> None:
    reader = client.create_token("rita", Role.READER).token
    listed = cluster.cli("services", "--json", token=reader)
    assert listed.returncode == 0 and "shoal-agent" in listed.stdout
    refused = cluster.cli(
        "service", "register", "--id", "r-1", "--name", "db", "--address", "10.0.0.9", "--port", "1",
        token=reader,
    )  # fmt: skip
    assert refused.returncode == 2 and "read-only" in refused.stderr and "user or admin" in refused.stderr
    with Client(cluster.url, reader) as as_reader, pytest.raises(ApiError) as forbidden:
        as_reader.register({"id": "r-1", "name": "db", "address": "10.0.0.9", "port": 1})
    assert forbidden.value.status == 403
