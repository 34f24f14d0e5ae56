"""Bad frames from an authenticated agent disturb nothing else.

A third node, speaking the wire protocol by hand, sends frames hypothesis makes to a master
busy with real work (`shoal.testing.bystanders`): malformed msgpack, wrong types, unknown
kinds, frames out of order, reports and usage of runs it never had or that are the other
nodes', registrations again, random bytes and text; then frames near and past the master's
cap. After each batch the work goes on unharmed. The master may answer a bad frame, drop it,
or hang up (the node dials again).
"""

from __future__ import annotations

import typing
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import msgpack
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from shoal import wire
from shoal.model import NodeInfo, Resources, TaskState, Usage
from shoal.testing.bystanders import REAL_NODES, Bystanders, assert_unharmed, bystanders
from shoal.testing.live import LiveCluster

pytestmark = pytest.mark.timeout(120)

FUZZ_NODE = "fuzz3"
CAP = 8 << 20  # bytes of one message from an agent, at most (the master's ws_max)


@pytest.fixture(scope="module")
def busy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bystanders]:
    with bystanders(Path(tmp_path_factory.mktemp("frames")), {"ws_max": str(CAP)}) as b:
        yield b


# --- a node that speaks the wire protocol by hand ------------------------------------------


def _agent_credentials(cluster: LiveCluster) -> dict[str, object]:
    """What the master asks of an agent's connection, as `connect` arguments: the cluster
    token, on plain HTTP (a master serving TLS wants a node certificate: an ssl context)."""
    return {"additional_headers": {"Authorization": f"Bearer {cluster.cluster_token}"}}


_ME = NodeInfo(name=FUZZ_NODE, hostname=FUZZ_NODE, capacity=Resources(cpus=1, mem=256))
_REGISTER = wire.encode(wire.Register(node=_ME))
_HEARTBEAT = wire.encode(wire.Heartbeat(usage=Usage()))  # answered by an empty Ack


class RawAgent:
    """The third node: dials, registers when told to, sends what it is given, and dials
    again whenever the master hangs up."""

    def __init__(self, cluster: LiveCluster) -> None:
        self.cluster = cluster
        self.ws: ClientConnection | None = None

    def dial(self, register: bool = True) -> None:
        self.close()
        url = self.cluster.url.replace("http", "ws", 1) + "/v1/agent"
        # A master busy with a large frame reads the closing handshake late: it need not wait.
        credentials = _agent_credentials(self.cluster)
        self.ws = connect(url, max_size=None, open_timeout=5, close_timeout=1, **credentials).__enter__()
        if register:
            self.ws.send(_REGISTER)
            while not isinstance(wire.decode(self.ws.recv(5)), wire.Welcome):
                pass

    def send(self, frame: bytes | str) -> None:
        assert self.ws is not None
        try:
            self.ws.send(frame)
            while True:  # what the master answered so far (acks, kills), read so it never waits
                self.ws.recv(0)
        except TimeoutError:
            pass
        except ConnectionClosed:
            self.dial()

    def close(self) -> None:
        if self.ws is not None:
            self.ws.close()
            self.ws = None


# --- frames ---------------------------------------------------------------------------------

# The frame models by kind: the members of the discriminated union.
_KINDS = {cls.model_fields["kind"].default: cls for cls in typing.get_args(typing.get_args(wire.Frame)[0])}
_INTS = st.integers(-(2**63), 2**64 - 1)  # what msgpack carries
_ANY = st.recursive(
    st.none() | st.booleans() | _INTS | st.floats() | st.text(max_size=16) | st.binary(max_size=16),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
)
# Readings: as often NaN, infinite or out of range as anything else.
_NUMBERS = st.sampled_from([float("nan"), float("inf"), -1.0, 1e308]) | st.floats() | _INTS
_NAMES = st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9._-]{0,20}\Z")


def _pack(value: object) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


def _wrong_types(kind: str) -> st.SearchStrategy[dict]:
    """A frame of a known kind with any values in its fields, or in fields it lacks."""
    fields = {name: _ANY for name in _KINDS[kind].model_fields if name != "kind"}
    return st.fixed_dictionaries({"kind": st.just(kind)}, optional={**fields, "extra": _ANY})


