"""Tasks as named Unix users, through a real master and real agents: each runs as its user,
shut out of the others' sandboxes; root and unknown users refused by the agent; a user not
its token's refused by the master; a run as its user re-adopted after an agent restart, its
saved state moved with it; `shoal exec` as the agents' shell user; `shoal copy` into a
sandbox given to its user; no variable of a job in a process of root's, SHOAL_ names refused,
no working directory entered with root's rights. Makes two users for the run, and removes
them after."""

from __future__ import annotations

import asyncio
import json
import os
import pwd
import secrets
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from shoal.agent.cgroups import Cgroups
from shoal.agent.files import pack, unpack
from shoal.agent.health import HealthChecks
from shoal.agent.runner import Runner
from shoal.agent.users import Users
from shoal.checks import TASK_CHECK, CheckStatus, HealthCheck
from shoal.client import ApiError, Client
from shoal.framework import Driver, OfferInfo, TaskLaunch
from shoal.model import JobSpec, Resources, Role, TaskRecord, TaskState
from shoal.testing.live import LiveCluster, live_cluster, wait_for
from shoal.testing.programs import COUNTER
from shoal.testing.recorder import Recorder
from shoal.wire import RunSpec

pytestmark = [
    pytest.mark.skipif(
        os.geteuid() != 0 or shutil.which("useradd") is None, reason="makes Unix users: needs root"
    ),
    pytest.mark.timeout(120),
]

PREFIX = f"shoal_{secrets.token_hex(3)}"
SMALL = {"cpus": 0.1, "mem": 64}


@pytest.fixture(scope="module")
def people() -> Iterator[dict[str, str]]:
    """Two users of this machine, by the names of the tokens that may run as them."""
    names = {"alice": f"{PREFIX}_alice", "bob": f"{PREFIX}_bob"}
    made = []
    try:
        for name in names.values():
            subprocess.run(["useradd", "--create-home", "--user-group", name], check=True)
            made.append(name)
        yield names
    finally:
        for name in made:
            subprocess.run(["userdel", "--remove", name], capture_output=True)


@pytest.fixture(scope="module")
def cluster(people: dict[str, str]) -> Iterator[LiveCluster]:
    # Not under pytest's own directory (mode 0700): the users must reach their sandboxes.
    root = Path(tempfile.mkdtemp(prefix="shoal-users-"))
    root.chmod(0o711)
    run_as = {token: [user] for token, user in people.items()}
    try:
        with live_cluster(
            root,
            agents=2,
            heartbeat_timeout=5.0,  # an agent restarted on a busy machine is back in time
            master_settings={"run_as": json.dumps(run_as)},
            agent_settings={"allow_root": "false", "shell_user": people["alice"]},
        ) as c:
            yield c
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def tokens(cluster: LiveCluster, people: dict[str, str]) -> dict[str, str]:
    with cluster.client() as admin:
        return {name: admin.create_token(name, Role.USER, ("default",)).token for name in people}


def running(client: Client, job: int) -> TaskRecord:
    return wait_for(  # type: ignore[return-value]
        lambda: (t := client.task(f"{job}.0")).state is TaskState.RUNNING and t, what=f"job {job} running"
    )


def sandbox(cluster: LiveCluster, task: TaskRecord) -> Path:
    assert task.node is not None
    return cluster.agent_dir(task.node) / "sandboxes" / task.run_id


def test_tasks_run_as_their_users_shut_out_of_each_others_sandboxes(
    cluster: LiveCluster, people: dict[str, str], tokens: dict[str, str]
) -> None:
    alice, bob = people["alice"], people["bob"]
    with cluster.client(tokens["bob"]) as as_bob:
        secret = as_bob.submit(JobSpec(command="echo bob-secret; sleep 60", resources=SMALL))
        task = running(as_bob, secret)
        box = sandbox(cluster, task)
        wait_for(lambda: (box / "stdout").read_text(), what="bob's task writing")
        [shell] = [
            p
            for p in psutil.process_iter(["cmdline"])
            if (p.info["cmdline"] or [])[2:3] == ["echo bob-secret; sleep 60"]
        ]
        assert (shell.uids().real, shell.gids().real) == (_uid(bob), _gid(bob))
        if Cgroups.detect(task.node or "") is not None:  # held to its limits all the same
            assert f"/shoal/{task.node}/{task.run_id}" in Path(f"/proc/{shell.pid}/cgroup").read_text()
    probe = f"id -un; id -gn; echo $HOME $USER $LOGNAME; cat {box}/stdout; ls {box}; true"
    with cluster.client(tokens["alice"]) as as_alice:
        job = as_alice.submit(JobSpec(command=probe, resources=SMALL))
        view = as_alice.wait(job, timeout=20)
        out = as_alice.logs(f"{job}.0").decode()
        err = as_alice.logs(f"{job}.0", "stderr").decode()
    assert view.state.value == "complete" and view.spec.user == alice  # the job records its user
    assert out.splitlines() == [alice, alice, f"/home/{alice} {alice} {alice}"]
    assert err.count("Permission denied") == 2 and "bob-secret" not in out + err
    assert (box.stat().st_uid, box.stat().st_mode & 0o777) == (_uid(bob), 0o700)
    log = (box / "stdout").stat()
    assert (log.st_uid, log.st_mode & 0o777) == (_uid(bob), 0o600)
    with cluster.client() as admin:
        admin.kill(secret)


