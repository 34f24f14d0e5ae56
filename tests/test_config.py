"""Settings: flags beat SHOAL_* variables, which beat the TOML file, which beats defaults."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from shoal.config import AgentSettings, MasterSettings, load_settings, shared_host_ports


def test_precedence_flags_env_file_defaults(tmp_path: Path, monkeypatch) -> None:
    file = tmp_path / "master.toml"
    file.write_text('port = 9001\nheartbeat_timeout = 4.0\nhost = "0.0.0.0"\n')
    monkeypatch.setenv("SHOAL_HEARTBEAT_TIMEOUT", "6")
    monkeypatch.setenv("SHOAL_HOST", "10.0.0.1")
    settings = load_settings(MasterSettings, file, host="127.0.0.2", port=None)
    assert settings.host == "127.0.0.2"  # flag
    assert settings.heartbeat_timeout == 6.0  # environment over file
    assert settings.port == 9001  # file over default
    assert settings.tick == 0.5  # default


def test_agent_labels_from_file_and_token_from_env(tmp_path: Path, monkeypatch) -> None:
    file = tmp_path / "agent.toml"
    file.write_text('name = "gpu7"\n[labels]\nrack = "r1"\nzone = "b"\n')
    monkeypatch.setenv("SHOAL_CLUSTER_TOKEN", "secret")
    settings = load_settings(AgentSettings, file)
    assert settings.name == "gpu7" and settings.labels == {"rack": "r1", "zone": "b"}
    assert settings.cluster_token.get_secret_value() == "secret"
    assert "secret" not in repr(settings)


def test_unknown_or_bad_settings_are_refused(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("SHOAL_CLUSTER_TOKEN", raising=False)
    file = tmp_path / "master.toml"
    file.write_text("prot = 9001\n")
    with pytest.raises(ValidationError, match="prot"):
        load_settings(MasterSettings, file)
    with pytest.raises(ValidationError, match="heartbeat_timeout"):
        load_settings(MasterSettings, None, heartbeat_timeout=-1)
    with pytest.raises(ValidationError, match="node_cert_days"):
        load_settings(MasterSettings, None, node_cert_days=0)


def test_queues_and_weights_from_the_file(tmp_path: Path) -> None:
    file = tmp_path / "master.toml"
    file.write_text(
        'strategy = "binpack"\n[queues.batch]\norder = "fair"\nweight = 2\n[user_weights]\nalice = 3\n'
    )
    settings = load_settings(MasterSettings, file)
    assert settings.strategy.value == "binpack"
    assert set(settings.queues) == {"default", "batch"}
    assert (settings.queues["batch"].order, settings.queues["batch"].weight) == ("fair", 2.0)
    assert settings.user_weights == {"alice": 3.0}
    file.write_text('[queues.batch]\norder = "random"\n')
    with pytest.raises(ValidationError, match="order"):
        load_settings(MasterSettings, file)


def test_agent_custom_resources_from_file_and_env(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("SHOAL_CLUSTER_TOKEN", "secret")
    file = tmp_path / "agent.toml"
    file.write_text("[resources]\nlicenses = 4\nfpga = 1\n")
    assert load_settings(AgentSettings, file).resources == {"licenses": 4.0, "fpga": 1.0}
    # Each source adds names or sets their amounts over a weaker one.
    monkeypatch.setenv("SHOAL_RESOURCES", '{"licenses": 2}')
    assert load_settings(AgentSettings, file).resources == {"licenses": 2.0, "fpga": 1.0}
    flagged = load_settings(AgentSettings, file, resources={"seats": 8, "fpga": 0})
    assert flagged.resources == {"licenses": 2.0, "fpga": 0.0, "seats": 8.0}
    for bad in ({"Licenses": 4}, {"cpus": 2}, {"licenses": -1}):
        with pytest.raises(ValidationError, match="resources"):
            load_settings(AgentSettings, None, resources=bad)


@pytest.mark.parametrize("agents", [1, 3, 64, 91, 92, 128, 1000])
def test_agents_sharing_a_machine_get_disjoint_port_ranges_below_65536(agents: int) -> None:
    ranges = [shared_host_ports(i, agents) for i in range(agents)]
    assert all(20000 <= low <= high <= 65535 for low, high in ranges)
    assert all(a[1] < b[0] for a, b in zip(ranges, ranges[1:], strict=False))
    width = ranges[0][1] - ranges[0][0] + 1
    assert width == (500 if agents <= 91 else (65536 - 20000) // agents)
