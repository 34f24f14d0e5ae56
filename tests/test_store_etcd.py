"""The store on etcd, against real etcd members: after the same applies it loads exactly what
SqliteStore loads; a Persist is atomic whatever its size; a deposed leader writes nothing;
snapshots keep the log short; tokens and audit records behave as SQLite's."""

from __future__ import annotations

import secrets
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from hypothesis import Phase, given, settings
from hypothesis import strategies as st

from shoal.framework.protocol import FrameworkRecord, TaskStatus
from shoal.master.events import FromAgent, Persist, Submit, Tick
from shoal.master.ledger import Retention
from shoal.master.state import MasterState
from shoal.master.store import AuditQuery, Deposed, TokenEntry
from shoal.master.store.etcd import EtcdStore
from shoal.master.store.gateway import (
    EtcdError,
    EtcdUnavailable,
    Gateway,
    absent,
    parse_store_url,
    prefix_end,
    put_op,
)
from shoal.master.store.sqlite import SqliteStore
from shoal.model import JobRecord, JobSpec, Migrate, Migration, NodeRecord, Role, TaskRecord, TaskState
from shoal.services import Registration, RegistrationRecord
from shoal.shell.protocol import AuditRecord
from shoal.testing.etcd import EtcdCluster
from shoal.testing.live import free_port
from shoal.testing.sim import sim_node
from shoal.wire import Register, RunReport, RunReports

pytestmark = pytest.mark.skipif(shutil.which("etcd") is None, reason="etcd is not installed (make test does)")


@pytest.fixture(scope="module")
def etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdCluster]:
    with EtcdCluster(1, tmp_path_factory.mktemp("etcd")) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def gateway(etcd: EtcdCluster) -> Iterator[Gateway]:
    gateway = Gateway(etcd.endpoints)
    yield gateway
    gateway.close()


@dataclass
class Space:
    """A prefix of its own for one test, and the leadership held in it."""

    gateway: Gateway
    prefix: str
    leader_key: bytes
    fence: int

    def store(self, fence: int | None = None, **options: int) -> EtcdStore:
        return EtcdStore(
            self.gateway,
            self.prefix,
            fence=self.fence if fence is None else fence,
            leader_key=self.leader_key,
            **options,
        )

    def count(self, under: str) -> int:
        key = f"{self.prefix}{under}"
        return self.gateway.range(key, prefix_end(key), keys_only=True).count

    def put(self, name: str, value: bytes) -> None:
        self.gateway.put(f"{self.prefix}{name}", value)


def lead(gateway: Gateway, leader_key: bytes) -> int:
    """Take the leadership key; its create_revision, the fence."""
    result = gateway.txn([absent(leader_key)], [put_op(leader_key, b"me")])
    assert result.succeeded
    return result.revision


def new_space(gateway: Gateway) -> Space:
    prefix = f"/t/{secrets.token_hex(4)}/"
    leader_key = f"{prefix}leader".encode()
    return Space(gateway, prefix, leader_key, lead(gateway, leader_key))


@pytest.fixture
def space(gateway: Gateway) -> Space:
    return new_space(gateway)


def both(persists: list[Persist], etcd_store: EtcdStore) -> SqliteStore:
    """Apply `persists` to `etcd_store` and to a new SqliteStore; the latter."""
    sqlite = SqliteStore(":memory:", fsync=False)
    for persist in persists:
        sqlite.apply(persist)
        etcd_store.apply(persist)
    return sqlite


# --- records ------------------------------------------------------------------------------


def job(i: int) -> JobRecord:
    return JobRecord(id=i, owner="alice", spec=JobSpec(command="true", count=2), submitted_at=float(i))


def task(job_id: int, index: int, state: TaskState = TaskState.PENDING, message: str = "") -> TaskRecord:
    return TaskRecord(id=f"{job_id}.{index}", job_id=job_id, index=index, state=state, message=message)


def node(name: str, load: float = 0.0) -> NodeRecord:
    return NodeRecord(info=sim_node(name), load=load)