def test_a_tasks_check_command_runs_as_its_user(
    cluster: LiveCluster, people: dict[str, str], tokens: dict[str, str]
) -> None:
    health = {"command": "id -un; echo $HOME", "interval": 0.2}
    with cluster.client(tokens["alice"]) as as_alice:
        job = as_alice.submit(JobSpec(command="sleep 30", resources=SMALL, health=health))
        checked = wait_for(
            lambda: (
                (c := as_alice.task(f"{job}.0").checks.get(TASK_CHECK))
                and c.status is CheckStatus.PASSING
                and c
            ),
            what="its check passing",
        )
        as_alice.kill(job)
    assert checked.output.split() == [people["alice"], f"/home/{people['alice']}"]  # type: ignore[attr-defined]


def test_root_and_users_the_node_lacks_are_refused_with_the_reason(cluster: LiveCluster) -> None:
    with cluster.client() as admin:  # an admin may name any user: the agent says no
        asks = {
            "root": JobSpec(command="true", user="root", resources=SMALL),
            "nobody named": JobSpec(command="true", resources=SMALL),  # the agent's own user: root
            "unknown": JobSpec(command="true", user=f"{PREFIX}_nobody", resources=SMALL),
        }
        jobs = {why: admin.submit(spec) for why, spec in asks.items()}
        tasks = {why: admin.wait(job, timeout=20).tasks[0] for why, job in jobs.items()}
    assert all(t.state is TaskState.FAILED and t.attempt == 0 for t in tasks.values())
    assert tasks["root"].message == (
        "could not start: it would run as root (uid 0), and this agent does not run tasks as root "
        "(allow_root is off): name another user"
    )
    assert "names no user and this agent runs as root" in tasks["nobody named"].message
    assert tasks["unknown"].message == f"could not start: there is no user {PREFIX}_nobody on this node"


def test_a_user_not_mapped_to_the_token_is_forbidden_naming_the_field(
    cluster: LiveCluster, people: dict[str, str], tokens: dict[str, str]
) -> None:
    auth = {"Authorization": f"Bearer {tokens['alice']}"}
    with httpx.Client(base_url=cluster.url, headers=auth) as http:
        other = http.post("/v1/jobs", json={"command": "true", "user": people["bob"]})
        bad = http.post("/v1/jobs", json={"command": "true", "user": "-rf"})
    assert other.status_code == 403
    [field] = other.json()["fields"]
    assert field["field"] == "user"
    assert field["reason"] == (
        f"alice may run tasks as {people['alice']}, not {people['bob']}: name one of those, "
        f"or leave user out to run as {people['alice']}"
    )
    assert bad.status_code == 422 and bad.json()["fields"][0]["field"] == "user"


def test_a_job_may_not_set_shoals_own_variables(cluster: LiveCluster, tokens: dict[str, str]) -> None:
    auth = {"Authorization": f"Bearer {tokens['alice']}"}
    with httpx.Client(base_url=cluster.url, headers=auth) as http:
        refused = http.post("/v1/jobs", json={"command": "true", "env": {"SHOAL_CGROUP_DIRS": "/tmp"}})
    assert refused.status_code == 422
    [field] = refused.json()["fields"]
    assert field["field"] == "env" and "names beginning SHOAL_ are those shoal sets" in field["reason"]


