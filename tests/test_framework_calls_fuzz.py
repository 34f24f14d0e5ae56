"""Bad calls and subscriptions of a framework are refused (4xx, never 5xx) and disturb
nothing else.

A second framework (the user mallory's) sends calls hypothesis makes to a master busy with
real work (`shoal.testing.bystanders`): bodies of the wrong types, offers that do not exist
or are the other framework's, tasks it does not have, calls to frameworks that are another's,
ended or none, huge bodies; and subscriptions that are garbage, take up another's framework
or an ended one, or name a role it is not granted. After each batch the work goes on
unharmed, and both frameworks' streams with it.
"""

from __future__ import annotations

import json
import typing
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import TypeAdapter, ValidationError

from shoal.framework import Scheduler
from shoal.framework import protocol as fp
from shoal.testing.bystanders import Bystanders, assert_unharmed, bystanders
from shoal.testing.live import wait_for
from shoal.testing.recorder import Recorder

pytestmark = pytest.mark.timeout(120)

MAX_BODY = 4 << 20  # bytes of a call's body, at most (the master's max_body)


@dataclass
class Intruder:
    """Mallory, her framework, and the bystanders she must not disturb."""

    bystanders: Bystanders
    http: httpx.Client  # with mallory's token
    frameworks: dict[str, str]  # bystander (alice's), intruder (mallory's), gone (ended): ids


@pytest.fixture(scope="module")
def mallory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Intruder]:
    root = Path(tmp_path_factory.mktemp("calls"))
    with bystanders(root, {"max_body": str(MAX_BODY)}) as b:
        token = b.user_token("mallory")
        framework = Recorder(on_offers=lambda d, offers: d.decline([o.id for o in offers], 1.0))
        intruder = b.subscribe(framework, "intruder", token)
        gone = b.subscribe(Scheduler(), "gone", token)
        gone.stop()
        b.watched.append(framework)
        frameworks = {"bystander": b.framework_id, "intruder": str(intruder.framework_id)}
        frameworks["gone"] = str(gone.framework_id)
        headers = {"Authorization": f"Bearer {token}"}
        try:
            with httpx.Client(base_url=b.cluster.url, headers=headers, timeout=10) as http:
                yield Intruder(b, http, frameworks)
        finally:
            intruder.stop(failover=True)


_NAMES = st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9._-]{0,20}\Z")
_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=16),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
_CALL_FIELDS = {name for cls in typing.get_args(typing.get_args(fp.Call)[0]) for name in cls.model_fields}
_TASK = {"name": "t1", "command": "sleep 600", "resources": {"cpus": 0.1, "mem": 16}}


def _refused(adapter: TypeAdapter, value: object) -> bool:
    try:
        adapter.validate_python(value)
    except ValidationError:
        return True
    return False


def _malformed(adapter: TypeAdapter, fields: Iterable[str]) -> st.SearchStrategy[object]:
    """Bodies `adapter` refuses: any JSON, or objects of the known `fields` with any values."""
    shaped = st.fixed_dictionaries({}, optional={**{name: _JSON for name in fields}, "extra": _JSON})
    return (shaped | _JSON).filter(lambda body: _refused(adapter, body))


def _valid_calls() -> st.SearchStrategy[dict]:
    """Calls that are good in themselves, sent where they are not (a framework not one's own,
    or ended)."""
    return st.one_of(
        st.builds(
            lambda ids: {"type": "accept", "offer_ids": ids, "tasks": [_TASK]}, st.lists(_NAMES, min_size=1)
        ),
        st.builds(lambda ids: {"type": "decline", "offer_ids": ids}, st.lists(_NAMES, min_size=1)),
        st.sampled_from([{"type": t} for t in ("suppress", "revive", "teardown", "reconcile")]),
        st.builds(lambda name: {"type": "kill", "task": name}, st.just("steady-fw") | _NAMES),
        st.builds(lambda ids: {"type": "acknowledge", "uuids": ids}, st.lists(_NAMES, min_size=1)),
    )


@dataclass
class Call:
    framework: str  # a key of Intruder.frameworks, or an id of none
    body: object
    raw: bool = False  # the body is the JSON text itself


