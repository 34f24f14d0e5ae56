"""Agents declare custom resources (`--resource licenses=4`) in their node's capacity."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from shoal.agent.server import Agent
from shoal.config import AgentSettings, load_settings
from shoal.model import NodeStatus
from shoal.testing.live import live_cluster, wait_for


def test_the_settings_resources_are_in_the_nodes_capacity(tmp_path: Path) -> None:
    settings = load_settings(
        AgentSettings, None, cluster_token="t", state_dir=tmp_path, limits=False, resources={"licenses": 4}
    )
    capacity = Agent(settings).state.node.capacity
    assert capacity.custom == {"licenses": 4.0}
    assert capacity.cpus > 0 and capacity.mem > 0  # what the machine has, as without them


def test_an_agent_started_with_resources_registers_them(tmp_path: Path) -> None:
    with live_cluster(tmp_path, agents=0) as cluster:
        args = [
            "agent",
            "--master",
            cluster.url,
            "--name",
            "licensed",
            "--state-dir",
            str(tmp_path / "licensed"),
        ]
        flags = ["--resource", "licenses=4", "--resource", "fpga=1", "--cpus", "1", "--utilization", "tasks"]
        with open(tmp_path / "licensed.log", "wb") as log:
            agent = subprocess.Popen(
                [sys.executable, "-m", "shoal", *args, *flags], env=cluster.env, stdout=log, stderr=log
            )
        try:
            with cluster.client() as client:
                node = wait_for(
                    lambda: next((n for n in client.nodes() if n.status is NodeStatus.UP), None),
                    what="the agent registering",
                )
            assert node.info.capacity.custom == {"licenses": 4.0, "fpga": 1.0}  # type: ignore[attr-defined]
            listing = subprocess.run(
                [sys.executable, "-m", "shoal", "nodes"],
                env={**cluster.cli_env(), "COLUMNS": "200"},
                capture_output=True,
                text=True,
            )
            assert "fpga 0/1,licenses 0/4" in listing.stdout
        finally:
            agent.kill()
            agent.wait(10)


def test_a_resource_that_is_not_a_number_is_refused(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "shoal", "agent", "--token", "t", "--resource", "licenses=many"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert result.returncode == 2
    assert "licenses" in result.stderr and "not a number" in result.stderr