def test_a_task_as_its_user_is_readopted_after_an_agent_restart(
    cluster: LiveCluster, people: dict[str, str], tokens: dict[str, str]
) -> None:
    with cluster.client(tokens["alice"]) as as_alice:
        job = as_alice.submit(JobSpec(command="id -un; sleep 3; exit 7", resources=SMALL))
        task = running(as_alice, job)
        assert task.node is not None
        cluster.kill_agent(task.node)
        cluster.start_agent(task.node)
        view = as_alice.wait(job, timeout=30)
        assert (view.tasks[0].state, view.tasks[0].exit_code, view.tasks[0].attempt) == (
            TaskState.FAILED,
            7,
            0,
        )
        assert as_alice.logs(f"{job}.0").decode() == f"{people['alice']}\n"


def test_shell_commands_run_as_the_shell_user_from_its_home(
    cluster: LiveCluster, people: dict[str, str]
) -> None:
    result = cluster.cli("exec", "-w", "node1", "--", "id -un; pwd; echo $HOME")
    alice = people["alice"]
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [f"node1: {alice}", f"node1: /home/{alice}", f"node1: /home/{alice}"]


def test_a_file_copied_into_a_sandbox_is_its_users(
    cluster: LiveCluster, people: dict[str, str], tokens: dict[str, str], tmp_path: Path
) -> None:
    source = tmp_path / "input.txt"
    source.write_text("for alice\n")
    source.chmod(0o600)
    wait = "until [ -f in/input.txt ]; do sleep 0.05; done; cat in/input.txt; echo more >> in/input.txt"
    with cluster.client(tokens["alice"]) as as_alice:
        job = as_alice.submit(JobSpec(command=wait, resources=SMALL))
        box = sandbox(cluster, running(as_alice, job))
        copied = cluster.cli("copy", "-w", "node1", str(source), f"{box}/in/")
        assert copied.returncode == 0, copied.stderr
        view = as_alice.wait(job, timeout=20)
        assert view.state.value == "complete" and as_alice.logs(f"{job}.0") == b"for alice\n"
    owner = _uid(people["alice"])
    assert (box / "in").stat().st_uid == owner and (box / "in" / "input.txt").stat().st_uid == owner


def test_saved_state_moves_with_a_task_as_its_user(cluster: LiveCluster, tokens: dict[str, str]) -> None:
    with cluster.client(tokens["alice"]) as as_alice, cluster.client() as admin:
        job = as_alice.submit(JobSpec(command=COUNTER, resources=SMALL, migrate="checkpoint"))
        first = running(as_alice, job)
        task_id = f"{job}.0"
        wait_for(lambda: len(as_alice.logs(task_id).split()) >= 5, what="some counting")
        assert first.node is not None
        admin.drain(first.node)
        try:
            wait_for(
                lambda: (t := as_alice.task(task_id)).attempt == 1 and t.state is TaskState.RUNNING,
                timeout=30,
                what="the counter running again elsewhere",
            )
            before = [int(n) for n in as_alice.logs(task_id, attempt=0).split()]
            wait_for(lambda: as_alice.logs(task_id, attempt=1).split(), what="counting again")
            after = [int(n) for n in as_alice.logs(task_id, attempt=1).split()]
            assert after[0] == before[-1] + 1  # its state came along, and was its user's to read
        finally:
            admin.undrain(first.node)
            admin.kill(job)


def test_a_frameworks_tasks_run_as_its_principal_may(
    cluster: LiveCluster, people: dict[str, str], tokens: dict[str, str]
) -> None:
    said: dict[str, object] = {}

    def on_offers(driver: Driver, offers: list[OfferInfo]) -> None:
        first, *rest = offers
        driver.decline([o.id for o in rest], refuse_seconds=60)
        if said:
            driver.decline([first.id], refuse_seconds=60)
            return
        theirs = TaskLaunch(name="theirs", command="true", resources=SMALL, user=people["bob"])
        try:
            driver.launch([first.id], [theirs])
        except ApiError as e:
            said["refused"] = e
        said["jobs"] = driver.launch([first.id], [TaskLaunch(name="mine", command="id -un", resources=SMALL)])

    recorder = Recorder(on_offers)
    framework = Driver(recorder, "as-alice", url=cluster.url, token=tokens["alice"]).start()
    try:
        wait_for(lambda: TaskState.FINISHED in recorder.states("mine"), what="the framework's task done")
    finally:
        framework.stop()
    refused = said["refused"]
    assert isinstance(refused, ApiError) and refused.status == 403
    assert refused.fields[0].field == "tasks.0.user"
    job = said["jobs"]["mine"]  # type: ignore[index]
    with cluster.client(tokens["alice"]) as as_alice:
        assert as_alice.logs(f"{job}.0") == f"{people['alice']}\n".encode()


