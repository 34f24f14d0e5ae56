"""`shoal exec --ssh` against real sshd processes on loopback addresses, no agents."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from shoal.client import ApiError
from shoal.model import Role
from shoal.testing.live import free_port, live_cluster
from shoal.testing.sshd import SshHosts, ssh_hosts


@pytest.fixture(scope="module")
def hosts(tmp_path_factory: pytest.TempPathFactory):
    with ssh_hosts(tmp_path_factory.mktemp("ssh"), count=3) as h:
        yield h


def shoal_ssh(hosts: SshHosts, *args: str) -> subprocess.CompletedProcess[str]:
    # No master answers at this URL: SSH mode needs none.
    env = {**os.environ, "SHOAL_URL": f"http://127.0.0.1:{free_port()}", "SHOAL_CONFIG": "/nonexistent"}
    return subprocess.run(
        [sys.executable, "-m", "shoal", "exec", "--ssh", "-o", hosts.options, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_gathered_output_over_ssh(hosts: SshHosts) -> None:
    result = shoal_ssh(hosts, "-b", "-w", "node[1-3]", "--", "echo same")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "---------------\nnode[1-3] (3)\n---------------\nsame\n"


def test_each_host_is_its_own_machine(hosts: SshHosts) -> None:
    result = shoal_ssh(hosts, "-w", "node[1-3]", "--", 'echo "${SSH_CONNECTION##* 127.0.0.}" | cut -d" " -f1')
    assert sorted(result.stdout.splitlines()) == ["node1: 2", "node2: 3", "node3: 4"]


def test_exit_codes_and_unreachable_hosts_as_clush_reports_them(hosts: SshHosts) -> None:
    result = shoal_ssh(hosts, "-S", "-w", "node[1-2],nowhere", "--", "exit 3")
    assert result.returncode == 255  # ssh's own code for the host it could not reach
    assert "shoal: node[1-2]: exited with exit code 3" in result.stderr
    assert "shoal: nowhere: exited with exit code 255" in result.stderr
    ok = shoal_ssh(hosts, "-S", "-w", "node[1-3]", "--", "true")
    assert ok.returncode == 0


def test_command_timeout_over_ssh(hosts: SshHosts) -> None:
    result = shoal_ssh(hosts, "-S", "-u", "1", "-w", "node[1-2]", "--", "sleep 20")
    assert "node[1-2]: command timeout" in result.stderr
    assert result.returncode == 255


def test_ssh_runs_are_audited_when_a_master_answers(hosts: SshHosts, tmp_path: Path) -> None:
    with live_cluster(tmp_path / "cluster", agents=0) as cluster:
        env = {**cluster.cli_env()}
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "shoal",
                "exec",
                "--ssh",
                "-o",
                hosts.options,
                "-w",
                "node[1-2]",
                "--",
                "exit 4",
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert "node[1-2]: exited with exit code 4" in result.stderr
        with cluster.client() as admin:
            record = admin.audit(limit=1)[0]
            assert (record.via, record.command, record.nodes) == ("ssh", "exit 4", "node[1-2]")
            assert record.results == {"4": "node[1-2]"} and record.ended_at is not None
            with pytest.raises(ApiError) as again:
                admin.audit_end(record.id, {})
            assert again.value.status == 409
            other = admin.create_token("erin", Role.ADMIN).token
        with cluster.client(other) as erin, pytest.raises(ApiError) as not_hers:
            erin.audit_end(record.id, {})
        assert not_hers.value.status == 404
