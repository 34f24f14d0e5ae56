"""Frames round-trip through the codec; specs refuse bad input with the field at fault."""

from __future__ import annotations

import json

import msgpack
import pytest
from pydantic import ValidationError

from shoal.framework.protocol import TaskLaunch
from shoal.model import JobRecord, JobSpec, Resources, TaskState
from shoal.services import Registration
from shoal.testing.sim import sim_node
from shoal.wire import Ack, Kill, Launch, LogChunk, Register, RunReport, RunSpec, decode, encode

FRAMES = [
    Register(
        node=sim_node("n1"),
        runs=[RunReport(run_id="1.0.0", task_id="1.0", attempt=0, state=TaskState.RUNNING)],
    ),
    Launch(runs=[RunSpec(run_id="1.0.0", task_id="1.0", attempt=0, argv=["true"], resources=Resources())]),
    Kill(run_ids=["1.0.0"]),
    Ack(reports=[("1.0.0", TaskState.FINISHED)]),
    LogChunk(request=3, data=b"\x00\xffbytes", offset=10),
]


@pytest.mark.parametrize("frame", FRAMES, ids=lambda f: f.kind)
def test_frames_round_trip(frame) -> None:
    assert decode(encode(frame)) == frame


@pytest.mark.parametrize(
    "garbage",
    [
        msgpack.packb({"kind": "launch"}),
        msgpack.packb({"kind": "nope"}),
        msgpack.packb([1, 2]),
        msgpack.packb({"kind": "heartbeat", "usage": {"cpu_percent": float("nan")}}),
        msgpack.packb({"kind": "heartbeat", "usage": {"load1": float("inf")}}),
        msgpack.packb({"kind": "heartbeat", "usage": {"cpu_percent": 1e308}}),
        msgpack.packb({"kind": "heartbeat", "usage": {"runs": {"1.0.0": {"cpu_seconds": float("-inf")}}}}),
    ],
)
def test_garbage_frames_are_refused(garbage: bytes) -> None:
    with pytest.raises(ValidationError):
        decode(garbage)


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({"command": ""}, "command"),
        ({"command": "x", "resources": {"cpus": -1}}, "resources.cpus"),
        ({"command": "x", "resources": {"mem": 10**12}}, "resources.mem"),
        ({"command": "x", "count": 0}, "count"),
        ({"command": "x", "workdir": "relative/dir"}, "workdir"),
        ({"command": "x", "colour": "blue"}, "colour"),
        ({"command": "x", "restart": {"attempts": -2}}, "restart.attempts"),
        ({"command": "x", "env": {"A=B": "c"}}, "env"),
        ({"command": "x", "env": {"SHOAL_CGROUP_DIRS": "/home/me"}}, "env"),
        ({"command": "x", "env": {"SHOAL_SANDBOX": "/"}}, "env"),
        ({}, "command"),
        (
            {"command": "x", "ports": ["http"], "services": [{"name": "Web_1", "port": "http"}]},
            "services.0.name",
        ),
        (
            {"command": "x", "ports": ["http"], "services": [{"name": "-web", "port": "http"}]},
            "services.0.name",
        ),
        ({"command": "x", "ports": ["http"], "services": [{"name": "web", "port": "dns"}]}, "services"),
        ({"command": "x", "ports": ["http"], "services": [{"name": "w", "port": "http"}] * 2}, "services"),
        (
            {"command": "x", "ports": ["a"], "services": [{"name": "w", "port": "a", "tags": ["A B"]}]},
            "services.0.tags",
        ),
        (
            {"command": "x", "ports": ["a"], "services": [{"name": "w", "port": "a", "check": {"tcp": "b"}}]},
            "services",
        ),
        ({"command": "x", "health": {"command": "true", "interval": 0}}, "health.interval"),
        ({"command": "x", "health": {"command": "true", "interval": 10**6}}, "health.interval"),
        (
            {"command": "x", "health": {"command": "true", "failures_before_critical": 0}},
            "health.failures_before_critical",
        ),
        ({"command": "x", "ports": [{"name": "dns", "static": 70000}]}, "ports.0.static"),
        ({"command": "x", "ports": [{"name": "a", "static": 53}, {"name": "b", "static": 53}]}, "ports"),
        ({"command": "x", "colocation": [{"job": "db", "service": "db"}]}, "colocation.0"),
        ({"command": "x", "shutdown_delay": -1}, "shutdown_delay"),
        ({"command": "echo a\0b"}, "command"),
        ({"command": ["echo", "a\0b"]}, "command"),
        ({"command": "x", "env": {"A": "a\0b"}}, "env.A"),
        ({"command": "x", "env": {"A\0B": "c"}}, "env"),
        ({"command": "x", "workdir": "/srv/a\0b"}, "workdir"),
    ],
)
def test_bad_specs_name_the_field(spec: dict, field: str) -> None:
    with pytest.raises(ValidationError) as info:
        JobSpec.model_validate(spec)
    locations = {
        ".".join(str(p) for p in e["loc"] if not str(p).startswith(("str", "list[")))
        for e in info.value.errors()
    }
    assert any(loc == field or loc.startswith(field + ".") for loc in locations), locations


