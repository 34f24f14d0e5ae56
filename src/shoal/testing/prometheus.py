"""A real Prometheus on 127.0.0.1 for tests and benchmarks: it scrapes the targets it is
given, with their bearer tokens, and answers PromQL.

    with prometheus(tmp_path, [Target("master", cluster.url, token)]) as prom:
        prom.values("sum by (queue) (shoal_tasks_pending)", by="queue")

Its data lives in the directory it is given and it is stopped on leaving the block. Needs the
`prometheus` binary (Debian's package; `make test` installs it).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

from shoal.testing.live import free_port, wait_for


@dataclass(frozen=True, slots=True)
class Target:
    job: str
    url: str  # the base URL it serves /metrics under: http://127.0.0.1:8470
    token: str
    ca: str | None = None  # the CA that signed its certificate, for https


class Prometheus:
    def __init__(self, root: Path, targets: list[Target], interval: float = 1.0) -> None:
        self.root = root
        self.targets = targets
        self.interval = interval
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None

    def config(self) -> dict[str, object]:
        """One scrape job a job name: its targets share a scheme, a token and a CA."""
        every = f"{self.interval:g}s"
        jobs: dict[str, dict[str, object]] = {}
        for target in self.targets:
            scheme, _, host = target.url.partition("://")
            job: dict[str, object] = {
                "job_name": target.job,
                "scheme": scheme,
                "authorization": {"type": "Bearer", "credentials": target.token},
                **({"tls_config": {"ca_file": target.ca}} if target.ca is not None else {}),
            }
            kept = jobs.setdefault(target.job, {**job, "static_configs": [{"targets": []}]})
            assert {k: v for k, v in kept.items() if k != "static_configs"} == job, (
                f"{target.job}: unlike targets"
            )
            kept["static_configs"][0]["targets"].append(host.rstrip("/"))  # type: ignore[index]
        scrape = {"scrape_interval": every, "scrape_timeout": every, "evaluation_interval": every}
        return {"global": scrape, "scrape_configs": list(jobs.values())}

    def start(self) -> None:
        binary = shutil.which("prometheus")
        if binary is None:
            raise FileNotFoundError("prometheus is not installed (Debian's package; `make test` installs it)")
        self.root.mkdir(parents=True, exist_ok=True)
        config = self.root / "prometheus.yml"
        config.write_text(json.dumps(self.config(), indent=2))  # JSON is YAML
        log = open(self.root / "prometheus.log", "ab")  # noqa: SIM115 - the child holds it
        with log:
            self.process = subprocess.Popen(
                [
                    binary,
                    f"--config.file={config}",
                    f"--storage.tsdb.path={self.root / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--log.level=warn",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        wait_for(self._ready, 30.0, "prometheus ready")

    def _ready(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            tail = (self.root / "prometheus.log").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"prometheus exited with code {self.process.returncode}:\n{tail}")
        with contextlib.suppress(httpx.HTTPError):
            return httpx.get(f"{self.url}/-/ready", timeout=1).status_code == 200
        return False

    def query(self, promql: str) -> list[dict[str, object]]:
        """The instant vector `promql` evaluates to now: [{"metric": {...}, "value": [t, "v"]}]."""
        answer = httpx.get(f"{self.url}/api/v1/query", params={"query": promql}, timeout=5).json()
        if answer["status"] != "success":
            raise ValueError(f"{promql}: {answer.get('error')}")
        return answer["data"]["result"]

    def values(self, promql: str, by: str) -> dict[str, float]:
        """Each series' value, keyed by its label `by`."""
        return {str(r["metric"].get(by, "")): float(r["value"][1]) for r in self.query(promql)}  # type: ignore[index,union-attr]

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


@contextlib.contextmanager
def prometheus(root: Path, targets: list[Target], interval: float = 1.0) -> Iterator[Prometheus]:
    """A started Prometheus scraping `targets` every `interval` seconds; stopped at the end."""
    server = Prometheus(root, targets, interval)
    try:
        server.start()
        yield server
    finally:
        server.stop()
