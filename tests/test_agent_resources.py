"""Agents declare custom resources (`--resource licenses=4`) in their node's capacity."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from shoal.agent.server import Agent
from shoal.config import AgentSettings, load_settings
from shoal.model import NodeStatus
from shoal.testing.live import LiveCluster, live_cluster, wait_for
from shoal.views import NodeView


def test_the_settings_resources_are_in_the_nodes_capacity(tmp_path: Path) -> None:
    settings = load_settings(
        AgentSettings,
        None,
        master="http://127.0.0.1:8470",
        cluster_token="t",
        state_dir=tmp_path,
        limits=False,
        resources={"licenses": 4},
    )
    capacity = Agent(settings).state.node.capacity
    assert capacity.custom == {"licenses": 4.0}
    assert capacity.cpus > 0 and capacity.mem > 0  # what the machine has, as without them


@pytest.fixture(scope="module")
def licensed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LiveCluster, NodeView]]:
    """A master and one agent started verbose, with resources of its own: the cluster and the
    agent's node as the master lists it."""
    root = tmp_path_factory.mktemp("licensed")
    with live_cluster(root, agents=0) as cluster:
        args = [
            "agent",
            "-v",
            "--master",
            cluster.url,
            "--name",
            "licensed",
            "--state-dir",
            str(root / "node"),
        ]
        flags = ["--resource", "licenses=4", "--resource", "fpga=1", "--cpus", "1", "--utilization", "tasks"]
        with open(root / "licensed.log", "wb") as log:
            agent = subprocess.Popen(
                [sys.executable, "-m", "shoal", *args, *flags], env=cluster.env, stdout=log, stderr=log
            )
        try:
            with cluster.client() as client:
                node = wait_for(
                    lambda: next((n for n in client.nodes() if n.status is NodeStatus.UP), None),
                    what="the agent registering",
                )
            yield cluster, node  # type: ignore[misc]
        finally:
            agent.kill()
            agent.wait(10)


def test_an_agent_started_with_resources_registers_them(licensed: tuple[LiveCluster, NodeView]) -> None:
    cluster, node = licensed
    assert node.info.capacity.custom == {"licenses": 4.0, "fpga": 1.0}
    listing = subprocess.run(
        [sys.executable, "-m", "shoal", "nodes"],
        env={**cluster.cli_env(), "COLUMNS": "200"},
        capture_output=True,
        text=True,
    )
    assert "fpga 0/1,licenses 0/4" in listing.stdout


def test_a_verbose_agent_logs_no_token(licensed: tuple[LiveCluster, NodeView]) -> None:
    cluster, _ = licensed
    log = (cluster.root / "licensed.log").read_text()
    assert "connected to" in log
    assert cluster.cluster_token not in log  # nor the handshake's headers, at DEBUG


def test_a_resource_that_is_not_a_number_is_refused(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "shoal", "agent", "--token", "t", "--resource", "licenses=many"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert result.returncode == 2
    assert "licenses" in result.stderr and "not a number" in result.stderr
