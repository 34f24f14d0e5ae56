"""`shoal dev`: one command up over TLS, `shoal run` works from another shell, Ctrl-C leaves nothing."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import psutil

from shoal.client import Client
from shoal.clientfile import ClientConfig, load_client_config
from shoal.model import JobSpec, NodeStatus, TaskState
from shoal.testing.live import free_port, wait_for


def test_dev_cluster_up_run_and_clean_stop(tmp_path: Path, monkeypatch) -> None:
    config = tmp_path / "client.toml"
    env = {**os.environ, "SHOAL_CONFIG": str(config)}
    for var in ("SHOAL_URL", "SHOAL_TOKEN", "SHOAL_CA"):
        env.pop(var, None)
    port = free_port()
    dev = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "shoal",
            "dev",
            "--agents",
            "2",
            "--port",
            str(port),
            "--state-dir",
            str(tmp_path / "dev"),
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_for(config.exists, what="the client file")
        monkeypatch.setenv("SHOAL_CONFIG", str(config))
        settings: ClientConfig = load_client_config()
        assert settings.url == f"https://127.0.0.1:{port}"
        assert settings.ca == str(tmp_path / "dev" / "master" / "tls" / "ca.pem")
        dev_dir, master_dir = tmp_path / "dev", tmp_path / "dev" / "master"
        tokens = [dev_dir / "admin.token", dev_dir / "cluster.token", master_dir / "admin.token"]
        assert not (master_dir / "cluster.token").exists()  # a master serving TLS has none
        keys = [tmp_path / "dev" / "master" / "tls" / key for key in ("ca.key", "master.key")]
        modes = {str(p): stat.S_IMODE(p.stat().st_mode) for p in [config, *tokens, *keys]}
        assert modes == dict.fromkeys(modes, 0o600)  # the owner's alone
        with Client.from_config() as client:
            wait_for(
                lambda: len([n for n in client.nodes() if n.status is NodeStatus.UP]) == 2, what="2 agents"
            )
            hi = subprocess.run(
                [sys.executable, "-m", "shoal", "run", "--", "echo", "hi"],
                env=env,
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert (hi.returncode, hi.stdout) == (0, "hi\n")
            job = client.submit(JobSpec(command="sleep 300", count=2, resources={"cpus": 0.5}))
            wait_for(lambda: all(t.state is TaskState.RUNNING for t in client.job(job).tasks))
        family = psutil.Process(dev.pid).children(recursive=True)
        assert len(family) >= 3 + 2  # master, 2 agents, and the tasks' processes
        dev.send_signal(signal.SIGINT)
        output, _ = dev.communicate(timeout=30)
        assert "token" in output and "https://" in output and "/docs" in output and "ca.pem" in output
        survivors = [p for p in family if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        assert survivors == []
    finally:
        if dev.poll() is None:
            dev.kill()


def _free_run(length: int) -> int:
    """A port with the `length - 1` after it free too."""
    while True:
        port = free_port()
        if port + length < 65536 and all(_free(port + i) for i in range(1, length)):
            return port


def _free(port: int) -> bool:
    import socket

    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def test_dev_ha_elects_a_leader_and_survives_its_kill(tmp_path: Path) -> None:
    config = tmp_path / "client.toml"
    env = {**os.environ, "SHOAL_CONFIG": str(config)}
    for var in ("SHOAL_URL", "SHOAL_TOKEN", "SHOAL_CA"):
        env.pop(var, None)
    port = _free_run(3)
    dev = subprocess.Popen(
        [sys.executable, "-m", "shoal", "dev", "--ha", "--agents", "1", "--port", str(port)]
        + ["--state-dir", str(tmp_path / "dev")],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )

    def shoal(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "shoal", *args], env=env, capture_output=True, text=True, timeout=60
        )

    def leader() -> str | None:
        listing = shoal("masters", "--json")
        found = (
            [m["name"] for m in json.loads(listing.stdout) if m["leader"]] if listing.returncode == 0 else []
        )
        return found[0] if found else None

    try:
        wait_for(config.exists, timeout=60, what="the client file")
        first = wait_for(leader, what="a leader")
        family = psutil.Process(dev.pid).children(recursive=True)
        names = {p.info["name"] for p in psutil.process_iter(["name"]) if p.pid in {c.pid for c in family}}
        assert "etcd" in names
        [master] = [p for p in family if f"--name {first}" in " ".join(p.cmdline())]
        master.kill()
        second = wait_for(lambda: (name := leader()) not in (None, first) and name, what="a new leader")
        assert second != first
        hi = shoal("run", "--", "echo", "hi")
        assert (hi.returncode, hi.stdout) == (0, "hi\n")
        dev.send_signal(signal.SIGINT)
        output, _ = dev.communicate(timeout=30)
        assert "shoal dev --ha" in output
        survivors = [p for p in family if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        assert survivors == []
    finally:
        if dev.poll() is None:
            dev.kill()