def test_the_agent_reads_no_log_a_task_swapped_for_a_link(people: dict[str, str], tmp_path: Path) -> None:
    swap = "rm stdout && ln -s /etc/shadow stdout && id -un >&2"
    spec = RunSpec("1.0.0", "1.0", 0, ["sh", "-c", swap], Resources(), user=people["alice"])

    async def run() -> tuple[Runner, int | None]:
        ended: asyncio.Future[int | None] = asyncio.get_running_loop().create_future()
        runner = Runner(tmp_path, lambda run, code, spent: ended.set_result(code), None, Users(None, False))
        runner.spawn(spec)
        return runner, await asyncio.wait_for(ended, 10)

    runner, code = asyncio.run(run())
    assert code == 0 and runner.read_log("1.0.0", "stderr", 0, 100) == f"{people['alice']}\n".encode()
    with pytest.raises(FileNotFoundError):
        runner.read_log("1.0.0", "stdout", 0, 100)
    assert runner.recorded_exit("1.0.0") == 0  # kept where the task cannot reach it


@pytest.fixture
def shared() -> Iterator[Path]:
    """A directory of root's that other users may pass through (pytest's own is 0700)."""
    path = Path(tempfile.mkdtemp(prefix="shoal-users-"))
    path.chmod(0o711)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _run(runner: Runner, spec: RunSpec) -> tuple[int, int | None]:
    """Start `spec` on `runner`; (the wrapper's pid, its exit code)."""

    async def run() -> tuple[int, int | None]:
        runner._on_exit = lambda run, code, spent: ended.set_result(code)
        ended: asyncio.Future[int | None] = asyncio.get_running_loop().create_future()
        pid, _ = runner.spawn(spec)
        return pid, await asyncio.wait_for(ended, 10)

    return asyncio.run(run())


def test_no_process_of_roots_sees_a_tasks_variables(people: dict[str, str], shared: Path) -> None:
    """A library in LD_PRELOAD owned by the task's user says which euids loaded it: the task's
    user only, for its command and its check command alike; the root wrapper's environment,
    read while it waits, holds none of the job's variables."""
    alice = people["alice"]
    theirs = shared / "theirs"
    theirs.mkdir()
    marks = theirs / "marks"
    source = shared / "mark.c"
    source.write_text(
        "#include <fcntl.h>\n#include <stdio.h>\n#include <unistd.h>\n"
        "__attribute__((constructor)) static void mark(void) {\n"
        f'  int fd = open("{marks}", O_WRONLY | O_APPEND | O_CREAT, 0666);\n'
        '  if (fd >= 0) { dprintf(fd, "%d\\n", (int)geteuid()); close(fd); }\n}\n'
    )
    library = theirs / "mark.so"
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler to build the library")
    subprocess.run([cc, "-shared", "-fPIC", "-o", str(library), str(source)], check=True)
    os.chown(theirs, _uid(alice), _gid(alice))
    os.chown(library, _uid(alice), _gid(alice))
    env = {"LD_PRELOAD": str(library), "BASH_ENV": str(library), "ENV": str(library), "MARK": "job's"}
    spec = RunSpec("1.0.0", "1.0", 0, ["sh", "-c", "sleep 0.5; echo $MARK"], Resources(), env=env, user=alice)
    runner = Runner(shared / "agent", lambda run, code, spent: None, None, Users(None, False))
    seen: dict[str, bytes] = {}

    async def run() -> int | None:
        ended: asyncio.Future[int | None] = asyncio.get_running_loop().create_future()
        runner._on_exit = lambda run, code, spent: ended.set_result(code)
        pid, _ = runner.spawn(spec)
        seen["wrapper"] = Path(f"/proc/{pid}/environ").read_bytes()
        code = await asyncio.wait_for(ended, 10)
        verdicts: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        checks = HealthChecks(runner.sandbox, lambda *said: verdicts.set_result(said[3]), runner.users)
        checked = RunSpec(
            "1.0.0",
            "1.0",
            0,
            ["true"],
            Resources(),
            env=env,
            user=alice,
            checks={"c": HealthCheck(command="id -un", interval=60)},
        )
        checks.watch(checked)
        seen["check"] = (await asyncio.wait_for(verdicts, 10)).encode()
        await checks.close()
        return code

    assert asyncio.run(run()) == 0
    assert runner.read_log("1.0.0", "stdout", 0, 100) == b"job's\n"  # the task has its variables
    assert seen["check"] == alice.encode()
    assert seen["wrapper"] == b"PATH=/usr/sbin:/usr/bin:/sbin:/bin\0"
    loaded = marks.read_text().split()
    assert loaded and set(loaded) == {str(_uid(alice))}