def _reports(runs: list[str]) -> st.SearchStrategy[dict]:
    """A run report of well-formed fields: about the other nodes' runs, or runs nobody had."""
    run = st.sampled_from(runs) | _NAMES.map(lambda s: f"{s}.1")
    return run.flatmap(
        lambda r: st.fixed_dictionaries(
            {
                "run_id": st.just(r),
                "task_id": st.just(r.rpartition(".")[0]) | _NAMES,
                "attempt": st.just(int(r.rpartition(".")[2])) | _INTS,
                "state": st.sampled_from([s.value for s in TaskState]),
            },
            optional={"exit_code": _INTS, "message": st.text(max_size=64), "checkpoint": st.text(max_size=8)},
        )
    )


def _usage(runs: list[str]) -> st.SearchStrategy[dict]:
    usage = {"cpu_seconds": _NUMBERS, "rss": _INTS}
    return st.fixed_dictionaries(
        {"cpu_percent": _NUMBERS, "load1": _NUMBERS},
        optional={
            "mem_used": _INTS,
            "runs": st.dictionaries(
                st.sampled_from(runs) | st.text(max_size=12),
                st.fixed_dictionaries({}, optional=usage),
                max_size=4,
            ),
        },
    )


def _node_info() -> st.SearchStrategy[dict]:
    """A registration's node: this one, another's name, or a new one; any valid capacity."""
    capacity = st.fixed_dictionaries(
        {},
        optional={
            "cpus": st.floats(0, 64),
            "mem": st.integers(0, 1 << 20),
            "gpus": st.integers(0, 8),
            "custom": st.dictionaries(st.sampled_from(["licenses", "fpga"]), st.floats(0, 10), max_size=2),
        },
    )
    return st.fixed_dictionaries(
        {
            "name": st.sampled_from([FUZZ_NODE, *REAL_NODES]) | _NAMES,
            "hostname": st.text(max_size=16),
            "capacity": capacity,
        },
        optional={
            "labels": st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=3),
            "port_range": st.tuples(_INTS, _INTS),
        },
    )


def _well_formed(runs: list[str]) -> st.SearchStrategy[dict]:
    """Frames the codec takes, out of place: registrations again, reports and usage of runs
    that are not this node's, answers to nothing asked, and what only a master sends."""
    ids = st.integers(-(2**63), 2**63 - 1)
    register = st.builds(
        lambda node, rs: {"kind": "register", "node": node, "runs": rs},
        _node_info(),
        st.lists(_reports(runs), max_size=4),
    )
    answers = st.one_of(
        st.builds(lambda r, d: {"kind": "log_chunk", "request": r, "data": d}, ids, st.binary(max_size=64)),
        st.builds(lambda e: {"kind": "exec_started", "exec_id": e}, ids),
        st.builds(
            lambda e, d: {"kind": "exec_output", "exec_id": e, "stream": "stdout", "data": d},
            ids,
            st.binary(max_size=64),
        ),
        st.builds(lambda e, c: {"kind": "exec_end", "exec_id": e, "code": c}, ids, ids),
        st.builds(
            lambda e, b: {
                "kind": "file_fetched",
                "exec_id": e,
                "blob": b,
                "size": 1,
                "mode": 0o644,
                "mtime": 0,
            },
            ids,
            st.text(max_size=64),
        ),
    )
    masters_own = st.one_of(
        st.builds(lambda rs: {"kind": "kill", "run_ids": rs}, st.lists(st.sampled_from(runs), max_size=3)),
        st.builds(
            lambda rs: {"kind": "ack", "reports": [[r, "running"] for r in rs]},
            st.lists(st.sampled_from(runs), max_size=3),
        ),
        st.just({"kind": "welcome", "heartbeat_timeout": 0.001, "fence": True}),
    )
    return st.one_of(
        register,
        st.builds(lambda u: {"kind": "heartbeat", "usage": u}, _usage(runs)),
        st.builds(lambda rs: {"kind": "reports", "reports": rs}, st.lists(_reports(runs), max_size=6)),
        answers,
        masters_own,
    )