def _calls(theirs: list[str]) -> st.SearchStrategy[Call]:
    """Calls that must be refused: bad bodies to its own framework, offers that are not its
    own (`theirs`: the bystander's), tasks it does not have; and any call to a framework
    that is another's or ended, or that does not exist."""
    offers = st.lists(st.sampled_from(theirs) | _NAMES, min_size=1, max_size=3)
    own = st.one_of(
        _malformed(fp.CALL, _CALL_FIELDS),
        st.builds(lambda ids: {"type": "accept", "offer_ids": ids, "tasks": [_TASK]}, offers),
        st.builds(lambda name: {"type": "kill", "task": name}, st.just("steady-fw") | _NAMES),
    ).map(lambda body: Call("intruder", body))
    not_json = st.text(max_size=64).map(lambda text: Call("intruder", text, raw=True))
    nobody = st.text(min_size=1, max_size=70).filter(lambda fw: fw not in (".", ".."))  # no path of its own
    elsewhere = st.builds(Call, st.sampled_from(["bystander", "gone"]) | nobody, _valid_calls())
    return own | not_json | elsewhere


def _subscriptions(m: Intruder) -> st.SearchStrategy[object]:
    """Subscriptions that must be refused: bodies that are none, another's framework or an
    ended one taken up, roles not granted."""
    named = st.builds(
        lambda fw, name: {"name": name, "framework_id": fw},
        st.sampled_from([m.frameworks["bystander"], m.frameworks["gone"]]) | _NAMES,
        st.text(min_size=1, max_size=16),
    )
    role = st.builds(
        lambda r: {"name": "x", "role": r},
        st.from_regex(r"\A[a-z][a-z0-9_-]{0,31}\Z").filter(lambda r: r != "default"),
    )
    return _malformed(TypeAdapter(fp.Subscribe), fp.Subscribe.model_fields) | named | role


def _post(m: Intruder, path: str, body: object, raw: bool = False) -> tuple[int, bytes]:
    """POST `body` as mallory; the status and the body (a stream is read no further)."""
    content = body.encode() if raw else json.dumps(body).encode()
    with m.http.stream("POST", path, content=content, headers={"Content-Type": "application/json"}) as answer:
        return answer.status_code, answer.read() if answer.status_code != 200 else b""


def _call_path(m: Intruder, framework: str) -> str:
    return f"/v1/frameworks/{quote(m.frameworks.get(framework, framework), safe='')}/call"


def assert_refused(status: int, body: bytes, what: str) -> None:
    assert 400 <= status < 500, f"{what}: {status} {body[:300]!r}"
    assert "error" in json.loads(body), f"{what}: {status} {body[:300]!r}"


def test_bad_calls_and_subscriptions_are_refused_and_disturb_nothing_else(mallory: Intruder) -> None:
    held = mallory.bystanders.framework.outstanding
    theirs = wait_for(lambda: [o.id for o in held()], what="offers the bystander holds")
    calls = st.lists(_calls(theirs), min_size=1, max_size=4)

    @given(calls=calls, subscriptions=st.lists(_subscriptions(mallory), max_size=2))
    @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    def fuzz(calls: list[Call], subscriptions: list[object]) -> None:
        for call in calls:
            status, body = _post(mallory, _call_path(mallory, call.framework), call.body, call.raw)
            assert_refused(status, body, f"{call.framework}: {call.body!r}")
        for subscription in subscriptions:
            status, body = _post(mallory, "/v1/frameworks/subscribe", subscription)
            assert_refused(status, body, f"subscribe {subscription!r}")
        assert_unharmed(mallory.bystanders, f"calls {calls!r} and subscriptions {subscriptions!r}")

    fuzz()


@pytest.mark.parametrize(
    ("framework", "make"),
    [
        ("intruder", lambda: {"type": "decline", "offer_ids": ["o"] * 10_001}),
        ("intruder", lambda: {"type": "acknowledge", "uuids": ["u" * 128] * 10_001}),
        ("intruder", lambda: {"type": "reconcile", "tasks": ["t"] * 100_001}),
        ("intruder", lambda: {"type": "kill", "task": "t" * (1 << 20)}),
        ("intruder", lambda: {"type": "accept", "offer_ids": ["o"], "tasks": [_TASK] * 10_001}),
        ("intruder", lambda: {"type": "suppress", "extra": "x" * (MAX_BODY + 1)}),
        ("intruder", lambda: "[" * 100_000 + "]" * 100_000),
        ("gone", lambda: {"type": "reconcile", "tasks": ["t"] * 100_000}),
    ],
    ids=["decline", "acknowledge", "reconcile", "kill", "accept", "past-max-body", "deep", "gone"],
)
def test_huge_calls_are_refused_and_disturb_nothing_else(mallory: Intruder, framework: str, make) -> None:
    body = make()
    status, answer = _post(mallory, _call_path(mallory, framework), body, raw=isinstance(body, str))
    assert_refused(status, answer, f"a huge call to {framework}")
    assert_unharmed(mallory.bystanders, f"a huge call to {framework}")
