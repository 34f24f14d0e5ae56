"""`shoal bootstrap` over real sshd hosts on loopback: install, start agents, join the master."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from shoal.testing.live import live_cluster, wait_for
from shoal.testing.sshd import ssh_hosts


def seeded_venv(prefix: Path) -> None:
    """A venv whose dependencies are already there (this test's own), so installing the
    wheel downloads nothing; bootstrap finds the venv and installs into it."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(prefix)], check=True)
    subprocess.run(
        [str(prefix / "bin" / "python"), "-m", "ensurepip", "--default-pip"], check=True, capture_output=True
    )
    site = next((prefix / "lib").glob("python3*/site-packages"))
    ours = next(p for p in sys.path if p.endswith("site-packages") and ".venv" in p)
    (site / "deps.pth").write_text(ours + "\n")


def agents_of(root: Path) -> list[psutil.Process]:
    return [
        p
        for p in psutil.process_iter(["cmdline"])
        if str(root) in " ".join(p.info["cmdline"] or []) and "agent" in (p.info["cmdline"] or [])
    ]


def test_bootstrap_installs_and_starts_agents_that_join(tmp_path: Path) -> None:
    install = tmp_path / "nodes"
    with (
        live_cluster(tmp_path / "cluster", agents=0) as cluster,
        ssh_hosts(tmp_path / "ssh", count=2) as hosts,
    ):
        for node in hosts.names:
            seeded_venv(install / node)
        try:
            result = cluster.cli(
                "bootstrap",
                "-w",
                "node[1-2]",
                "--master",
                cluster.url,
                "--token",
                cluster.cluster_token,
                "--prefix",
                f"{install}/{{node}}",
                "-o",
                hosts.options,
                "--label",
                "via=bootstrap",
                "--json",
                timeout=300,
            )
            assert result.returncode == 0, result.stdout + result.stderr
            cluster.wait_nodes_up(["node1", "node2"], timeout=60)
            listing = cluster.cli("exec", "-b", "-g", "via:bootstrap", "--", "echo joined")
            assert "node[1-2] (2)" in listing.stdout and "joined" in listing.stdout
            env = (install / "node1" / "agent.env").stat()
            assert env.st_mode & 0o777 == 0o600  # the token is for root's eyes only
            assert cluster.cluster_token not in " ".join(" ".join(p.cmdline()) for p in agents_of(install))
            unreachable = cluster.cli(
                "bootstrap",
                "-w",
                "nowhere",
                "--master",
                cluster.url,
                "--token",
                "t",
                "-o",
                hosts.options,
                "--json",
                timeout=120,
            )
            assert unreachable.returncode == 1 and '"step": "copy"' in unreachable.stdout
        finally:
            for proc in agents_of(install):
                proc.send_signal(signal.SIGTERM)
            wait_for(lambda: not agents_of(install), 15, "bootstrapped agents stopped")


@pytest.mark.parametrize("node", ["n1", "rack-2.node7"])
def test_the_script_quotes_what_it_is_given(node: str) -> None:
    from shoal.shell.bootstrap import Plan

    plan = Plan(
        "http://m:8470", "secret", Path("/w/shoal-0.1.0-py3-none-any.whl"), "/opt/{node}", labels={"a": "b c"}
    )
    script = plan.script(node)
    assert f"P=/opt/{node};" in script and "NODE=" + node in script
    assert "secret" not in script  # the token goes on stdin
    assert "LABELS='--label a=b c'" in script
