"""Which master a call goes to: the URLs known, the leader believed, and one call's way
through them (`shoal.masters`, pure: time is passed in)."""

from __future__ import annotations

import json
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shoal.masters import (
    LEADER_HEADER,
    MAX_HOPS,
    Failover,
    Masters,
    Unreachable,
    check_url,
    leader_of,
    parse_urls,
)

A, B, C = "http://10.0.0.1:8470", "http://10.0.0.2:8470", "https://m3.example:8470"
FOLLOWING = {"Retry-After": "1", LEADER_HEADER: ""}  # a follower that knows no leader yet

urls = st.builds(
    "{}://{}:{}".format,
    st.sampled_from(["http", "https"]),
    st.sampled_from(["10.0.0.1", "10.0.0.2", "m1.example", "m2", "[::1]"]),
    st.integers(1, 65535),
)


# --- parsing -------------------------------------------------------------------------------


def test_one_url_or_several_are_stripped_and_repeats_dropped() -> None:
    assert parse_urls(A) == [A]
    assert parse_urls(f" {A}/ ,{B}//,{A}") == [A, B]


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("", "an empty entry"),
        (f"{A},,{B}", "an empty entry"),
        (f"{A},", "an empty entry"),
        ("10.0.0.1:8470", "'10.0.0.1:8470' is not a master URL"),
        ("ftp://m1", "'ftp://m1' is not a master URL"),
        (f"{A},http://", "'http://' is not a master URL"),
        ("http://m1:port", "'http://m1:port' is not a master URL"),
        ("http://m1:8470?x=1", "'http://m1:8470?x=1' is not a master URL"),
    ],
)
def test_a_bad_entry_is_refused_by_name(text: str, named: str) -> None:
    with pytest.raises(ValueError, match=re.escape(named)):
        parse_urls(text)


@given(st.lists(urls, min_size=1, max_size=6), st.data())
def test_parsing_keeps_the_first_of_each_url_in_order(given_urls: list[str], data: st.DataObject) -> None:
    spelt = [
        data.draw(st.sampled_from(["", " ", "\t"])) + u + data.draw(st.sampled_from(["", "/", " ", "/ "]))
        for u in given_urls
    ]
    assert parse_urls(",".join(spelt)) == list(dict.fromkeys(given_urls))


# --- the masters known ---------------------------------------------------------------------


def test_calls_go_to_the_first_until_it_fails_then_round_the_others() -> None:
    masters = Masters([A, B, C])
    assert masters.current == A and masters.leader is None
    masters.failed(A)
    assert masters.current == B and masters.candidates() == [B, C, A]
    masters.failed(B)
    masters.failed(C)
    assert masters.current == A


def test_the_leader_goes_first_and_a_new_one_is_added() -> None:
    masters = Masters(f"{A},{B}")
    masters.learned(B)
    assert masters.current == B and masters.candidates() == [B, A]
    masters.learned(C + "/")
    assert masters.urls == [A, B, C] and masters.candidates() == [C, A, B]
    masters.failed(C)  # the leader is lost: back to the masters in turn
    assert masters.leader is None and masters.current == A


def test_a_failure_another_thread_moved_past_moves_nothing_more() -> None:
    masters = Masters([A, B, C])
    masters.failed(A)
    masters.failed(A)  # a second caller that had also tried A
    assert masters.current == B


def test_a_leader_that_is_no_url_is_refused() -> None:
    with pytest.raises(ValueError, match="not a master URL"):
        Masters([A]).learned("m1:8470")
    with pytest.raises(ValueError, match="no master URL given"):
        Masters([])


operations = st.lists(st.tuples(st.sampled_from(["learned", "failed", "add"]), urls), max_size=30)


@given(st.lists(urls, min_size=1, max_size=4), operations)
def test_every_master_known_is_a_candidate_once_and_the_current_comes_first(
    start: list[str], ops: list[tuple[str, str]]
) -> None:
    masters = Masters(start)
    for op, url in ops:
        if op == "add":
            masters.add([url])
        else:
            getattr(masters, op)(url)
        candidates = masters.candidates()
        assert sorted(candidates) == sorted(masters.urls) == sorted(set(masters.urls))
        assert candidates[0] == masters.current
        assert masters.leader in (None, masters.current)


def test_the_list_is_wanted_once_after_a_master_not_given_named_the_leader() -> None:
    masters = Masters([A, B])
    masters.learned(B)
    assert not masters.wants_listing()  # a master given: the configuration is whole
    masters.learned(C)
    assert masters.wants_listing() and not masters.wants_listing()


def test_the_listing_adds_every_master_and_the_leader() -> None:
    masters = Masters([A])
    d = "http://10.0.0.4:8470"
    masters.listed(
        json.dumps(
            [
                {"name": "m1", "url": A, "leader": False},
                {"name": "m4", "url": d, "leader": True},
                {"name": "m3", "url": C, "leader": False},
            ]
        ).encode()
    )
    assert masters.urls == [A, d, C] and masters.current == d