def _frames(runs: list[str]) -> st.SearchStrategy[bytes | str]:
    """Half well formed (the codec takes them), half broken."""
    valid = _well_formed(runs).map(_pack)
    broken = st.one_of(
        st.sampled_from(sorted(_KINDS)).flatmap(_wrong_types).map(_pack),
        st.fixed_dictionaries(
            {"kind": st.text(max_size=12).filter(lambda k: k not in _KINDS)}, optional={"x": _ANY}
        ).map(_pack),
        _ANY.map(_pack),  # not a frame at all
        st.tuples(valid, st.integers(0, 64)).map(lambda v: v[0][: v[1]]),  # cut short
        st.tuples(valid, st.binary(min_size=1, max_size=8)).map(lambda v: v[0] + v[1]),  # trailing bytes
        st.binary(max_size=256),
        st.text(max_size=256),  # a text frame
    )
    return st.one_of(valid, broken)


def _registers_another(frame: bytes | str) -> bool:
    """A registration as another node: the cluster token lets its holder speak for any node
    (a node certificate binds it to one), so as a first frame it would take that node over."""
    try:
        decoded = wire.decode(frame)  # type: ignore[arg-type]
    except (ValueError, TypeError, KeyError):
        return False
    return isinstance(decoded, wire.Register) and decoded.node.name != FUZZ_NODE


@dataclass
class Batch:
    register: bool  # whether the connection registers first
    frames: list[bytes | str]


def test_bad_frames_from_an_agent_disturb_nothing_else(busy: Bystanders) -> None:
    agent = RawAgent(busy.cluster)
    batches = st.builds(
        Batch,
        st.sampled_from([True, True, True, False]),
        st.lists(_frames(sorted(busy.runs)), min_size=1, max_size=8),
    )

    @given(batch=batches)
    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    def fuzz(batch: Batch) -> None:
        assume(batch.register or not _registers_another(batch.frames[0]))
        agent.dial(batch.register)
        for frame in batch.frames:
            agent.send(frame)
        agent.close()
        assert_unharmed(busy, f"frames {[f[:40] for f in batch.frames]}")

    try:
        fuzz()
    finally:
        agent.close()


def _many_reports(size: int) -> bytes:
    """A reports frame of about `size` bytes, in small reports of runs nobody had."""
    one = {"run_id": "nobody.0.1", "task_id": "nobody.0", "attempt": 1, "state": "running"}
    return _pack({"kind": "reports", "reports": [one] * (size // len(_pack(one)))})


def _one_big_report(size: int) -> bytes:
    """A reports frame of exactly `size` bytes: one report with a long message."""
    frame = {
        "kind": "reports",
        "reports": [
            {"run_id": "nobody.0.1", "task_id": "nobody.0", "attempt": 1, "state": "failed", "message": ""}
        ],
    }
    overhead = len(_pack(frame)) - 1 + 5  # the empty message's 1-byte header becomes 5 bytes
    frame["reports"][0]["message"] = "x" * (size - overhead)
    data = _pack(frame)
    assert len(data) == size
    return data


def _nothing(size: int) -> bytes:
    """A msgpack array of `size` bytes in all, of nils."""
    return b"\xdd" + (size - 5).to_bytes(4, "big") + b"\xc0" * (size - 5)


@pytest.mark.parametrize(
    "make",
    [
        lambda: _one_big_report(CAP - 1),
        lambda: _one_big_report(CAP + 1),
        lambda: _many_reports(CAP - 4096),
        lambda: _pack(
            {"kind": "heartbeat", "usage": {"runs": {f"nobody.{i}.1": {} for i in range(CAP // 24)}}}
        ),
        lambda: _nothing(CAP),
        lambda: b"\x91" * 100_000 + b"\xc0",  # arrays in arrays, 100,000 deep
    ],
    ids=[
        "one-big-report-under",
        "one-big-report-over",
        "many-reports-under",
        "heartbeat-of-many-runs",
        "nils",
        "deep",
    ],
)
def test_frames_near_and_past_the_cap_disturb_nothing_else(busy: Bystanders, make) -> None:
    agent = RawAgent(busy.cluster)
    agent.dial()
    assert agent.ws is not None
    try:
        agent.ws.send(make())
        agent.ws.send(_HEARTBEAT)  # frames are taken in order: its answer says the first is done
        while wire.decode(agent.ws.recv(30)) != wire.Ack(reports=[]):
            pass  # acks and kills of the reports
    except ConnectionClosed:
        pass  # or it hung up on the frame: fair
    finally:
        agent.close()
    assert_unharmed(busy, "a large frame")
