"""Chaos on hosts of their own: etcd members, masters and agents in network namespaces, a
steady workload, faults injected at random from a seed, and a check of what really ran.

    result = run_chaos(ChaosConfig(seed=7, plan=(KILL_LEADER, KILL_ETCD)), tmp_path)
    assert result.lost == result.duplicates == result.over_restarted == 0

The layout (`shoal.testing.hosts`): h1..h3 each run one etcd member and one master, the next
`agents` hosts one agent each, and the last host is the driver's. The driver is this
process, whose root namespace cannot reach the bridge: the thread that runs the chaos enters
the driver host's network namespace (setns(2) through ctypes; a network namespace belongs to
a thread, and the threads it starts inherit it) and leaves it at the end. Its clients reach
the masters over the bridge as a machine on that network would, with no helper process and
no link or address in the root namespace. Everything else is started with `Hosts.run`, so it
dies with its namespace.

What runs (`chaos_workload`): jobs submitted at random intervals, long tasks (a service
among them) that should run across every fault, and a framework launching short tasks from
offers. Every task notes its start and end in `history.log` in its agent's directory, so
the driver reads at the end every run on every host, whatever the masters believed
(namespaces share the filesystem).

The faults, one at a time while the workload goes on: SIGKILL of the leader (started again
later), SIGKILL of an etcd member (started again), a master's or an agent's host isolated,
the leader cut from the other etcd hosts (it still sees the agents) or from one agent host
(it still sees etcd), each healed after a while. What keeps an agent from its leader lasts
less than half the heartbeat timeout: an agent that hears no master for 0.6 of it stops its
runs (they end LOST and run again), and one away longer is rightly declared lost. For each
leader kill the failover is timed from the SIGKILL to the first submission a new leader
accepted, and to the first start of a task of a job submitted after the kill.

Once every fault is healed and every job has ended, `chaos_checks.verdict` says what the
records show (lost jobs, runs at once, attempts over the policy, false LOST reports); the
long tasks should have run all along (each stop is counted, by the fault it came in); the
framework should have heard every task it launched end; the registry should give exactly
the service's running tasks; and the ledger's invariants (`shoal.testing.invariants`) must
hold on the state a new leader would load from etcd, with nothing left allocated anywhere.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import random
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from shoal.client import ApiError, Client, Unreachable
from shoal.core.scheduler import Policy
from shoal.master.auth import new_token
from shoal.master.state import MasterState
from shoal.master.store.etcd import EtcdStore
from shoal.master.store.gateway import Gateway
from shoal.model import NodeStatus, TaskState
from shoal.testing import invariants
from shoal.testing.chaos_checks import (
    ENDED,
    Failover,
    Fault,
    Submission,
    Verdict,
    by_fault,
    elections,
    failovers,
    read_history,
    verdict,
)
from shoal.testing.chaos_workload import LONG, PROBE, SERVICE, SERVICE_NAME, Framework, Workload, job_spec
from shoal.testing.etcd import EtcdCluster
from shoal.testing.hosts import Hosts
from shoal.views import JobView, NodeView

KILL_LEADER = "kill_leader"
KILL_ETCD = "kill_etcd"
ISOLATE_MASTER = "isolate_master"
ISOLATE_AGENT = "isolate_agent"
CUT_LEADER_ETCD = "cut_leader_etcd"
CUT_LEADER_AGENT = "cut_leader_agent"
OTHER_FAULTS = (KILL_ETCD, ISOLATE_MASTER, ISOLATE_AGENT, CUT_LEADER_ETCD, CUT_LEADER_AGENT)

MASTERS = 3  # and as many etcd members, one beside each master
MASTER_PORT, DNS_PORT, ETCD_PORTS = 8470, 8600, (2379, 2380)  # every host has its own ports
_CLONE_NEWNET = 0x40000000


@dataclass(frozen=True)
class ChaosConfig:
    seed: int = 1
    kills: int = 20  # SIGKILLs of the leader
    others: int | None = None  # other faults, drawn at random (default: as many as kills)
    plan: tuple[str, ...] = ()  # these faults in this order, instead of drawn ones
    minutes: float = 15.0  # no fault starts later than this after the cluster is up
    agents: int = 3
    # The masters'. Agents stop their runs after 0.6 of it without a master: at 4 s that
    # comes before a leader's failover (2.5 to 3 s) is over, and every run stops.
    heartbeat_timeout: float = 6.0
    heartbeat_interval: float = 0.4  # the agents'
    submit_every: float = 1.0  # mean seconds between the workload's submissions
    long_jobs: int = 2  # tasks that run from start to end, across every fault; the first a service
    end_timeout: float = 120.0  # seconds the jobs have to end once the faults are over
    pause: tuple[float, float] = (0.5, 2.0)  # seconds between one fault settled and the next, drawn

    def faults(self, rng: random.Random) -> list[str]:
        if self.plan:
            return list(self.plan)
        others = self.kills if self.others is None else self.others
        drawn = [KILL_LEADER] * self.kills + [rng.choice(OTHER_FAULTS) for _ in range(others)]
        rng.shuffle(drawn)
        return drawn


@dataclass
class ChaosResult(Verdict):
    """The verdict (`chaos_checks.Verdict`), and the run's own figures."""

    seed: int = 0
    failovers: list[Failover] = field(default_factory=list)
    faults: dict[str, int] = field(default_factory=dict)  # injected, by kind
    # Counted from each fault to the next, by kind of fault: leader elections; runs of long
    # tasks that ended (stopped, to run again); submissions whose call failed.
    elections: dict[str, int] = field(default_factory=dict)
    interrupted: dict[str, int] = field(default_factory=dict)
    unacknowledged: dict[str, int] = field(default_factory=dict)
    submitted: int = 0
    long_restarts: int = 0  # runs of long tasks that ended before the end of the run
    framework_tasks: int = 0  # launched by the framework (its launch call answered)
    framework_unended: int = 0  # of those, never heard by the framework to end
    service_wrong: int = 0  # endpoints the registry gave wrongly at the end (missing or extra)
    invariants: str = ""  # "" when the ledger's invariants hold, else what broke
    elapsed_s: float = 0.0