@pytest.mark.parametrize("body", [b"", b"{}", b'{"error": "not found"}', b'[{"url": 3}]', b"[1]"])
def test_a_listing_of_another_shape_changes_nothing(body: bytes) -> None:
    masters = Masters([A])
    masters.listed(body)
    assert masters.urls == [A] and masters.leader is None


def test_the_leader_a_redirect_names() -> None:
    assert leader_of({LEADER_HEADER: B, "Location": f"{B}/v1/jobs"}, "/v1/jobs") == B
    assert leader_of({"Location": f"{B}/v1/jobs/3?limit=5"}, "/v1/jobs/3") == B
    assert leader_of({"Location": "/v1/jobs"}, "/v1/jobs") is None
    assert leader_of({}, "/v1/jobs") is None
    assert check_url(f" {B}/ ") == B


# --- one call --------------------------------------------------------------------------------


def call(masters: Masters, *, safe: bool = False, within: float = 15.0, path: str = "/v1/jobs") -> Failover:
    return Failover(masters, path, safe=safe, now=0.0, within=within)


def test_a_redirect_is_followed_at_once_and_the_leader_kept() -> None:
    masters = Masters([A, B])
    route = call(masters)
    assert route.answered(A, 307, {LEADER_HEADER: C, "Location": f"{C}/v1/jobs"}, 0.0) == 0.0
    assert masters.current == C
    assert route.answered(C, 201, {}, 0.0) is None


def test_redirects_round_in_circles_give_up_naming_them() -> None:
    masters = Masters([A, B])
    route = call(masters)
    for hop in range(MAX_HOPS):
        url, other = (A, B) if hop % 2 == 0 else (B, A)
        assert route.answered(url, 307, {LEADER_HEADER: other}, 0.0) == 0.0
    with pytest.raises(Unreachable, match=f"round in circles \\({A} -> {B} -> {A}"):
        route.answered(A, 307, {LEADER_HEADER: B}, 0.0)


def test_a_redirect_that_names_no_leader_is_an_error() -> None:
    with pytest.raises(Unreachable, match="without naming the leader"):
        call(Masters([A])).answered(A, 307, {}, 0.0)


def test_a_master_down_is_passed_for_the_next_then_rounds_pause_longer_until_the_deadline() -> None:
    masters = Masters([A, B])
    route = call(masters, within=1.0)
    assert route.broke(A, "connection refused", sent=False, now=0.0) == 0.0  # B is untried
    assert masters.current == B
    pauses = [route.broke(B, "connection refused", sent=False, now=0.0)]
    for _ in range(3):
        assert route.broke(masters.current, "connection refused", sent=False, now=0.0) == 0.0
        pauses.append(route.broke(masters.current, "connection refused", sent=False, now=0.0))
    assert pauses == [0.05, 0.1, 0.2, 0.4]
    with pytest.raises(
        Unreachable, match=f"within 1s \\({A}: connection refused; {B}: connection refused\\)"
    ):
        route.broke(masters.current, "connection refused", sent=False, now=1.0)


def test_the_pause_never_runs_past_the_deadline_nor_past_a_second() -> None:
    masters = Masters([A])
    route = call(masters, within=30.0)
    pauses = [route.answered(A, 503, FOLLOWING, 0.0) for _ in range(8)]
    assert max(pauses) == 1.0  # type: ignore[type-var]
    assert call(masters, within=0.3).answered(A, 503, FOLLOWING, 0.25) == pytest.approx(0.05)


def test_a_single_master_that_is_down_fails_the_call_at_once() -> None:
    with pytest.raises(Unreachable, match=f"no master answers at {A} \\(connection refused\\)"):
        call(Masters([A])).broke(A, "connection refused", sent=False, now=0.0)


def test_a_single_master_in_an_election_is_waited_for() -> None:
    masters = Masters([A])
    route = call(masters, within=15.0)
    assert route.answered(A, 503, FOLLOWING, 0.0) == 0.05
    assert route.answered(A, 307, {LEADER_HEADER: B}, 0.1) == 0.0
    assert masters.current == B


def test_a_write_whose_answer_was_lost_is_not_repeated() -> None:
    with pytest.raises(Unreachable, match="may or may not have been carried out"):
        call(Masters([A, B])).broke(A, "server disconnected", sent=True, now=0.0)
    masters = Masters([A, B])
    assert call(masters, safe=True).broke(A, "server disconnected", sent=True, now=0.0) == 0.0
    assert masters.current == B


def test_a_deposed_leaders_503_is_a_writes_answer_but_a_read_goes_again() -> None:
    deposed = {"Retry-After": "1"}
    assert call(Masters([A, B])).answered(A, 503, deposed, 0.0) is None
    assert call(Masters([A, B]), safe=True).answered(A, 503, deposed, 0.0) == 0.0
    assert call(Masters([A, B])).answered(A, 503, FOLLOWING, 0.0) == 0.0
    assert call(Masters([A, B]), safe=True).answered(A, 503, {}, 0.0) is None  # a node away, say
