"""The event log hands each reader the events after its index, in order, none twice and
none missed, or says plainly that it no longer holds them; a user's filter lets through only
their own jobs' events (their removal too) and the cluster's public ones; a node's stream
sees a task leave it; a stream whose filter admits none of a busy master's events still
hears, in time, the index it would resume after."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shoal.config import MasterSettings
from shoal.master import broadcast
from shoal.master.broadcast import Broadcast
from shoal.master.events import Persist
from shoal.master.opening import open_master
from shoal.master.store.sqlite import SqliteStore
from shoal.master.stream import PUBLIC, EventLog, Filter, Gone, Known, record_changes
from shoal.model import JobRecord, JobSpec, TaskRecord, TaskState
from shoal.sse import TOPICS, events

BASE = 1_000_000


def _data(event_frame: bytes) -> dict:
    (line,) = [x for x in event_frame.decode().splitlines() if x.startswith("data: ")]
    return json.loads(line.removeprefix("data: "))


@given(
    st.lists(st.lists(st.integers(0, 300), max_size=20), max_size=30),  # sizes appended between reads
    st.integers(1, 16),  # capacity
    st.integers(1, 4000),  # bytes
    st.data(),
)
def test_a_reader_gets_every_event_after_its_index_once_or_is_told_they_are_gone(
    bursts: list[list[int]], capacity: int, max_bytes: int, data: st.DataObject
) -> None:
    log = EventLog(base=BASE, capacity=capacity, max_bytes=max_bytes)
    kept: collections.deque[tuple[int, int]] = collections.deque()  # (index, bytes), as the log should
    appended: list[int] = []
    cursor = BASE
    had: list[int] = []
    for burst in bursts:
        for size in burst:
            event = log.append("tasks", "changed", {"pad": "x" * size}, 0.0)
            appended.append(event.index)
            kept.append((event.index, len(event.frame)))
            while len(kept) > capacity or (len(kept) > 1 and sum(b for _, b in kept) > max_bytes):
                kept.popleft()
        assert (log.first, log.bytes) == (kept[0][0] if kept else BASE + 1, sum(b for _, b in kept))
        if data.draw(st.booleans()):
            continue  # this reader lets the log run on
        if kept and cursor < kept[0][0] - 1:
            with pytest.raises(Gone) as gone:
                log.after(cursor)
            assert gone.value.oldest == kept[0][0] and "at most" in str(gone.value)
            cursor = gone.value.oldest - 1  # resumes from what is held, knowingly
            had = [i for i in had if i <= cursor]
            continue
        for event in log.after(cursor):
            assert _data(event.frame)["index"] == event.index
            had.append(event.index)
            cursor = event.index
    assert had == sorted(set(had)), "an event twice or out of order"
    assert all(i in appended for i in had)
    assert log.last == (appended[-1] if appended else BASE)


def test_the_log_keeps_the_newest_events_that_fit_its_bytes_and_the_newest_however_large() -> None:
    log = EventLog(base=BASE, capacity=100, max_bytes=1000)
    small = [log.append("jobs", "changed", {}, 0.0) for _ in range(5)]
    assert log.first == small[0].index  # five small frames fit
    large = log.append("jobs", "changed", {"pad": "x" * 5000}, 0.0)
    assert (log.first, log.bytes) == (large.index, len(large.frame))  # alone, over the bytes
    with pytest.raises(Gone, match=f"holds the events after {small[-1].index}"):
        log.after(small[0].index)
    assert [e.index for e in log.after(small[-1].index)] == [large.index]


def test_an_index_this_log_never_gave_is_gone() -> None:
    log = EventLog(base=BASE)
    log.append("jobs", "changed", {}, 0.0)
    with pytest.raises(Gone, match="list afresh"):
        log.after(5)  # an earlier master's
    with pytest.raises(Gone):
        log.after(BASE + 10)  # not given yet
    assert [e.index for e in log.after(BASE)] == [BASE + 1]


def test_the_frames_read_back_as_they_were_made() -> None:
    log = EventLog(base=BASE)
    job = JobRecord(id=7, owner="alice", spec=JobSpec(name="x", command=["true"]), submitted_at=1.0)
    task = TaskRecord(id="7.0", job_id=7, index=0, node="n1")
    changes = Persist(jobs=(job,), tasks=(task,), forgotten_jobs=(3,))
    record_changes(log, changes, {7: "alice"}.get, 2.0, Known())
    lines = b"".join(e.frame for e in log.after(BASE)).decode().splitlines()
    read = list(events(lines))
    assert [(e.topic, e.type, e.job, e.node) for e in read] == [
        ("jobs", "changed", 7, None),
        ("jobs", "removed", 3, None),
        ("tasks", "changed", 7, "n1"),
    ]
    assert read[0].record["owner"] == "alice" and read[2].record["id"] == "7.0"
    assert [e.index for e in read] == [BASE + 1, BASE + 2, BASE + 3]


@given(st.sampled_from(TOPICS), st.sampled_from(["alice", "bob", None]), st.sampled_from(["alice", None]))
def test_a_user_sees_their_own_jobs_and_the_public_topics_only(
    topic: str, owner: str | None, user: str | None
) -> None:
    log = EventLog(base=BASE)
    event = log.append(topic, "changed", {}, 0.0, owner=owner)
    admitted = Filter(user=user).admits(event)
    if user is None:
        assert admitted  # admins and readers see all
    elif owner is not None:
        assert admitted == (owner == user)
    else:
        assert admitted == (topic in PUBLIC)


# A task's life across nodes: (state, node) after each change, the node it left by then.
WANDERS = [
    (TaskState.ASSIGNED, "n1", None),
    (TaskState.RUNNING, "n1", None),
    (TaskState.PENDING, None, "n1"),  # its node lost: to run again
    (TaskState.ASSIGNED, "n2", None),  # placed again
    (TaskState.RUNNING, "n3", "n2"),  # moved: its new copy took over
    (TaskState.PREEMPTED, "n3", None),  # ended where it was: its node names it
    (TaskState.ASSIGNED, "n1", None),
]


def test_a_task_that_leaves_a_node_is_seen_to_go_by_a_stream_of_that_node() -> None:
    log, known = EventLog(base=BASE), Known()
    for state, node, _ in WANDERS:
        task = TaskRecord(id="7.0", job_id=7, index=0, state=state, node=node)
        record_changes(log, Persist(tasks=(task,)), {7: "alice"}.get, 0.0, known)
    read = list(events(b"".join(e.frame for e in log.after(BASE)).decode().splitlines()))
    assert [(e.node, e.left) for e in read] == [(node, left) for _, node, left in WANDERS]
    for name in ("n1", "n2", "n3"):
        seen = [e.index for e in log.after(BASE) if Filter(node=name).admits(e)]
        held = [i for i, (_, node, left) in enumerate(WANDERS) if name in (node, left)]
        assert seen == [BASE + 1 + i for i in held]
    assert known.on == {"7.0": "n1"}  # active tasks alone are kept


def test_the_nodes_of_tasks_active_before_the_log_knew_them_are_learnt_from_the_ledger() -> None:
    log, known = EventLog(base=BASE), Known()
    running = [TaskRecord(id=f"7.{i}", job_id=7, index=i, state=TaskState.RUNNING, node="n4") for i in (0, 1)]
    known.learn([], running)
    lost = TaskRecord(id="7.0", job_id=7, index=0, state=TaskState.PENDING)  # to run again
    record_changes(log, Persist(tasks=(lost,)), {7: "alice"}.get, 0.0, known)
    assert [e.left for e in log.after(BASE)] == ["n4"]
    known.learn([], running)  # once only: what the events said since stands
    assert known.on == {"7.1": "n4"}


def _job(job_id: int, owner: str) -> JobRecord:
    return JobRecord(id=job_id, owner=owner, spec=JobSpec(command=["true"]), submitted_at=0.0)


def test_a_master_taking_its_ledger_knows_what_tags_its_first_events(tmp_path: Path) -> None:
    """A master that starts, or takes over, on a ledger learns its jobs' owners and its active
    tasks' nodes before its first change: the first batch's events are tagged as any other."""
    settings = MasterSettings(state_dir=tmp_path, insecure=True)
    running = TaskRecord(id="7.0", job_id=7, index=0, state=TaskState.RUNNING, node="n4")
    SqliteStore(tmp_path / "shoal.db").apply(Persist(jobs=(_job(7, "alice"),), tasks=(running,)))
    known = open_master(settings).broadcast.known
    assert known.owners == {7: "alice"} and known.on == {"7.0": "n4"}


def test_a_user_sees_their_own_jobs_removed_and_no_one_elses() -> None:
    log, known = EventLog(base=BASE), Known()
    known.learn([_job(1, "alice"), _job(2, "bob")], [])  # in the ledger before the log began
    record_changes(log, Persist(jobs=(_job(3, "alice"), _job(4, "bob"))), {}.get, 0.0, known)
    record_changes(log, Persist(forgotten_jobs=(1, 2, 3, 4, 5)), {}.get, 0.0, known)
    removed = [e for e in log.after(BASE) if e.topic == "jobs" and b'"removed"' in e.frame]
    assert [e.job for e in removed if Filter(user="alice").admits(e)] == [1, 3]
    assert [e.job for e in removed if Filter(user="bob").admits(e)] == [2, 4]
    assert [e.job for e in removed if Filter().admits(e)] == [1, 2, 3, 4, 5]  # 5: no owner known
    assert known.owners == {}  # kept until the removal, not after


def test_filters_by_topic_job_and_node() -> None:
    log = EventLog(base=BASE)
    a = log.append("tasks", "changed", {}, 0.0, job=1, node="n1", owner="u")
    b = log.append("tasks", "changed", {}, 0.0, job=2, node="n2", owner="u")
    c = log.append("nodes", "changed", {}, 0.0, node="n1")
    assert [e for e in (a, b, c) if Filter(topics=frozenset({"tasks"}), job=2).admits(e)] == [b]
    assert [e for e in (a, b, c) if Filter(node="n1").admits(e)] == [a, c]


def _follow_while_busy(which: Filter, seconds: float, log: EventLog | None = None) -> tuple[list[int], int]:
    """The indexes a stream said it stands after (its head's and its keep-alives') while a
    busy master appended events the filter does not admit, and the master's last index. Any
    server-sent-events reader hears them: each is an `id:` as well as a comment."""

    async def scenario() -> tuple[list[int], int]:
        hub = Broadcast()
        hub.log = log or hub.log
        told: list[int] = []
        frames = hub.follow(hub.log.last, which, "alice")

        async def read() -> None:
            async for chunk in frames:
                lines, before = chunk.decode().splitlines(), len(told)
                assert not list(events(lines, told.append)), "an event the filter does not admit"
                ids = [int(line.removeprefix("id: ")) for line in lines if line.startswith("id: ")]
                assert ids == told[before:]

        reader = asyncio.create_task(read())
        loop = asyncio.get_running_loop()
        end = loop.time() + seconds
        while loop.time() < end:
            for _ in range(4):
                hub.log.append("tasks", "changed", {}, 0.0, job=6, node="n2")
            hub.wake()
            await asyncio.sleep(0.005)
        await asyncio.sleep(0.05)
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reader
        return told, hub.log.last

    return asyncio.run(scenario())


def test_a_filtered_stream_on_a_busy_master_hears_where_it_stands(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(broadcast, "KEEP_ALIVE", 0.2)
    monkeypatch.setattr(broadcast, "WAKE_EVERY", 0.01)
    told, last = _follow_while_busy(Filter(job=5), 1.0)
    # Woken a hundred times a second, with nothing for it: the keep-alives go out still,
    # each with the index the stream reached, and a reconnect would resume from there.
    assert len(told) >= 3 and told == sorted(set(told))
    assert last - told[-1] < (last - told[0]) / 2  # the last one within the last fifth of a second or so


def test_a_filtered_stream_hears_where_it_stands_before_the_log_lets_its_index_go(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(broadcast, "WAKE_EVERY", 0.01)
    log = EventLog(base=BASE, capacity=64)
    told, last = _follow_while_busy(Filter(node="n1"), 1.0, log)
    assert last - BASE > 4 * 64  # the log turned over a few times meanwhile
    gaps = [b - a for a, b in zip(told, told[1:], strict=False)]
    assert max(gaps) <= 64, "an index the stream would resume after was let go before a newer was told"
    log.after(told[-1])  # still held (else Gone): a reconnect resumes there


def test_a_stream_is_counted_from_its_admission_until_it_ends_or_is_dropped_unread() -> None:
    async def scenario() -> None:
        hub = Broadcast()
        read, unread = (hub.follow(hub.log.last, Filter(), "alice") for _ in range(2))
        assert hub.subscribers == 2 and hub.held == {"alice": 2}  # before either is read
        await anext(read)
        await read.aclose()
        assert hub.subscribers == 1 and hub.held == {"alice": 1}
        del unread  # the answer was never sent: nothing ran it
        assert hub.subscribers == 0 and not hub.held

    asyncio.run(scenario())


def test_a_write_holds_about_a_megabyte_of_frames_at_most_and_the_rest_follows() -> None:
    async def scenario() -> list[bytes]:
        hub = Broadcast()
        frames = hub.follow(hub.log.last, Filter(), "alice")
        await anext(frames)  # the head
        for n in range(5):
            hub.log.append("jobs", "changed", {"n": n, "spec": "x" * 400_000}, 0.0, job=n + 1)
        return [await anext(frames) for _ in range(2)]

    writes = asyncio.run(scenario())
    assert [w.count(b"\nevent: jobs") for w in writes] == [3, 2]  # cut past 1 MiB, then the rest at once
    assert max(map(len, writes)) < broadcast.CHUNK_BYTES + 500_000
