"""The registry on a real master and agents: checks decide what answers, with flap damping;
a killed job leaves before its processes get SIGTERM; a killed agent's endpoints go within
the detection window; blocking queries answer at the change; a restart keeps it all."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from shoal.model import JobSpec, Role
from shoal.services import Registration
from shoal.testing.live import LiveCluster, live_cluster, wait_for

pytestmark = pytest.mark.timeout(120)

# An HTTP service: 503 while the file named by its first argument exists; writes when it got
# SIGTERM to the file named by its second.
SERVER = """
import http.server, os, signal, sys, time
sick, terms = sys.argv[1], sys.argv[2]
class Answer(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(503 if os.path.exists(sick) else 200)
        self.send_header("content-length", "2")
        self.end_headers()
        self.wfile.write(b"ok")
    def log_message(self, *args):
        pass
def stop(*_):
    with open(terms, "a") as f:
        f.write(f"{time.time()}\\n")
    os._exit(0)
signal.signal(signal.SIGTERM, stop)
http.server.ThreadingHTTPServer(("127.0.0.1", int(os.environ["SHOAL_PORT_HTTP"])), Answer).serve_forever()
"""


def web_job(tmp_path: Path, count: int = 1, **fields: object) -> JobSpec:
    script = tmp_path / "server.py"
    script.write_text(SERVER)
    check = {"http": "http/", "interval": 0.2, **fields.pop("check", {})}  # type: ignore[dict-item]
    return JobSpec.model_validate(
        {
            "name": "web",
            "command": [sys.executable, str(script), str(tmp_path / "sick-{index}"), str(tmp_path / "terms")],
            "count": count,
            "ports": ["http"],
            "resources": {"cpus": 0.1, "mem": 64},
            "services": [{"name": "web", "port": "http", "check": check}],
            **fields,
        }
    )


def registry(cluster: LiveCluster) -> httpx.Client:
    return httpx.Client(
        base_url=cluster.url, headers={"Authorization": f"Bearer {cluster.admin_token}"}, timeout=30
    )


def passing(http: httpx.Client, service: str = "web") -> list[dict]:
    return http.get(f"/v1/services/{service}").json()


def test_a_failing_check_takes_an_endpoint_out_and_a_passing_one_brings_it_back(tmp_path: Path) -> None:
    spec = web_job(tmp_path, check={"failures_before_critical": 3, "successes_before_passing": 2})
    with live_cluster(tmp_path, agents=1) as cluster, cluster.client() as client, registry(cluster) as http:
        client.submit(spec)
        [endpoint] = wait_for(lambda: passing(http), what="the endpoint passing")
        sick = tmp_path / "sick-0"
        sick.touch()  # a failed check or two (of three needed) is a flap, not a verdict
        flapping = []
        for _ in range(4):  # about 0.3 s: a check or two, every 0.2 s
            time.sleep(0.08)
            flapping.append(passing(http))
        sick.unlink()
        time.sleep(1.0)
        # It never left, and its verdict never changed (a change would be a new `since`).
        assert all(now == [endpoint] for now in flapping)
        assert passing(http) == [endpoint] and "200" in endpoint["output"]
        sick.touch()
        wait_for(lambda: passing(http) == [], what="the endpoint out")
        [endpoint] = http.get("/v1/services/web?all").json()
        assert endpoint["status"] == "critical" and "503" in endpoint["output"]
        sick.unlink()
        wait_for(lambda: len(passing(http)) == 1, what="the endpoint back")


def test_a_killed_job_leaves_the_registry_before_its_processes_get_sigterm(tmp_path: Path) -> None:
    spec = web_job(tmp_path, count=2, shutdown_delay=1.0)
    with live_cluster(tmp_path, agents=2) as cluster, cluster.client() as client, registry(cluster) as http:
        job = client.submit(spec)
        wait_for(lambda: len(passing(http)) == 2, what="two endpoints passing")
        index = int(http.get("/v1/services/web").headers["X-Shoal-Index"])
        answers: list[tuple[float, list[dict]]] = []

        def watch() -> None:
            response = http.get(f"/v1/services/web?index={index}&wait=20s")
            answers.append((time.time(), response.json()))

        watcher = threading.Thread(target=watch)
        watcher.start()
        time.sleep(0.2)
        client.kill(job)
        watcher.join()
        [(gone, endpoints)] = answers
        assert endpoints == []  # both went in the one change that woke the watcher
        terms = tmp_path / "terms"
        wait_for(lambda: terms.exists() and len(terms.read_text().split()) == 2, what="both tasks signalled")
        signalled = [float(t) for t in terms.read_text().split()]
        # The registry let go of them first, and SIGTERM waited out the delay after that.
        assert min(signalled) - gone > 0.5, (gone, signalled)


def test_a_killed_agent_takes_its_endpoints_within_the_detection_window(tmp_path: Path) -> None:
    with (
        live_cluster(tmp_path, agents=2, heartbeat_timeout=2.0, heartbeat_interval=0.3) as cluster,
        cluster.client() as client,
        registry(cluster) as http,
    ):
        client.submit(web_job(tmp_path, count=2, max_per_node=1))
        wait_for(lambda: len(passing(http)) == 2, what="an endpoint on each node")
        doomed = next(e["node"] for e in passing(http))
        killed = time.time()
        cluster.kill_agent(doomed)
        wait_for(
            lambda: all(e["node"] != doomed for e in passing(http)), timeout=10, what="its endpoint gone"
        )
        assert time.time() - killed < 2.0 + 1.5  # the heartbeat timeout, a tick, and polling
        agents = {e["node"]: e["status"] for e in http.get("/v1/services/shoal-agent?all").json()}
        assert agents[doomed] == "critical"


def test_a_blocking_query_answers_at_the_change_and_not_before(tmp_path: Path) -> None:
    with live_cluster(tmp_path, agents=1) as cluster, registry(cluster) as http:
        db = Registration(id="db1", name="db", address="127.0.0.2", port=5432)
        index = http.put("/v1/services/register", json=db.model_dump()).json()["index"]
        answered: list[tuple[float, list[dict]]] = []

        def block() -> None:
            response = http.get(f"/v1/services/db?index={index}&wait=20s&all")
            answered.append((time.time(), response.json()))

        watcher = threading.Thread(target=block)
        watcher.start()
        time.sleep(1.0)
        other = Registration(id="cache1", name="cache", address="127.0.0.3", port=6379)
        http.put("/v1/services/register", json=other.model_dump()).raise_for_status()
        time.sleep(0.5)
        assert answered == []  # another service's change wakes nobody here
        sent = time.time()
        http.put("/v1/services/db1/fail", params={"note": "disk full"}).raise_for_status()
        watcher.join()
        [(at, endpoints)] = answered
        assert at - sent < 0.1, at - sent
        assert [(e["status"], e["output"]) for e in endpoints] == [("critical", "disk full")]
        with cluster.client() as admin:
            reader = admin.create_token("watcher", Role.READER).token
        looks = {"Authorization": f"Bearer {reader}"}
        with httpx.Client(base_url=cluster.url, headers=looks, timeout=10) as ro:
            assert ro.get("/v1/services/db?all").json() == endpoints  # a reader may look
            assert ro.put("/v1/services/db1/pass").status_code == 403  # and touch nothing
            assert ro.put("/v1/services/deregister/db1").status_code == 403
            assert ro.put("/v1/services/register", json=other.model_dump()).status_code == 403
        shoal = http.put("/v1/services/register", json={**other.model_dump(), "name": "shoal-agent"})
        assert shoal.status_code == 422 and shoal.json()["fields"][0]["field"] == "name"


def test_a_restarted_master_keeps_the_registry(tmp_path: Path) -> None:
    with live_cluster(tmp_path, agents=1) as cluster, cluster.client() as client, registry(cluster) as http:
        client.submit(web_job(tmp_path))
        wait_for(lambda: len(passing(http)) == 1, what="the endpoint passing")
        db = Registration(id="db1", name="db", address="127.0.0.2", port=5432, ttl=60)
        http.put("/v1/services/register", json=db.model_dump()).raise_for_status()
        before = {name: passing(http, name) for name in ("web", "db")}
        cluster.restart_master()
        with registry(cluster) as again:
            # At once, before the agent is back: what was acknowledged is there.
            assert {name: passing(again, name) for name in ("web", "db")} == before


def test_answers_list_the_least_loaded_nodes_first_as_load_moves(tmp_path: Path) -> None:
    # A band above what this shared machine reaches: loadgen keeps its one worker fully busy,
    # a core of the node's two, whatever else runs here.
    loadgen = [sys.executable, "-m", "shoal", "loadgen", "--min", "95", "--max", "100", "--workers", "1"]
    with live_cluster(tmp_path, agents=2) as cluster, cluster.client() as client, registry(cluster) as http:
        idle = {"command": "sleep 600", "ports": ["http"], "resources": {"cpus": 0.1, "mem": 32}}
        client.submit(
            JobSpec.model_validate(
                {**idle, "count": 2, "max_per_node": 1, "services": [{"name": "web", "port": "http"}]}
            )
        )
        wait_for(lambda: len(passing(http)) == 2, what="an endpoint on each node")

        def first_nodes() -> set[str]:
            return {passing(http)[0]["node"] for _ in range(10)}

        def busier(busy: str, calm: str) -> Callable[[], bool]:
            def done() -> bool:
                loads = {n.name: n.load for n in client.nodes()}
                return loads[busy] > loads[calm] + 20

            return done

        for busy, calm in (("node1", "node2"), ("node2", "node1")):
            burn = client.submit(JobSpec(command=loadgen, nodes=busy, resources={"cpus": 1, "mem": 64}))
            wait_for(busier(busy, calm), timeout=30, what=f"{busy} busier than {calm}")
            assert first_nodes() == {calm}
            client.kill(burn)
            client.wait(burn, timeout=20)
