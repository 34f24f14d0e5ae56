"""`shoal bootstrap` over real sshd hosts on loopback: install, start agents, join a master
serving TLS with a bootstrap token and the cluster's CA."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
from typer.testing import CliRunner

from shoal.cli import app
from shoal.testing.live import live_cluster, wait_for
from shoal.testing.sshd import ssh_hosts

PIP = "import sys\nfrom pip._internal.cli.main import main\nsys.exit(main())\n"  # as pip's own bin/pip


def seeded_venv(prefix: Path) -> None:
    """A venv whose dependencies are already there (this test's own, pip among them), so
    installing the wheel downloads nothing; bootstrap finds the venv and installs into it
    with its bin/pip, which runs this test's pip (ensurepip would copy it in, slowly)."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(prefix)], check=True)
    site = next((prefix / "lib").glob("python3*/site-packages"))
    ours = next(p for p in sys.path if p.endswith("site-packages") and ".venv" in p)
    (site / "deps.pth").write_text(ours + "\n")
    pip = prefix / "bin" / "pip"
    pip.write_text(f"#!{prefix}/bin/python\n{PIP}")
    pip.chmod(0o755)


def agents_of(root: Path) -> list[psutil.Process]:
    return [
        p
        for p in psutil.process_iter(["cmdline"])
        if str(root) in " ".join(p.info["cmdline"] or []) and "agent" in (p.info["cmdline"] or [])
    ]


def test_bootstrap_installs_and_starts_agents_that_join(tmp_path: Path) -> None:
    install = tmp_path / "nodes"
    with (
        live_cluster(tmp_path / "cluster", agents=0, tls=True) as cluster,
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
                "--bootstrap-token",
                cluster.bootstrap_token(),
                "--ca",
                str(cluster.ca),
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
            env = install / "node1" / "agent.env"
            assert env.stat().st_mode & 0o777 == 0o600  # the token is for root's eyes only
            assert env.read_text() == (
                f"SHOAL_CA={install}/node1/ca.pem\nSHOAL_BOOTSTRAP_TOKEN={cluster.bootstrap_token()}\n"
            )  # the cluster token (in this command's environment) opens nothing over TLS
            assert (install / "node1" / "ca.pem").read_text().strip() == Path(
                str(cluster.ca)
            ).read_text().strip()
            commands = " ".join(" ".join(p.cmdline()) for p in agents_of(install))
            assert cluster.bootstrap_token() not in commands
            # A wheel is given, not built again: it never leaves this machine.
            unsent = tmp_path / "shoal-0.1.0-py3-none-any.whl"
            unsent.write_bytes(b"")
            unreachable = cluster.cli(
                "bootstrap",
                "-w",
                "nowhere",
                "--master",
                cluster.url,
                "--bootstrap-token",
                "t",
                "--wheel",
                str(unsent),
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


def test_the_agents_env_file_is_made_as_the_master_asks(tmp_path: Path) -> None:
    """The script's env-file part, run here: TLS writes the CA and the bootstrap token, plain
    HTTP the cluster token; the CA comes after the token on stdin."""
    from shoal.shell.bootstrap import Plan

    wheel = Path("/w/shoal-0.1.0-py3-none-any.whl")
    pem = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----"
    for plan, env in (
        (
            Plan("https://m:8470", "boot", wheel, str(tmp_path), ca_pem=pem + "\n"),
            f"SHOAL_CA={tmp_path}/ca.pem\nSHOAL_BOOTSTRAP_TOKEN=boot\n",
        ),
        (Plan("http://m:8470", "cluster", wheel, str(tmp_path)), "SHOAL_CLUSTER_TOKEN=cluster\n"),
    ):
        script = plan.script("n1")
        head, tail = script.split("umask 077\n")
        reading = head.split("D=$(mktemp -d)")[0]  # the settings and stdin, not the install
        env_part = tail.split("if [ -d /run/systemd/system ]")[0]
        subprocess.run(["sh", "-ec", reading + "umask 077\n" + env_part], input=plan.stdin(), check=True)
        assert (tmp_path / "agent.env").read_text() == env
    assert (tmp_path / "ca.pem").read_text() == pem + "\n"


@pytest.mark.parametrize(
    ("url", "options", "says"),
    [
        ("https://m:8470", ["--cluster-token", "c"], "--bootstrap-token"),
        ("https://m:8470", ["--bootstrap-token", "b"], "--ca"),
        ("http://m:8470", ["--bootstrap-token", "b", "--cluster-token", "c"], "--cluster-token"),
        ("http://m:8470", [], "--cluster-token"),
    ],
)
def test_bootstrap_asks_for_what_the_master_needs(url: str, options: list[str], says: str) -> None:
    env = {"SHOAL_CLUSTER_TOKEN": "", "SHOAL_BOOTSTRAP_TOKEN": "", "SHOAL_CA": ""}
    result = CliRunner().invoke(app, ["bootstrap", "-w", "n1", "--master", url, *options], env=env)
    assert result.exit_code == 2 and says in result.output