def test_a_task_cannot_point_the_wrapper_at_cgroups_of_its_own(people: dict[str, str], shared: Path) -> None:
    alice = people["alice"]
    target = shared / "roots"
    target.write_text("")
    theirs = shared / "theirs"
    theirs.mkdir()
    (theirs / "cgroup.procs").symlink_to(target)
    os.lchown(theirs / "cgroup.procs", _uid(alice), _gid(alice))
    os.chown(theirs, _uid(alice), _gid(alice))
    env = {"SHOAL_CGROUP_DIRS": str(theirs)}
    spec = RunSpec("1.0.0", "1.0", 0, ["true"], Resources(), env=env, user=alice)
    runner = Runner(shared / "agent", lambda run, code, spent: None, None, Users(None, False))
    assert _run(runner, spec)[1] == 0
    assert target.read_text() == ""


def test_a_task_enters_no_working_directory_its_user_cannot_reach(
    people: dict[str, str], shared: Path
) -> None:
    vault = shared / "vault"
    vault.mkdir(mode=0o700)
    (vault / "open").mkdir(mode=0o755)
    (vault / "open" / "secret").write_text("root's\n")
    (vault / "open" / "secret").chmod(0o644)
    runner = Runner(shared / "agent", lambda run, code, spent: None, None, Users(None, False))
    codes = {}
    for run, workdir in (("1.0.0", vault / "open"), ("2.0.0", shared / "gone")):
        spec = RunSpec(
            run, run[:3], 0, ["cat", "secret"], Resources(), workdir=str(workdir), user=people["alice"]
        )
        codes[run] = _run(runner, spec)[1]
        assert runner.read_log(run, "stdout", 0, 100) == b""
        said = runner.read_log(run, "stderr", 0, 1000).decode()
        assert f"shoal: cannot enter the working directory {workdir}" in said
    assert codes == {"1.0.0": 127, "2.0.0": 127}


def test_saved_state_is_packed_and_unpacked_by_its_user(people: dict[str, str], shared: Path) -> None:
    """What the user cannot read stays out, links stay links; what is unpacked is made by the
    user, and an archive with a member out of place is refused whole."""
    uid, gid = _uid(people["alice"]), _gid(people["alice"])
    box = shared / "box"
    state = box / "checkpoint"
    state.mkdir(parents=True)
    (state / "count").write_text("5")
    (state / "closed").write_text("root's eyes only")
    (state / "closed").chmod(0)
    (state / "again").symlink_to("count")
    for path in (state / "count", state / "closed", state / "again", state, box):
        os.lchown(path, uid, gid)
    packed = shared / "state.tar.gz"
    with packed.open("w+b") as out:
        asyncio.run(pack(state, out, uid))
    with tarfile.open(packed) as tar:
        members = {m.name: m for m in tar}
    assert set(members) == {".", "./count", "./again"} and members["./again"].linkname == "count"
    fresh = shared / "fresh"  # as a sandbox not yet handed over: the agent's, the state dir the user's
    (fresh / "checkpoint").mkdir(parents=True, mode=0o700)
    fresh.chmod(0o700)
    os.chown(fresh / "checkpoint", uid, gid)
    with packed.open("rb") as f:
        asyncio.run(unpack(f, fresh / "checkpoint", 1))
    made = fresh / "checkpoint" / "count"
    assert made.read_text() == "5" and made.stat().st_uid == uid
    assert (fresh / "checkpoint" / "again").readlink() == Path("count")
    bad = shared / "bad.tar.gz"
    with tarfile.open(bad, "w:gz") as tar:
        tar.add(state / "count", "../escaped")
    with bad.open("rb") as f, pytest.raises(tarfile.TarError):
        asyncio.run(unpack(f, fresh / "checkpoint", 1))
    assert not (fresh / "escaped").exists()


def _uid(name: str) -> int:
    return pwd.getpwnam(name).pw_uid


def _gid(name: str) -> int:
    return pwd.getpwnam(name).pw_gid
