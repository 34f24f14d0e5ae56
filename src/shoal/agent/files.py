"""The agent's side of `shoal copy`: blobs fetched from and put to the master over HTTP.

A push names blobs by sha256; the agent streams each from the master in chunks, checks the
digest while writing beside the destination, then sets mode and mtime and renames it into
place, so a reader never sees half a file and a corrupt transfer changes nothing. What it
writes into a directory of another user (a task's sandbox, a home) is given to that user,
as are the directories it makes there, so a task can use what is copied in for it; it
writes only files it made itself, never through a link found in place. A pull
hashes the file, uploads it unless the master already holds those bytes, and reports the
blob with the file's mode and mtime. Transfers go to the master the agent is connected to
(the leader), following a redirect as any client's call does.

A run's saved state is packed and unpacked by tar (GNU) as the run's user, with no variable
but `ROOT_ENV`: the tree is the user's to shape, so the agent reads and writes in it with the
user's rights only. What it unpacks it first reads through tarfile's "data" filter, refusing
an archive with a member that would land outside, link outside, or be a device.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import os
import shutil
import stat
import tarfile
import tempfile
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from shoal.agent import users
from shoal.agent.users import ROOT_ENV
from shoal.masters import Unreachable
from shoal.shell.protocol import CopyFile
from shoal.wire import CopyFiles, ExecEnd, ExecStarted, FetchFile, FileFetched

if TYPE_CHECKING:  # httpx itself is imported at the first transfer: an agent starts without it
    from shoal.calls import AsyncCalls

CHUNK = 1 << 20
_TAR = shutil.which("tar", path=ROOT_ENV["PATH"]) or "/bin/tar"

Send = Callable[[ExecStarted | FileFetched | ExecEnd], None]


class FileMover:
    def __init__(self, send: Send, calls: Callable[[], AsyncCalls]) -> None:
        self._send = send
        self._calls = calls  # to the masters, as this node
        self._jobs: dict[int, asyncio.Task[None]] = {}

    @functools.cached_property
    def _http(self) -> AsyncCalls:
        # Made at the first transfer, not with the agent: most agents never copy a file,
        # and httpx and a client's TLS context cost a start-up a good part of its CPU.
        return self._calls()

    def handle(self, frame: CopyFiles | FetchFile) -> None:
        if frame.exec_id in self._jobs:
            return
        self._send(ExecStarted(exec_id=frame.exec_id))
        work = self._copy(frame) if isinstance(frame, CopyFiles) else self._fetch(frame)
        job = self._jobs[frame.exec_id] = asyncio.create_task(self._report(frame.exec_id, work))
        job.add_done_callback(lambda _: self._jobs.pop(frame.exec_id, None))

    def cancel(self, exec_id: int) -> None:
        if (job := self._jobs.get(exec_id)) is not None:
            job.cancel()

    def cancel_all(self) -> None:
        for job in list(self._jobs.values()):
            job.cancel()

    async def close(self) -> None:
        self.cancel_all()
        if "_http" in self.__dict__:
            await self._http.aclose()

    async def _report(self, exec_id: int, work: Coroutine[Any, Any, None]) -> None:
        import httpx

        try:
            await work
        except (OSError, httpx.HTTPError, ValueError, Unreachable) as e:
            self._send(ExecEnd(exec_id=exec_id, code=1, error=str(e) or type(e).__name__))
        else:
            self._send(ExecEnd(exec_id=exec_id, code=0))

    async def _copy(self, frame: CopyFiles) -> None:
        dest = Path(frame.dest)
        into = frame.into or len(frame.files) > 1 or dest.is_dir()
        for file in frame.files:
            await self._receive(file, dest / file.path if into else dest)

    async def _receive(self, file: CopyFile, target: Path) -> None:
        _make_dirs(target.parent)
        partial = target.with_name(f".{target.name}.{os.getpid()}.shoal-partial")  # unique on shared disks
        partial.unlink(missing_ok=True)  # left by a copy cut short
        try:
            fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            with open(fd, "wb") as f:
                await self._download(file.blob, f, target.name)
                f.flush()
                _give_to_owner_of(f.fileno(), target.parent)
                os.fchmod(f.fileno(), file.mode)  # after the chown, which clears setuid bits
                os.utime(f.fileno(), (file.mtime, file.mtime))
            os.replace(partial, target)
        finally:
            partial.unlink(missing_ok=True)

    async def _fetch(self, frame: FetchFile) -> None:
        path = Path(frame.path)
        info = path.stat()
        if not stat.S_ISREG(info.st_mode):
            raise ValueError(f"{path} is not a regular file")
        blob = await asyncio.to_thread(_sha256, path)
        await self._upload(blob, path)
        self._send(
            FileFetched(
                exec_id=frame.exec_id,
                blob=blob,
                size=info.st_size,
                mode=stat.S_IMODE(info.st_mode),
                mtime=info.st_mtime,
            )
        )

    async def save(self, directory: Path, owner: int, scratch: Path) -> str:
        """Pack `directory` (a run's saved state) as the user `owner` (a uid) into a blob on
        the master, by way of a file in `scratch`; its sha256."""
        fd, name = tempfile.mkstemp(suffix=".tar.gz", dir=scratch)
        packed = Path(name)
        try:
            with open(fd, "wb") as out:
                await pack(directory, out, owner)
            blob = await asyncio.to_thread(_sha256, packed)
            await self._upload(blob, packed)
            return blob
        finally:
            packed.unlink(missing_ok=True)

    async def restore(self, blob: str, directory: Path) -> None:
        """Unpack a blob made by `save` into `directory` (in a sandbox not yet handed over),
        as the user it belongs to."""
        directory.mkdir(parents=True, exist_ok=True)
        packed = directory.with_suffix(".tar.gz")
        try:
            with open(packed, "w+b") as f:
                await self._download(blob, f, packed.name)
                f.seek(0)
                await unpack(f, directory)
        finally:
            packed.unlink(missing_ok=True)

    async def _upload(self, blob: str, path: Path) -> None:
        """`path`, whose sha256 is `blob`, into the master's store, unless it is there."""
        if (await self._http.send("HEAD", f"/v1/blobs/{blob}")).status_code != 200:
            # Content-addressed: a repeat stores the same bytes, so it is safe to repeat.
            response = await self._http.send("PUT", f"/v1/blobs/{blob}", content=_Chunks(path), safe=True)
            response.raise_for_status()

    async def _download(self, blob: str, f: BinaryIO, name: str) -> None:
        """A blob into the file `f` (for `name`), its sha256 checked (ValueError on a mismatch)."""
        digest = hashlib.sha256()
        response = await self._http.send("GET", f"/v1/blobs/{blob}", stream=True)
        try:
            response.raise_for_status()
            async for chunk in response.aiter_bytes(CHUNK):
                digest.update(chunk)
                f.write(chunk)
        finally:
            await response.aclose()
        if digest.hexdigest() != blob:
            raise ValueError(f"{name}: checksum mismatch (got {digest.hexdigest()}, want {blob})")


def _make_dirs(directory: Path) -> None:
    """`directory` and its missing parents, each given to the owner of the one it is made in."""
    if directory.is_dir():
        return
    _make_dirs(directory.parent)
    try:
        directory.mkdir()
    except FileExistsError:
        if not directory.is_dir():
            raise
        return
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        _give_to_owner_of(fd, directory.parent)
    finally:
        os.close(fd)


def _give_to_owner_of(fd: int, directory: Path) -> None:
    """Give the open file `fd` to the owner and group of `directory`, if not the agent's user."""
    info = directory.stat()
    if info.st_uid != os.geteuid():
        os.fchown(fd, info.st_uid, info.st_gid)


async def pack(directory: Path, out: BinaryIO, owner: int) -> None:
    """Tar `directory` into `out` as the user `owner`: what that user can read there, links as
    links. The user resolves the name from its parent, the agent's sandbox, which the agent
    enters: a link put in its place is followed with the user's rights alone."""
    args = ["--create", "--ignore-failed-read", f"--directory={directory.name}", "."]
    await _tar(owner, directory.parent, args, out)


async def unpack(packed: BinaryIO, directory: Path) -> None:
    """Untar `packed` into `directory` as the user who owns it, once tarfile's "data" filter
    passes every member; tarfile.FilterError (a TarError) names the first it refuses."""
    with tarfile.open(fileobj=packed, mode="r:gz") as tar:
        for member in tar:
            tarfile.data_filter(member, str(directory))
    packed.seek(0)
    await _tar(directory.lstat().st_uid, directory, ["--extract", "--no-same-owner"], packed)


async def _tar(uid: int, cwd: Path, args: list[str], data: BinaryIO) -> None:
    """tar with `args` on gzip `data` (stdout when creating, stdin else) as `uid`, from `cwd`."""
    creating = args[0] == "--create"
    proc = await asyncio.create_subprocess_exec(
        *users.become(users.owner(uid)),
        _TAR,
        "--gzip",
        "--file=-",
        *args,
        env=ROOT_ENV,
        cwd=cwd,
        stdin=asyncio.subprocess.DEVNULL if creating else data,
        stdout=data if creating else asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await proc.communicate()
    # 1: a file changed while it was read (the command's own writes, late): packed as read.
    if proc.returncode != 0 and not (creating and proc.returncode == 1):
        raise OSError(f"tar: {err.decode(errors='replace').strip() or f'exit {proc.returncode}'}")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


class _Chunks:
    """A file's bytes in chunks, read afresh at each iteration: an upload redirected or
    repeated sends the whole file again."""

    def __init__(self, path: Path) -> None:
        self._path = path

    async def __aiter__(self) -> AsyncIterator[bytes]:
        with open(self._path, "rb") as f:
            while chunk := f.read(CHUNK):
                yield chunk
