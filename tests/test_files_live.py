"""What the agent writes as root into places users shape, with a real user and real agents:
`shoal copy` goes through no link a user could have made, a run's saved state is checked off
the agent's event loop and refused past its size, and a sandbox's hand-over gives the user
only what the agent made. Makes a user for the run, and removes it after."""

from __future__ import annotations

import asyncio
import gzip
import os
import pwd
import secrets
import shutil
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from shoal.agent.files import unpack
from shoal.agent.runner import Runner
from shoal.agent.users import Users
from shoal.model import Resources
from shoal.testing.live import LiveCluster, live_cluster
from shoal.wire import RunSpec

pytestmark = [
    pytest.mark.skipif(
        os.geteuid() != 0 or shutil.which("useradd") is None, reason="makes Unix users: needs root"
    ),
    pytest.mark.timeout(120),
]

MIB = 1 << 20


@pytest.fixture(scope="module")
def alice() -> Iterator[pwd.struct_passwd]:
    name = f"shoal_{secrets.token_hex(3)}_alice"
    subprocess.run(["useradd", "--create-home", "--user-group", name], check=True)
    try:
        yield pwd.getpwnam(name)
    finally:
        subprocess.run(["userdel", "--remove", name], capture_output=True)


@pytest.fixture
def shared() -> Iterator[Path]:
    """A directory of root's that other users may pass through (pytest's own is 0700)."""
    path = Path(tempfile.mkdtemp(prefix="shoal-files-"))
    path.chmod(0o711)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveCluster]:
    with live_cluster(tmp_path_factory.mktemp("files"), agents=1) as c:
        yield c


def test_a_copy_goes_through_no_link_a_user_made(
    cluster: LiveCluster, alice: pwd.struct_passwd, shared: Path, tmp_path: Path
) -> None:
    """alice points ~/.ssh (and ~/keys) at a directory of root's: an admin's copy into her
    home is refused on the node, saying why, and nothing is written where the link leads.
    A link of root's in a directory only root may change is followed, as /bin on a merged
    /usr; a copy into her home itself still lands, given to her."""
    vault = shared / "vault"
    vault.mkdir(mode=0o700)
    (vault / "authorized_keys").write_text("root's\n")
    home = Path(alice.pw_dir)
    for name in (".ssh", "keys"):
        (home / name).symlink_to(vault)
        os.lchown(home / name, alice.pw_uid, alice.pw_gid)
    key = tmp_path / "key"
    key.write_text("ssh-ed25519 AAAA admin\n")
    for dest in (".ssh/authorized_keys", ".ssh/", ".ssh/deeper/key", "keys"):
        refused = cluster.cli("copy", "-w", "node1", str(key), f"{home}/{dest}")
        assert refused.returncode == 1, dest
        assert "node1: failed" in refused.stderr and f"{home}/" in refused.stderr, refused.stderr
        assert "link" in refused.stderr, refused.stderr
    assert [p.name for p in vault.iterdir()] == ["authorized_keys"]
    assert (vault / "authorized_keys").read_text() == "root's\n"

    (shared / "real").mkdir()
    (shared / "via").symlink_to("real")
    followed = cluster.cli("copy", "-w", "node1", str(key), f"{shared}/via/sub/")
    assert followed.returncode == 0, followed.stderr
    assert (shared / "real" / "sub" / "key").read_text() == key.read_text()
    landed = cluster.cli("copy", "-w", "node1", str(key), f"{home}/inbox/key")
    assert landed.returncode == 0, landed.stderr
    for path in (home / "inbox", home / "inbox" / "key"):
        assert (path.stat().st_uid, path.stat().st_gid) == (alice.pw_uid, alice.pw_gid)