@contextlib.contextmanager
def entered(namespace: str) -> Iterator[None]:
    """The calling thread (and every thread it starts meanwhile) in a named network namespace."""
    libc = ctypes.CDLL(None, use_errno=True)

    def setns(fd: int) -> None:
        if libc.setns(fd, _CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns into {namespace}")

    with open("/proc/thread-self/ns/net", "rb") as own, open(f"/run/netns/{namespace}", "rb") as target:
        setns(target.fileno())
        try:
            yield
        finally:
            setns(own.fileno())


class ChaosCluster:
    """The processes of the layout on `hosts`, and the levers the faults pull."""

    def __init__(self, hosts: Hosts, root: Path, config: ChaosConfig) -> None:
        self.hosts, self.root, self.config = hosts, root, config
        self.master_hosts = hosts.names[:MASTERS]
        self.agent_hosts = hosts.names[MASTERS : MASTERS + config.agents]
        self.driver_host = hosts.names[-1]
        self.host_of = {f"m{i}": h for i, h in enumerate(self.master_hosts, 1)}
        self.urls = {m: f"http://{hosts.address(h)}:{MASTER_PORT}" for m, h in self.host_of.items()}
        self.nodes = {f"node{i}": h for i, h in enumerate(self.agent_hosts, 1)}
        self.admin_token, self.cluster_token = new_token(), new_token()
        self.masters: dict[str, subprocess.Popen[bytes]] = {}
        (root / "logs").mkdir(parents=True, exist_ok=True)
        self.etcd = EtcdCluster(
            MASTERS,
            root / "etcd",
            hosts=[hosts.address(h) for h in self.master_hosts],
            ports=[ETCD_PORTS] * MASTERS,
            spawn=lambda i, argv, log: hosts.run(
                self.master_hosts[i], argv, stdout=log, stderr=subprocess.STDOUT
            ),
        )

    def client(self, timeout: float = 5.0) -> Client:
        # A short timeout: a call to a host cut off moves on to the next master sooner.
        return Client(list(self.urls.values()), self.admin_token, timeout=timeout)

    def history_files(self) -> dict[str, Path]:
        return {node: self.root / node / "history.log" for node in self.nodes}

    def master_logs(self) -> list[Path]:
        return [self.root / "logs" / f"{name}.log" for name in self.host_of]

    def _spawn(self, host: str, log: str, args: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        full = {**os.environ, "SHOAL_CLUSTER_TOKEN": self.cluster_token, **env}
        with open(self.root / "logs" / f"{log}.log", "ab") as out:
            return self.hosts.run(
                host, [sys.executable, "-m", "shoal", *args], env=full, stdout=out, stderr=subprocess.STDOUT
            )

    def start_master(self, name: str) -> None:
        host, address = self.host_of[name], self.hosts.address(self.host_of[name])
        flags = f"--name {name} --port {MASTER_PORT} --heartbeat-timeout {self.config.heartbeat_timeout}"
        args = [
            "master",
            *flags.split(),
            "--store",
            self.etcd.store_url,
            "--state-dir",
            str(self.root / name),
        ]
        env = {"SHOAL_ADMIN_TOKEN": self.admin_token, "SHOAL_DNS_PORT": str(DNS_PORT), "SHOAL_INSECURE": "1"}
        self.masters[name] = self._spawn(
            host, name, args, env | {"SHOAL_HOST": address, "SHOAL_ADVERTISE": address}
        )

    def kill_master(self, name: str) -> None:
        proc = self.masters.pop(name)
        proc.kill()
        proc.wait(10)

    def start_agent(self, node: str) -> None:
        flags = f"--name {node} --utilization tasks --heartbeat-interval {self.config.heartbeat_interval}"
        urls = ",".join(self.urls.values())
        args = ["agent", *flags.split(), "--cpus", "2", "--mem", "2048", "--master", urls]
        env = {"SHOAL_ALLOW_ROOT": "true"}  # throwaway hosts, run as root
        self._spawn(self.nodes[node], node, [*args, "--state-dir", str(self.root / node)], env)

    def listing(self, name: str) -> list[dict[str, object]] | None:
        """What master `name` says of the masters, or None when it does not answer."""
        headers = {"Authorization": f"Bearer {self.admin_token}"}
        try:
            answer = httpx.get(f"{self.urls[name]}/v1/masters", headers=headers, timeout=1.0)
        except httpx.HTTPError:
            return None
        return answer.json() if answer.status_code == 200 else None

    def leader(self) -> str | None:
        """The master every running master that answers names as leader, if they agree."""
        listings = [self.listing(name) or [] for name in self.masters]
        named = {str(e["name"]) for listing in listings for e in listing if e.get("leader")}
        return named.pop() if len(named) == 1 else None

    def unsettled(self, client: Client) -> str:
        """What is not back to normal ("" when nothing): one leader every master names, every
        master listed by each, every agent up and connected to the leader."""
        listings = {name: self.listing(name) for name in self.masters}
        if silent := sorted(n for n, v in listings.items() if v is None):
            return f"masters {silent} do not answer"
        leaders = {str(e["name"]) for v in listings.values() for e in v or [] if e.get("leader")}
        if len(leaders) != 1:
            return f"the masters name {sorted(leaders) or 'no'} leader"
        if any({str(e["name"]) for e in v or []} != set(self.masters) for v in listings.values()):
            return f"the masters list {listings}"
        try:
            nodes = client.nodes()
        except (Unreachable, ApiError) as e:
            return f"no nodes listed: {e}"
        down = sorted(n.name for n in nodes if n.status is not NodeStatus.UP or not n.connected)
        missing = sorted(set(self.nodes) - {n.name for n in nodes})
        return f"nodes down {down}, missing {missing}" if down or missing else ""

    def settle(self, client: Client, timeout: float = 30.0) -> str:
        deadline = time.monotonic() + timeout
        while (why := self.unsettled(client)) and time.monotonic() < deadline:
            time.sleep(0.2)
        return why


class Chaos:
    """The faults, injected one at a time; each heals what it did before it returns."""

    def __init__(
        self,
        cluster: ChaosCluster,
        workload: Workload,
        client: Client,
        rng: random.Random,
        note: Callable[[str], None],
    ) -> None:
        self.cluster, self.workload, self.client, self.rng, self.note = cluster, workload, client, rng, note
        self.faults: list[Fault] = []
        self.problems: list[str] = []
        self.etcd_down: set[int] = set()
        self.away = cluster.config.heartbeat_timeout / 2  # longest a fault may keep an agent away

    def inject(self, kind: str) -> None:
        getattr(self, f"_{kind}")()
        if why := self.cluster.settle(self.client):
            self.problems.append(f"not settled 30 s after {kind}: {why}")
            self.note(f"not settled after {kind}: {why}")

    def _begin(self, kind: str, target: str, what: str) -> None:
        self.faults.append(Fault(kind, time.time(), target))
        self.note(what)

    def _leader(self, kind: str) -> str | None:
        deadline = time.monotonic() + 15
        while (leader := self.cluster.leader()) is None and time.monotonic() < deadline:
            time.sleep(0.1)
        if leader is None:
            self.problems.append(f"no leader for {kind}")
        return leader

    def _kill_leader(self) -> None:
        if (leader := self._leader(KILL_LEADER)) is None:
            return
        self._begin(KILL_LEADER, leader, f"SIGKILL leader {leader}")
        self.cluster.kill_master(leader)
        for _ in range(3):  # each call follows the leader for up to 15 s
            probe = self.workload.submit(self.client, PROBE, job_spec(PROBE, self.rng))
            if probe.job_id is not None:
                with contextlib.suppress(Unreachable, ApiError, TimeoutError):
                    self.client.wait(probe.job_id, poll=0.1, timeout=30)
                break
        time.sleep(self.rng.uniform(0.5, 2.0))
        self.cluster.start_master(leader)

    def _kill_etcd(self) -> None:
        member = self.rng.randrange(MASTERS)
        self._begin(KILL_ETCD, f"e{member + 1}", f"SIGKILL etcd member e{member + 1}")
        self.cluster.etcd.kill(member)
        time.sleep(self.rng.uniform(2.0, 6.0))
        self._start_etcd(member)

    def _start_etcd(self, member: int) -> None:
        try:
            self.cluster.etcd.start(member)
        except RuntimeError as e:  # did not come back: the rest of the run goes on without it
            self.etcd_down.add(member)
            self.problems.append(str(e))
        else:
            self.etcd_down.discard(member)

    def _isolate(self, kind: str, host: str, seconds: float, what: str) -> None:
        self._begin(kind, host, f"isolate {what} ({host}) for {seconds:.1f}s")
        self.cluster.hosts.isolate(host)
        time.sleep(seconds)
        self.cluster.hosts.heal(host)

    def _isolate_master(self) -> None:
        name = self.rng.choice(sorted(self.cluster.host_of))
        leads = " (the leader)" if name == self.cluster.leader() else ""
        seconds = self.rng.uniform(2.0, 6.0)
        self._isolate(ISOLATE_MASTER, self.cluster.host_of[name], seconds, f"master {name}{leads}")

    def _isolate_agent(self) -> None:
        node = self.rng.choice(sorted(self.cluster.nodes))
        seconds = self.rng.uniform(0.5, self.away)
        self._isolate(ISOLATE_AGENT, self.cluster.nodes[node], seconds, f"agent {node}")

    def _cut(self, kind: str, leader: str, peers: list[str], seconds: float, what: str) -> None:
        host = self.cluster.host_of[leader]
        self._begin(kind, f"{host}-{','.join(peers)}", f"cut leader {leader} from {what} for {seconds:.1f}s")
        for peer in peers:
            self.cluster.hosts.cut(host, peer)
        time.sleep(seconds)
        for peer in peers:
            self.cluster.hosts.heal(host, peer)

    def _cut_leader_etcd(self) -> None:
        if (leader := self._leader(CUT_LEADER_ETCD)) is None:
            return
        others = [h for h in self.cluster.master_hosts if h != self.cluster.host_of[leader]]
        self._cut(CUT_LEADER_ETCD, leader, others, self.rng.uniform(2.0, 6.0), "the other etcd hosts")

    def _cut_leader_agent(self) -> None:
        if (leader := self._leader(CUT_LEADER_AGENT)) is None:
            return
        node = self.rng.choice(sorted(self.cluster.nodes))
        seconds = self.rng.uniform(0.5, self.away)
        self._cut(CUT_LEADER_AGENT, leader, [self.cluster.nodes[node]], seconds, node)

    def heal_everything(self) -> None:
        self.cluster.hosts.heal_all()
        for member in sorted(self.etcd_down):
            self._start_etcd(member)
        for name in sorted(set(self.cluster.host_of) - set(self.cluster.masters)):
            self.cluster.start_master(name)


def run_chaos(
    config: ChaosConfig, root: Path, progress: Callable[[int, int, str], None] | None = None
) -> ChaosResult:
    """Lay the cluster out under `root` (logs, histories, a timeline in chaos.log), run the
    workload through `config`'s faults and check what ran; `progress(done, total, what)`
    hears of each fault. Everything started is gone when this returns or raises."""
    began = time.monotonic()
    root.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        hosts = stack.enter_context(Hosts(MASTERS + config.agents + 1))
        cluster = ChaosCluster(hosts, root, config)
        stack.enter_context(cluster.etcd)
        stack.enter_context(entered(hosts.namespace(cluster.driver_host)))
        result = _run(cluster, progress or (lambda done, total, what: None))
    result.elapsed_s = round(time.monotonic() - began, 1)
    return result


def _run(cluster: ChaosCluster, progress: Callable[[int, int, str], None]) -> ChaosResult:
    config = cluster.config
    rng = random.Random(config.seed)
    with contextlib.ExitStack() as stack:
        timeline = stack.enter_context(open(cluster.root / "chaos.log", "a"))

        def note(what: str) -> None:
            timeline.write(f"{time.time():.3f} {what}\n")
            timeline.flush()

        client = stack.enter_context(cluster.client())
        for name in cluster.host_of:
            cluster.start_master(name)
        for node in cluster.nodes:
            cluster.start_agent(node)
        if why := cluster.settle(client, timeout=60):
            tail = cluster.master_logs()[0].read_text(errors="replace").splitlines()[-6:]
            raise RuntimeError(f"the cluster did not come up: {why}; m1's log ends:\n" + "\n".join(tail))
        seeded = random.Random(rng.random())
        workload = Workload(cluster.client(), seeded, config.submit_every, config.long_jobs)
        urls, log = list(cluster.urls.values()), cluster.root / "logs" / "framework.log"
        framework = stack.enter_context(
            Framework(urls, cluster.admin_token, random.Random(seeded.random()), log)
        )
        chaos = Chaos(cluster, workload, client, rng, note)
        faults, injected = config.faults(rng), Counter[str]()
        deadline = time.monotonic() + config.minutes * 60
        workload.start()
        stack.callback(workload.stop)  # on the way out of a failed run too
        for done, kind in enumerate(faults):
            if time.monotonic() > deadline:
                note(f"out of time: {len(faults) - done} faults not injected")
                break
            progress(done, len(faults), kind)
            chaos.inject(kind)
            injected[kind] += 1
            time.sleep(rng.uniform(*config.pause))
        progress(sum(injected.values()), len(faults), "healing, then waiting for every job to end")
        note("healing everything")
        chaos.heal_everything()
        workload.stop()
        if why := cluster.settle(client, timeout=60):
            chaos.problems.append(f"not settled at the end: {why}")
        framework.finish(config.end_timeout / 2, chaos.problems)
        framework.close()
        service_wrong = _check_service(client, workload.submissions, chaos.problems)
        stopped = _stop_long_jobs(client, workload.submissions, chaos.problems)
        views = _final_views(client, cluster, workload.submissions)
        nodes = client.nodes()
        note("checking")
    subs = workload.submissions
    (cluster.root / "submissions.json").write_text(json.dumps([vars(s) for s in subs], indent=1))
    runs = read_history(cluster.history_files())
    found = verdict(subs, views, runs, set(framework.sweeper.launched.values()))
    long_jobs = {s.job_id for s in subs if s.kind in (LONG, SERVICE)}
    interrupted = [r.end for r in runs if r.job_id in long_jobs and r.end is not None and r.end < stopped]
    return ChaosResult(
        **vars(found) | {"problems": chaos.problems + found.problems},
        seed=config.seed,
        failovers=failovers([f for f in chaos.faults if f.kind == KILL_LEADER], subs, runs),
        faults=dict(injected),
        elections=by_fault(chaos.faults, elections(cluster.master_logs())),
        interrupted=by_fault(chaos.faults, interrupted),
        unacknowledged=by_fault(chaos.faults, [s.sent for s in subs if s.job_id is None]),
        submitted=len(subs),
        long_restarts=len(interrupted),
        framework_tasks=len(framework.sweeper.launched),
        framework_unended=len(framework.sweeper.unended()),
        service_wrong=service_wrong,
        invariants=_invariants(cluster, nodes),
    )


def _check_service(client: Client, submissions: list[Submission], problems: list[str]) -> int:
    """How many endpoints the registry gives wrongly for the service (missing or extra, against
    its running tasks), once it had 10 s to catch up."""
    addresses = {n.name: n.info.address for n in client.nodes()}
    jobs = [s.job_id for s in submissions if s.kind == SERVICE and s.job_id is not None]
    deadline = time.monotonic() + 10
    while True:
        tasks = [t for job in jobs for t in client.job(job).tasks if t.state is TaskState.RUNNING]
        running = {(addresses[t.node or ""], t.ports["http"]) for t in tasks}
        given = set(client.resolve(SERVICE_NAME))
        if running == given or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    if running != given:
        problems.append(
            f"service {SERVICE_NAME}: the registry gives {sorted(given)}, its tasks run at {sorted(running)}"
        )
    return len(running ^ given)


def _stop_long_jobs(client: Client, submissions: list[Submission], problems: list[str]) -> float:
    """Every long task that did not run all along named in `problems`, then every long job
    killed; when the kills began (wall clock)."""
    began = time.time()
    for s in submissions:
        if s.kind in (LONG, SERVICE) and s.job_id is not None:
            task = client.job(s.job_id).tasks[0]
            if task.attempt or task.state is not TaskState.RUNNING:
                why = Counter(a.message for a in task.history)
                problems.append(
                    f"long task {task.id} ran {task.attempt + 1} times ({task.state.value}): {why}"
                )
            client.kill(s.job_id)
    return began


def _final_views(client: Client, cluster: ChaosCluster, submissions: list[Submission]) -> dict[int, JobView]:
    """Every job ended (or the end timeout passed): the final view of every job acknowledged or
    listed (the missing ones left out)."""
    ids = {s.job_id for s in submissions if s.job_id is not None}
    deadline = time.monotonic() + cluster.config.end_timeout
    while True:
        listed = client.jobs()
        ids |= {j.id for j in listed}
        if all(j.state in ENDED for j in listed) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    views = {}
    for job_id in sorted(ids):
        try:
            views[job_id] = client.job(job_id)
        except ApiError as e:
            if e.status != 404:
                raise
    return views


def _invariants(cluster: ChaosCluster, nodes: list[NodeView]) -> str:
    """The ledger's invariants on the state a new leader would load from etcd, and nothing
    held on any node once everything ended ("" when all hold)."""
    gateway = Gateway(cluster.etcd.endpoints)
    try:
        snapshot = EtcdStore(gateway, fence=0, leader_key=b"/shoal/leader").load()
        state = MasterState(
            cluster.config.heartbeat_timeout, policy=Policy(), snapshot=snapshot, now=time.time()
        )
        invariants.check(state)
    except AssertionError as e:
        return f"the ledger in etcd breaks an invariant: {e}"
    finally:
        gateway.close()
    held = [
        f"{n.name} holds {n.tasks} tasks ({n.allocated})" for n in nodes if n.tasks or n.allocated.cpus > 1e-9
    ]
    return "; ".join(held)
