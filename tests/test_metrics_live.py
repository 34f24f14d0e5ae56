"""Metrics as Prometheus reads them: a real Prometheus on loopback scrapes a live master and
its agents with a metrics token, and what PromQL says is what the API says."""

from __future__ import annotations

import json
import shutil
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest

from shoal.client import Client
from shoal.model import JobSpec, Role
from shoal.testing.live import LiveCluster, live_cluster, wait_for
from shoal.testing.prometheus import Target, prometheus

QUEUES = {"default": {}, "batch": {}}
pytestmark = pytest.mark.skipif(
    shutil.which("prometheus") is None, reason="prometheus is not installed (make test does)"
)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    root = Path(tmp_path_factory.mktemp("metrics"))
    with live_cluster(
        root, agents=2, agent_metrics=True, master_settings={"queues": json.dumps(QUEUES)}
    ) as c:
        yield c


def _scrape(url: str, token: str | None) -> httpx.Response:
    return httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {token}"} if token else {})


def test_a_scrape_needs_a_metrics_reader_or_admin_token(cluster: LiveCluster) -> None:
    with cluster.client() as admin:
        user = admin.create_token("someone", Role.USER).token
        reader = admin.create_token("watcher", Role.READER).token
    for token in (None, "not-a-token", user):
        refused = _scrape(cluster.url, token)
        assert refused.status_code == (403 if token == user else 401), refused.text
        assert {"error", "fields"} <= refused.json().keys()
    assert _scrape(cluster.url, None).headers["www-authenticate"] == "Bearer"
    for token in (reader, cluster.admin_token, cluster.metrics_token()):
        scraped = _scrape(cluster.url, token)
        assert scraped.status_code == 200 and b"shoal_master_leader 1.0" in scraped.content
    # A metrics token opens the metrics and nothing else.
    assert httpx.get(f"{cluster.url}/v1/jobs", headers=_bearer(cluster.metrics_token())).status_code == 401
    for port in cluster.metrics_ports.values():
        agent = f"http://127.0.0.1:{port}"
        for token in (None, cluster.admin_token):  # the agent knows its own token only
            assert _scrape(agent, token).status_code == 401
        assert b"shoal_agent_tasks_running" in _scrape(agent, cluster.metrics_token()).content


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_prometheus_counts_the_running_and_pending_tasks_the_api_reports(
    cluster: LiveCluster, tmp_path: Path
) -> None:
    sleep = "sleep 300"
    with cluster.client() as client:
        for queue, count, cpus in (("default", 2, 1), ("batch", 2, 1), ("default", 3, 1), ("batch", 1, 2)):
            client.submit(JobSpec(command=sleep, queue=queue, count=count, resources={"cpus": cpus}))
        wait_for(lambda: _api(client)[0] == 4, what="four tasks running (the 4 cpus there are)")
        running, pending = _api(client)
        assert pending == {"default": 3, "batch": 1}
        token = cluster.metrics_token()
        targets = [
            Target("shoal-master", cluster.url, token),
            *(Target("shoal-agent", f"http://127.0.0.1:{p}", token) for p in cluster.metrics_ports.values()),
        ]
        with prometheus(tmp_path / "prometheus", targets, interval=1.0) as prom:
            seen: tuple[object, ...] = ()
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                seen = (
                    prom.values("sum(shoal_tasks_running)", by=""),
                    prom.values("sum by (queue) (shoal_tasks_pending)", by="queue"),
                    prom.values("sum(shoal_agent_tasks_running)", by=""),
                    prom.values("up", by="instance"),
                )
                if seen == ({"": running}, pending, {"": running}, dict.fromkeys(_instances(targets), 1.0)):
                    break
                time.sleep(0.3)
            else:
                pytest.fail(f"Prometheus saw {seen}; the API reports {running} running and {pending} pending")
            assert _api(client) == (running, pending)  # nothing moved meanwhile
            assert prom.values('shoal_tasks_pending{reason="resources"}', by="queue") == pending


def _api(client: Client) -> tuple[int, dict[str, int]]:
    """Tasks running, and pending by queue, as GET /v1/jobs counts them."""
    running, pending = 0, Counter[str]()
    for job in client.jobs():
        running += job.counts.get("running", 0)
        pending[job.spec.queue] += job.counts.get("pending", 0)
    return running, {queue: float(n) for queue, n in pending.items()}


def _instances(targets: list[Target]) -> list[str]:
    return [t.url.partition("://")[2] for t in targets]