def _zeros_then(size: int, last: str) -> bytes:
    """A gzip tar of a member of `size` zero bytes, then an empty one named `last`: made of
    gzip members, so a large size costs next to nothing to make and little to hold."""
    big = tarfile.TarInfo("big")
    big.size = size
    chunk = gzip.compress(bytes(MIB))
    end = tarfile.TarInfo(last)
    return b"".join(
        [
            gzip.compress(big.tobuf(tarfile.GNU_FORMAT)),
            chunk * (size // MIB),
            gzip.compress(end.tobuf(tarfile.GNU_FORMAT) + bytes(2 * tarfile.BLOCKSIZE)),
        ]
    )


def test_saved_state_past_its_limit_is_refused_before_anything_is_unpacked(
    alice: pwd.struct_passwd, shared: Path
) -> None:
    state = shared / "checkpoint"
    state.mkdir(mode=0o700)
    os.chown(state, alice.pw_uid, alice.pw_gid)
    packed = shared / "state.tar.gz"
    packed.write_bytes(_zeros_then(3 * MIB, "after"))
    with packed.open("rb") as f, pytest.raises(ValueError, match="more than 2 MiB"):
        asyncio.run(unpack(f, state, 2))
    assert list(state.iterdir()) == []
    with packed.open("rb") as f:
        asyncio.run(unpack(f, state, 3))  # at the limit: unpacked, by its user
    assert (state / "big").stat().st_size == 3 * MIB and (state / "big").stat().st_uid == alice.pw_uid


def test_saved_state_is_checked_off_the_event_loop(alice: pwd.struct_passwd, shared: Path) -> None:
    """A quarter GiB of zeros packs to a quarter MiB, and takes tarfile a while to read through:
    the agent's loop (its heartbeats) goes on meanwhile."""
    state = shared / "checkpoint"
    state.mkdir(mode=0o700)
    os.chown(state, alice.pw_uid, alice.pw_gid)
    packed = shared / "state.tar.gz"
    packed.write_bytes(_zeros_then(256 * MIB, "../escaped"))

    async def main() -> tuple[float, float]:
        gaps = [0.0]

        async def beat() -> None:
            while True:
                before = time.monotonic()
                await asyncio.sleep(0.01)
                gaps.append(time.monotonic() - before)

        beating = asyncio.create_task(beat())
        await asyncio.sleep(0.05)
        start = time.monotonic()
        with packed.open("rb") as f, pytest.raises(tarfile.TarError):
            await unpack(f, state, 1024)
        took = time.monotonic() - start
        await asyncio.sleep(0.05)  # the beat after the unpack, however late, is counted
        beating.cancel()
        return took, max(gaps)

    took, longest = asyncio.run(main())
    assert took > 0.2, "the archive is read too fast to tell"
    assert longest < took / 3, (longest, took)
    assert list(state.iterdir()) == [] and not (shared / "escaped").exists()


def test_a_sandbox_handed_over_gives_its_user_only_what_the_agent_made(
    alice: pwd.struct_passwd, shared: Path
) -> None:
    """The state unpacked in a run's checkpoint directory is its user's making: the hand-over
    leaves it as it is, here a hard link to a file of root's."""
    roots = shared / "roots"
    roots.write_text("root's\n")
    spec = RunSpec("1.0.0", "1.0", 0, ["true"], Resources(), user=alice.pw_name, checkpoint=True)
    runner = Runner(shared / "agent", lambda *_: None, None, Users(None, False))
    runner.prepare(spec)
    os.link(roots, runner.checkpoint_dir(spec.run_id) / "linked")

    async def run() -> None:
        ended: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        runner._on_exit = lambda *_: ended.set_result(None)
        runner.spawn(spec)
        await asyncio.wait_for(ended, 10)

    asyncio.run(run())
    assert roots.stat().st_uid == 0
    box = runner.sandbox(spec.run_id)
    for path in (box, box / "stdout", box / "stderr", box / "checkpoint"):
        assert (path.lstat().st_uid, path.lstat().st_gid) == (alice.pw_uid, alice.pw_gid), path