def framework(name: str) -> FrameworkRecord:
    return FrameworkRecord(
        id=name, name=name, principal="p", role="default", failover_timeout=60.0, registered_at=0.0
    )


def update(uuid: str, task_id: str = "1.0", state: TaskState = TaskState.RUNNING) -> TaskStatus:
    return TaskStatus(task=task_id, state=state, job_id=int(task_id.split(".")[0]), uuid=uuid)


def migration(i: int, failed: str = "") -> Migration:
    return Migration(
        id=i, at=0.0, task_id="1.0", job_id=1, source="n1", target="n2", reason="hot", mode=Migrate.RESTART
    ).model_copy(update={"failed": failed})


def registration(rid: str, port: int = 80) -> RegistrationRecord:
    return RegistrationRecord(
        owner="alice", spec=Registration(id=rid, name="web", address="10.0.0.1", port=port)
    )


VARIED = [
    Persist(
        jobs=(job(1), job(2), job(3)),
        tasks=(task(1, 0), task(1, 1), task(2, 0), task(3, 0)),
        nodes=(node("n1"), node("n2")),
        frameworks=(framework("f1"),),
        updates=(("f1", update("u1")), ("f1", update("u2")), ("f1", update("u3"))),
        counters=(("job", 4),),
    ),
    Persist(
        tasks=(task(1, 0, TaskState.RUNNING),),  # an upsert: it moves to the end, as in SQLite
        updates=(("f1", update("u1", state=TaskState.FINISHED)),),
        acked=("u2",),
        migrations=(migration(2), migration(1)),
        registrations=(registration("r1"), registration("r2")),
    ),
    Persist(
        nodes=(node("n1", load=50.0),),
        forgotten_jobs=(2,),
        forgotten_migrations=(1,),
        forgotten_registrations=("r1",),
        counters=(("job", 5), ("migration", 3)),
    ),
    Persist(  # written and forgotten in one Persist: SQLite's order of statements decides
        jobs=(job(4),),
        tasks=(task(4, 0), task(4, 1)),
        updates=(("f1", update("u4")),),
        acked=("u4", "nobody"),
        migrations=(migration(3, failed="no room"),),
        forgotten_jobs=(4, 99),
        forgotten_migrations=(3,),
        registrations=(registration("r3"),),
        forgotten_registrations=("r3",),
        frameworks=(framework("f2"),),
    ),
]


def test_varied_persists_load_back_as_sqlite_loads_them(space: Space) -> None:
    sqlite = both(VARIED, space.store())
    expected = sqlite.load()
    assert space.store().load() == expected
    assert [t.id for t in expected.tasks] == ["1.1", "3.0", "1.0"]  # the order is SQLite's too
    assert [u.uuid for _, u in expected.updates] == ["u3", "u1"]


def test_the_ledgers_own_persists_load_back_as_sqlite_loads_them(space: Space) -> None:
    state = MasterState(heartbeat_timeout=1e9, retention=Retention(age=0, count=1))
    persists: list[Persist] = []

    def handle(*events: object) -> None:
        persists.extend(c for c in state.handle(*events) if isinstance(c, Persist))

    handle(FromAgent("n1", Register(node=sim_node("n1", cpus=8)), 0.0))
    for i in range(1, 4):
        handle(Submit(i, "alice", JobSpec(command="true", count=2, resources={"cpus": 1}), float(i)))
        for index in (0, 1):
            run = RunReport(
                run_id=f"{i}.{index}.0",
                task_id=f"{i}.{index}",
                attempt=0,
                state=TaskState.FINISHED,
                exit_code=0,
            )
            handle(FromAgent("n1", RunReports(reports=[run]), 5.0 + i))
    handle(Tick(100.0))  # finished jobs past retention are forgotten with their tasks
    assert any(p.forgotten_jobs for p in persists)
    sqlite = both(persists, space.store())
    assert space.store().load() == sqlite.load()


