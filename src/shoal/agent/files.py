"""The agent's side of `shoal copy`: blobs fetched from and put to the master over HTTP.

A push names blobs by sha256; the agent streams each from the master in chunks, checks the
digest while writing beside the destination, then sets mode and mtime and renames it into
place, so a reader never sees half a file and a corrupt transfer changes nothing. What it
writes into a directory of another user (a task's sandbox, a home) is given to that user,
as are the directories it makes there, so a task can use what is copied in for it; it
writes only files it made itself, never through a link found in place. It reaches the
destination one name at a time from /, holding each directory open and working relative to
it, and goes through no link but the agent's own user's in a directory only that user may
change (as /bin on a merged /usr): a link a user made in their home, to root's ~/.ssh say,
refuses the copy on that node, however deep on the way it is. A pull hashes the file,
uploads it unless the master already holds those bytes, and reports the blob with the
file's mode and mtime. Transfers go to the master the agent is connected to
(the leader), following a redirect as any client's call does.

A run's saved state is packed and unpacked by tar (GNU) as the run's user, with no variable
but `ROOT_ENV`: the tree is the user's to shape, so the agent reads and writes in it with the
user's rights only. What it unpacks it first reads through tarfile's "data" filter, refusing
an archive with a member that would land outside, link outside, or be a device, or whose
members come to more than the run may unpack (its job's disk, else the agent's
`restore_limit`). That reading is done on a thread: an archive that packs much into little
takes a while to read through, and the agent's loop, its heartbeats, must go on.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import hashlib
import os
import shutil
import stat
import tarfile
import tempfile
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, BinaryIO

from shoal.agent import users
from shoal.agent.users import ROOT_ENV
from shoal.masters import Unreachable
from shoal.shell.protocol import CopyFile
from shoal.wire import CopyFiles, ExecEnd, ExecStarted, FetchFile, FileFetched

if TYPE_CHECKING:  # httpx itself is imported at the first transfer: an agent starts without it
    from shoal.calls import AsyncCalls

CHUNK = 1 << 20
MIB = 1 << 20
_WALK = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC  # a directory passed through
_MADE = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC  # one made: fchown needs it read
_NEW = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_LINKS = 40  # links followed on one path at most, as the kernel's lookup
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
        dest = PurePosixPath(frame.dest)
        into = frame.into or len(frame.files) > 1 or _is_dir(dest)
        for file in frame.files:
            await self._receive(file, dest / file.path if into else dest)

    async def _receive(self, file: CopyFile, target: PurePosixPath) -> None:
        """`file` as `target`, its directory made if missing: all of it done relative to that
        directory, held open, so no link or move on the way changes where it goes."""
        where = _open_dir(target.parent, make=True)
        assert where is not None  # made when missing
        try:
            await self._write(file, where, target.name)
        finally:
            os.close(where)

    async def _write(self, file: CopyFile, where: int, name: str) -> None:
        partial = f".{name}.{os.getpid()}.shoal-partial"  # unique on shared disks
        with contextlib.suppress(FileNotFoundError):
            os.unlink(partial, dir_fd=where)  # left by a copy cut short
        try:
            fd = os.open(partial, _NEW, 0o600, dir_fd=where)
            with open(fd, "wb") as f:
                await self._download(file.blob, f, name)
                f.flush()
                _give_to_owner_of(f.fileno(), where)
                os.fchmod(f.fileno(), file.mode)  # after the chown, which clears setuid bits
                os.utime(f.fileno(), (file.mtime, file.mtime))
            os.replace(partial, name, src_dir_fd=where, dst_dir_fd=where)  # a link there is replaced
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(partial, dir_fd=where)

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

    async def restore(self, blob: str, directory: Path, limit: int) -> None:
        """Unpack a blob made by `save` into `directory` (in a sandbox not yet handed over),
        as the user it belongs to; refused (ValueError) past `limit` MiB in all."""
        directory.mkdir(parents=True, exist_ok=True)
        packed = directory.with_suffix(".tar.gz")
        try:
            with open(packed, "w+b") as f:
                await self._download(blob, f, packed.name)
                f.seek(0)
                await unpack(f, directory, limit)
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


def _is_dir(path: PurePosixPath) -> bool:
    fd = _open_dir(path)
    if fd is not None:
        os.close(fd)
    return fd is not None


def _open_dir(path: PurePosixPath, make: bool = False) -> int | None:
    """A descriptor of the directory `path` (absolute), reached one name at a time from /
    through no link `_trusted` does not pass; with `make`, each missing directory made and
    given to the owner of the one it is made in. None when it is missing or not a directory
    (with `make`, NotADirectoryError for the latter); PermissionError at a link not trusted."""
    names = list(reversed(path.parts[1:]))  # a stack: a link followed puts its target's on top
    fd, here, links = os.open("/", _WALK), PurePosixPath("/"), 0
    try:
        while names:
            name = names.pop()
            step = _step(fd, name, here / name, make)
            if isinstance(step, PurePosixPath):  # a link to follow
                if (links := links + 1) > _LINKS:
                    raise OSError(errno.ELOOP, "too many links", str(path))
                if step.is_absolute():
                    root = os.open("/", _WALK)
                    os.close(fd)
                    fd, here = root, PurePosixPath("/")
                names.extend(reversed(step.parts[1:] if step.is_absolute() else step.parts))
                continue
            if step is None:
                return None
            os.close(fd)
            fd, here = step, here.parent if name == ".." else here / name
        opened, fd = fd, -1
        return opened
    finally:
        if fd != -1:
            os.close(fd)


def _step(fd: int, name: str, shown: PurePosixPath, make: bool) -> int | PurePosixPath | None:
    """From the directory `fd` into its entry `name` (`shown` in errors): a descriptor of it,
    the target of a link to follow, or None (missing, or not a directory)."""
    try:
        return os.open(name, _WALK, dir_fd=fd)
    except FileNotFoundError:
        if not make:
            return None
        made = _make_dir(fd, name)
        return made if made is not None else _step(fd, name, shown, make)  # made meanwhile
    except NotADirectoryError:
        info = os.stat(name, dir_fd=fd, follow_symlinks=False)
    if not stat.S_ISLNK(info.st_mode):
        if make:
            raise NotADirectoryError(errno.ENOTDIR, "not a directory", str(shown))
        return None
    if not _trusted(info, os.fstat(fd)):
        raise PermissionError(f"{shown} is a link another user could have made: copies follow none")
    return PurePosixPath(os.readlink(name, dir_fd=fd))


def _trusted(link: os.stat_result, directory: os.stat_result) -> bool:
    """Whether a link is the agent's user's own, in a directory no other may change (as the
    kernel's protected_symlinks would have it, and stricter: no sticky /tmp)."""
    me = os.geteuid()
    return link.st_uid == me and directory.st_uid == me and not directory.st_mode & 0o022


def _make_dir(fd: int, name: str) -> int | None:
    """The directory `name` made in `fd` and given to the owner of `fd`: a descriptor of it
    (None: something of that name came first)."""
    try:
        os.mkdir(name, dir_fd=fd)
    except FileExistsError:
        return None
    made = os.open(name, _MADE, dir_fd=fd)
    _give_to_owner_of(made, fd)
    return made


def _give_to_owner_of(fd: int, directory: int) -> None:
    """Give the open file `fd` to the owner and group of the open `directory`, if not the
    agent's user."""
    info = os.fstat(directory)
    if info.st_uid != os.geteuid():
        os.fchown(fd, info.st_uid, info.st_gid)


async def pack(directory: Path, out: BinaryIO, owner: int) -> None:
    """Tar `directory` into `out` as the user `owner`: what that user can read there, links as
    links. The user resolves the name from its parent, the agent's sandbox, which the agent
    enters: a link put in its place is followed with the user's rights alone."""
    args = ["--create", "--ignore-failed-read", f"--directory={directory.name}", "."]
    await _tar(owner, directory.parent, args, out)


async def unpack(packed: BinaryIO, directory: Path, limit: int) -> None:
    """Untar `packed` into `directory` as the user who owns it, once tarfile's "data" filter
    passes every member and they come to `limit` MiB at most: tarfile.FilterError (a TarError)
    names the first it refuses, ValueError says the size went past."""
    await asyncio.to_thread(_check, packed, directory, limit)
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


def _check(packed: BinaryIO, directory: Path, limit: int) -> None:
    """What `unpack` checks, reading each member's header before its data: a member too big
    is refused before the archive is read through it."""
    total = 0
    with tarfile.open(fileobj=packed, mode="r:gz") as tar:
        for member in tar:
            tarfile.data_filter(member, str(directory))
            total += member.size  # a sparse file counts whole
            if total > limit * MIB:
                raise ValueError(
                    f"it unpacks to more than {limit} MiB, the most it may here (its job's disk, "
                    "or the agent's restore_limit for a job that asks for none)"
                )


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