def test_shoal_names_are_refused_in_a_frameworks_task_and_kept_in_a_job_stored_before() -> None:
    with pytest.raises(ValidationError) as info:
        TaskLaunch.model_validate({"name": "t", "command": "x", "env": {"SHOAL_CGROUP_DIRS": "/tmp"}})
    [error] = info.value.errors()
    assert error["loc"] == ("env",) and "names beginning SHOAL_ are those shoal sets" in error["msg"]
    assert JobSpec(command="x", env={"shoal_mine": "1"}).env == {"shoal_mine": "1"}  # names are exact
    kept = '{"id": 1, "owner": "a", "spec": {"command": "x", "env": {"SHOAL_URL": "u"}}, "submitted_at": 0}'
    assert JobRecord.model_validate_json(kept).spec.env == {"SHOAL_URL": "u"}


@pytest.mark.parametrize(
    ("field", "value", "where"),
    [
        ("command", "echo a\0b", "command"),
        ("command", ["echo", "a\0b"], "command"),
        ("env", {"A": "a\0b"}, "env.A"),
        ("workdir", "/srv/a\0b", "workdir"),
    ],
)
def test_nul_bytes_are_refused_naming_the_field_and_kept_in_a_job_stored_before(
    field: str, value: object, where: str
) -> None:
    """No process can be given a NUL byte: a job or a framework's task holding one is refused
    at once, the error naming its field, as a job kept before the rule loads as it was."""
    for spec in ({"command": "x", field: value}, {"name": "t", "command": "x", field: value}):
        model = JobSpec if "name" not in spec else TaskLaunch
        with pytest.raises(ValidationError) as info:
            model.model_validate(spec)
        [error] = info.value.errors()
        assert ".".join(map(str, error["loc"])) == where and "holds a NUL byte" in error["msg"]
    kept = {"id": 1, "owner": "a", "spec": {"command": "x", field: value}, "submitted_at": 0}
    assert getattr(JobRecord.model_validate_json(json.dumps(kept)).spec, field) == value


def test_argv_of_a_list_command_is_not_run_by_a_shell() -> None:
    spec = JobSpec(command=["echo", "{index}", "$HOME"])
    assert spec.argv(4) == ["echo", "4", "$HOME"]


@pytest.mark.parametrize(
    ("registration", "field"),
    [
        ({"id": "db1", "name": "db", "address": "db.example", "port": 5432}, "address"),
        ({"id": "db1", "name": "db", "address": "10.0.0.1", "port": 0}, "port"),
        ({"id": "db1", "name": "db.x", "address": "10.0.0.1", "port": 1}, "name"),
        ({"id": "/db1", "name": "db", "address": "10.0.0.1", "port": 1}, "id"),
        ({"id": "db1", "name": "db", "address": "10.0.0.1", "port": 1, "ttl": 0}, "ttl"),
        ({"id": "db1", "name": "db", "address": "10.0.0.1", "port": 1, "meta": {"k": "v" * 600}}, "meta"),
    ],
)
def test_bad_registrations_name_the_field(registration: dict, field: str) -> None:
    with pytest.raises(ValidationError) as info:
        Registration.model_validate(registration)
    assert [e["loc"][0] for e in info.value.errors()] == [field]