def test_a_persist_larger_than_a_part_is_atomic_and_loads_back(space: Space) -> None:
    big = Persist(jobs=(job(1),), tasks=tuple(task(1, i, message=secrets.token_hex(8)) for i in range(2_000)))
    store = space.store(chunk_bytes=2048)
    sqlite = both([big, VARIED[0]], store)
    assert space.count("part/0000000000000001/") > 10  # in parts, and still one entry
    assert space.count("log/") == 2
    assert space.store().load() == sqlite.load()


def test_a_persist_of_20000_tasks_with_the_default_part_size(space: Space) -> None:
    # Random messages keep it large once compressed: more than one part of 1 MiB.
    tasks = tuple(task(1 + i // 1000, i % 1000, message=secrets.token_hex(64)) for i in range(20_000))
    big = Persist(jobs=tuple(job(j) for j in range(1, 21)), tasks=tasks)
    store = space.store()
    began = time.perf_counter()
    sqlite = both([big], store)
    assert time.perf_counter() - began < 30
    assert space.count("part/") >= 2
    loaded = space.store().load()
    assert loaded == sqlite.load() and len(loaded.tasks) == 20_000


def test_no_transaction_is_too_large_however_many_records_one_persist_changes(space: Space) -> None:
    # etcd refuses a transaction of more than 128 operations: a successful apply proves none was.
    persists = [
        Persist(jobs=tuple(job(i) for i in range(1, 1001)), tasks=tuple(task(i, 0) for i in range(1, 1001))),
        Persist(forgotten_jobs=tuple(range(1, 901)), acked=tuple(f"u{i}" for i in range(500))),
    ]
    sqlite = both(persists, space.store())
    loaded = space.store().load()
    assert loaded == sqlite.load() and len(loaded.jobs) == 100


def test_a_stale_fence_is_refused_and_changes_nothing(space: Space) -> None:
    old = space.store()
    sqlite = both(VARIED[:2], old)
    old.add_audit(AuditRecord(at=1.0, who="admin", command="true", nodes="n1"))
    before = space.gateway.range(space.prefix, prefix_end(space.prefix))
    # Another master takes over: the key is deleted and made again, with a new create_revision.
    space.gateway.delete_range(space.leader_key)
    fence = lead(space.gateway, space.leader_key)
    with pytest.raises(Deposed, match="no longer the leader"):
        old.apply(VARIED[2])
    with pytest.raises(Deposed):
        old.put_tokens({"d": TokenEntry("eve", Role.ADMIN)})
    with pytest.raises(Deposed):
        old.add_audit(AuditRecord(at=2.0, who="admin", command="true", nodes="n1"))
    after = space.gateway.range(space.prefix, prefix_end(space.prefix))
    assert [kv for kv in after.kvs if kv.key != space.leader_key] == [
        kv for kv in before.kvs if kv.key != space.leader_key
    ]
    new = space.store(fence=fence)
    assert new.load() == sqlite.load()
    new.apply(VARIED[2])
    sqlite.apply(VARIED[2])
    assert space.store(fence=fence).load() == sqlite.load()


def test_a_store_opened_to_read_writes_nothing(space: Space) -> None:
    with pytest.raises(Deposed):
        space.store(fence=0).apply(VARIED[0])
    assert space.count("log/") == 0


def test_a_torn_entry_is_ignored_and_overwritten(space: Space) -> None:
    store = space.store(chunk_bytes=1024)
    sqlite = both([VARIED[0]], store)
    # A leader died after writing the parts of entry 2 and before the entry itself.
    for n in range(3):
        space.put(f"part/0000000000000002/{n:06d}", b"torn")
    assert space.store().load() == sqlite.load()
    store = space.store(chunk_bytes=1024)
    store.load()
    store.apply(VARIED[1])  # inline: the torn parts of its seq go
    sqlite.apply(VARIED[1])
    assert space.count("part/") == 0
    # Again at entry 3, with more torn parts than the real entry has.
    for n in range(40):
        space.put(f"part/0000000000000003/{n:06d}", b"torn")
    big = Persist(tasks=tuple(task(3, i, message=secrets.token_hex(16)) for i in range(200)))
    store.apply(big)
    sqlite.apply(big)
    assert 1 < space.count("part/0000000000000003/") < 40
    assert space.store().load() == sqlite.load()


def test_snapshots_keep_the_log_short_and_load_as_sqlite(space: Space) -> None:
    # Each entry replaces the records of the one before, so five entries outweigh a snapshot.
    store = space.store(chunk_bytes=1024, snapshot_every=5)
    persists = [
        Persist(
            jobs=(job(i),),
            tasks=tuple(task(i, n, message=secrets.token_hex(8)) for n in range(100)),
            updates=(("f1", update(f"u{i}")),),
            acked=(f"u{i - 2}",),
            forgotten_jobs=(i - 1,),
            counters=(("job", i + 1),),
        )
        for i in range(1, 24)
    ]
    sqlite = both(persists, store)
    assert space.count("log/") == 3  # entries 21 to 23; the snapshot covers 20
    snapshot = space.gateway.range(f"{space.prefix}snapshot").kvs[0].value
    assert snapshot.startswith(b'{"seq": 20,')
    assert space.count("snap/") == space.count("snap/0000000000000020/") > 1  # older ones gone
    covered = space.gateway.range(
        f"{space.prefix}part/", f"{space.prefix}part/0000000000000021", keys_only=True
    )
    assert covered.count == 0 < space.count("part/")  # only the parts of entries after it are left
    assert space.store().load() == sqlite.load()
    with pytest.raises(EtcdError, match="compacted"):
        space.gateway.range(f"{space.prefix}head", revision=space.fence)  # history was compacted


def test_tokens_and_audit_behave_as_in_sqlite(space: Space) -> None:
    def script(store: SqliteStore | EtcdStore) -> list[object]:
        seen: list[object] = []
        store.put_tokens({"d1": TokenEntry("alice", Role.USER)})
        store.put_tokens({"d2": TokenEntry("fw", Role.USER, ("batch", "web"))})
        store.put_tokens({"d1": TokenEntry("alice", Role.ADMIN)})
        seen += [store.token("d1"), store.token("d2"), store.token("none")]
        for i in range(5):
            seen.append(
                store.add_audit(AuditRecord(at=float(i), who="admin", command=f"echo {i}", nodes="n1"))
            )
        several = [AuditRecord(at=5.0, who="bob", kind="job.submit", status=201) for _ in range(2)]
        seen.append(store.add_audit(*several))  # one transaction: the first id, the next follows
        ended = {"ended_at": 9.0, "results": {"0": "n1"}}
        store.end_audit(store.audit_record(5).model_copy(update=ended))
        store.end_audit(AuditRecord(id=1, at=0.0, who="admin", command="x", nodes="n1", ended_at=9.0))
        seen += [store.audit(0, 10), store.audit(1, 1), store.audit(2, 5), store.audit(10, 5)]
        seen += [store.audit_record(1), store.audit_record(4)]
        return seen

    etcd_store = space.store(audit_limit=3)
    assert script(etcd_store) == script(SqliteStore(":memory:", fsync=False, audit_limit=3))
    again = space.store(audit_limit=3)
    again.load()  # the next id follows the last stored one
    assert again.add_audit(AuditRecord(at=6.0, who="admin", command="x", nodes="n1")) == 8
    assert [r.id for r in again.audit(0, 10)] == [8, 7, 6]


def test_refusals_are_counted_a_minute_apart_from_records_as_in_sqlite(space: Space) -> None:
    def refused(minute: float, kind: str, count: int = 1) -> AuditRecord:
        return AuditRecord(at=minute, who="anonymous", kind=kind, source="10.0.0.1", status=401, count=count)

    def script(store: SqliteStore | EtcdStore) -> list[object]:
        store.add_audit(AuditRecord(at=0.0, who="admin", kind="job.submit", status=201))
        store.add_refusals([refused(60.0, "job.submit", 2), refused(60.0, "token.create")])
        store.add_refusals([refused(60.0, "job.submit", 3), refused(120.0, "job.submit")])
        store.add_refusals([refused(180.0, "rebalance")])  # the oldest minute's goes: 3 are kept
        return [
            store.refusals(0, 10),
            store.refusals(1, 1),
            store.refusals(0, 10, since=150.0),
            store.audit(0, 10),
        ]

    seen = script(space.store(audit_limit=1, refusal_limit=3))
    assert seen == script(SqliteStore(":memory:", fsync=False, audit_limit=1, refusal_limit=3))
    assert [(r.at, r.kind, r.count) for r in seen[0]] == [
        (180.0, "rebalance", 1),
        (120.0, "job.submit", 1),
        (60.0, "token.create", 1),
    ]
    assert [r.at for r in seen[2]] == [180.0, 120.0] and len(seen[3]) == 1


# --- random sequences ---------------------------------------------------------------------

_small = st.integers(1, 5)
_persists = st.builds(
    Persist,
    jobs=st.lists(_small.map(job), max_size=3).map(tuple),
    tasks=st.lists(
        st.builds(task, _small, st.integers(0, 2), st.sampled_from(TaskState), st.text(max_size=40)),
        max_size=6,
    ).map(tuple),
    nodes=st.lists(st.builds(node, st.sampled_from(["n1", "n2"]), st.floats(0, 100)), max_size=2).map(tuple),
    frameworks=st.lists(st.sampled_from(["f1", "f2"]).map(framework), max_size=2).map(tuple),
    updates=st.lists(
        st.tuples(st.sampled_from(["f1", "f2"]), st.sampled_from(["u1", "u2", "u3", "u4"]).map(update)),
        max_size=3,
    ).map(tuple),
    acked=st.lists(st.sampled_from(["u1", "u2", "u3", "u4"]), max_size=2).map(tuple),
    migrations=st.lists(st.builds(migration, _small, st.sampled_from(["", "gone"])), max_size=2).map(tuple),
    forgotten_jobs=st.lists(_small, max_size=2).map(tuple),
    forgotten_migrations=st.lists(_small, max_size=2).map(tuple),
    registrations=st.lists(st.builds(registration, st.sampled_from(["r1", "r2"]), _small), max_size=2).map(
        tuple
    ),
    forgotten_registrations=st.lists(st.sampled_from(["r1", "r2"]), max_size=1).map(tuple),
    counters=st.lists(st.tuples(st.sampled_from(["job", "migration"]), _small), max_size=2).map(tuple),
)


# Every example runs against etcd, so shrinking a failure would take minutes: the failing
# example is reported as found.
@settings(
    max_examples=25,
    deadline=None,
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
)
@given(persists=st.lists(_persists, min_size=1, max_size=7))
def test_any_sequence_of_persists_loads_as_sqlite_loads_it(gateway: Gateway, persists: list[Persist]) -> None:
    space = new_space(gateway)  # a prefix per example, on the one etcd
    sqlite = both(persists, space.store(chunk_bytes=256, snapshot_every=3, snapshot_bytes=2000))
    assert space.store().load() == sqlite.load()


# --- several members ----------------------------------------------------------------------


def _leader(endpoints: list[str]) -> int:
    """Which member leads the etcd cluster."""
    for i, endpoint in enumerate(endpoints):
        status = httpx.post(f"{endpoint}/v3/maintenance/status", json={}, timeout=5).json()
        if status["header"]["member_id"] == status["leader"]:
            return i
    raise AssertionError("no etcd member leads")


def test_writes_go_on_while_a_member_is_down(tmp_path: Path) -> None:
    with EtcdCluster(3, tmp_path) as cluster:
        leader = _leader(cluster.endpoints)
        follower = (leader + 1) % 3
        # The gateway prefers the follower, which is then killed: it must move on.
        order = [follower, *(i for i in range(3) if i != follower)]
        gateway = Gateway([cluster.endpoints[i] for i in order])
        try:
            space = new_space(gateway)
            store = space.store()
            sqlite = both(VARIED[:1], store)
            cluster.kill(follower)
            both(VARIED[1:3], store)
            for persist in VARIED[1:3]:
                sqlite.apply(persist)
            cluster.start(follower)
            store.apply(VARIED[3])
            sqlite.apply(VARIED[3])
            assert space.store().load() == sqlite.load()
            alone = Gateway([cluster.endpoints[follower]])  # it caught up
            try:
                assert (
                    EtcdStore(alone, space.prefix, fence=0, leader_key=space.leader_key).load()
                    == sqlite.load()
                )
            finally:
                alone.close()
        finally:
            gateway.close()


# --- the gateway --------------------------------------------------------------------------


def test_no_endpoint_answering_is_said_plainly() -> None:
    endpoints = [f"http://127.0.0.1:{free_port()}" for _ in range(2)]
    gateway = Gateway(endpoints, timeout=1)
    try:
        with pytest.raises(EtcdUnavailable) as caught:
            gateway.range("k")
        assert all(e in str(caught.value) for e in endpoints)
    finally:
        gateway.close()


def test_etcds_own_errors_come_with_its_message(space: Space) -> None:
    with pytest.raises(EtcdError, match="too many operations in txn request"):
        space.gateway.txn([], [put_op(f"{space.prefix}k{i}", b"v") for i in range(129)])


def test_a_watch_sees_changes_and_closes_from_another_thread(space: Space) -> None:
    key = f"{space.prefix}watched/"
    watch = space.gateway.watch(key, range_end=prefix_end(key))
    seen = []

    def read() -> None:
        seen.extend((e.type, e.kv.key, e.kv.value) for e in watch)

    reader = threading.Thread(target=read)
    reader.start()
    time.sleep(0.3)
    space.gateway.put(f"{key}a", b"1")
    space.gateway.delete_range(f"{key}a")
    deadline = time.monotonic() + 5
    while len(seen) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    watch.close()
    reader.join(timeout=5)
    assert not reader.is_alive()
    assert seen == [("PUT", f"{key}a".encode(), b"1"), ("DELETE", f"{key}a".encode(), b"")]


@pytest.mark.parametrize(
    ("url", "endpoints"),
    [
        ("etcd://10.0.0.1:2379,10.0.0.2:2380", ["http://10.0.0.1:2379", "http://10.0.0.2:2380"]),
        ("etcd://db1", ["http://db1:2379"]),
    ],
)
def test_store_urls_name_the_members(url: str, endpoints: list[str]) -> None:
    assert parse_store_url(url) == endpoints


@pytest.mark.parametrize(
    "url", ["http://h:2379", "etcd://", "etcd://h:99999", "etcd://h:port", "etcd://a,,b"]
)
def test_bad_store_urls_say_what_is_wrong(url: str) -> None:
    with pytest.raises(ValueError, match="expected|port"):
        parse_store_url(url)


def test_token_lifecycles_and_audit_queries_behave_as_in_sqlite(space: Space) -> None:
    def script(store: SqliteStore | EtcdStore) -> list[object]:
        store.put_tokens(
            {
                "d1": TokenEntry("alice", Role.USER, created=1.0, expires=50.0),
                "d2": TokenEntry("rack7", Role.USER, kind="bootstrap", created=2.0, uses=3, used=1),
            }
        )
        store.put_tokens({"d1": TokenEntry("alice", Role.USER, created=1.0, last_used=9.0, revoked=10.0)})
        seen: list[object] = [sorted(store.tokens()), store.token("d2")]
        kinds = ["job.submit", "job.kill", "job.submit", "token.create", "job.submit"]
        for i, kind in enumerate(kinds * 3):
            who = ("alice", "bob", "anonymous")[i % 3]
            store.add_audit(AuditRecord(at=float(i), who=who, kind=kind, source="10.0.0.1", status=201))
        for query in (
            AuditQuery(who="alice"),
            AuditQuery(kind="job.submit"),
            AuditQuery(who="bob", kind="job.submit"),
            AuditQuery(since=9.0),
            AuditQuery(who="alice", since=6.0),
            AuditQuery(who="nobody"),
        ):
            seen += [store.audit(0, 100, query), store.audit(1, 2, query)]
        return seen

    etcd_seen = script(space.store(audit_limit=12, audit_page=4))
    assert etcd_seen == script(SqliteStore(":memory:", fsync=False, audit_limit=12))
    assert all(etcd_seen[2:-2])  # every query but the last finds records
