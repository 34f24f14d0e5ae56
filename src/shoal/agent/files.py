"""The agent's side of `shoal copy`: blobs fetched from and put to the master over HTTP.

A push names blobs by sha256; the agent streams each from the master in chunks, checks the
digest while writing beside the destination, then sets mode and mtime and renames it into
place, so a reader never sees half a file and a corrupt transfer changes nothing. A pull
hashes the file, uploads it unless the master already holds those bytes, and reports the
blob with the file's mode and mtime. Transfers go to the master the agent is connected to
(the leader), following a redirect as any client's call does.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import os
import stat
import tarfile
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shoal.masters import Unreachable
from shoal.shell.protocol import CopyFile
from shoal.wire import CopyFiles, ExecEnd, ExecStarted, FetchFile, FileFetched

if TYPE_CHECKING:  # httpx itself is imported at the first transfer: an agent starts without it
    from shoal.calls import AsyncCalls

CHUNK = 1 << 20

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
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f".{target.name}.{os.getpid()}.shoal-partial")  # unique on shared disks
        try:
            await self._download(file.blob, partial)
            os.chmod(partial, file.mode)
            os.utime(partial, (file.mtime, file.mtime))
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

    async def save(self, directory: Path) -> str:
        """Pack `directory` (a run's saved state) into a blob on the master; its sha256."""
        packed = directory.with_suffix(".tar.gz")
        await asyncio.to_thread(_pack, directory, packed)
        try:
            blob = await asyncio.to_thread(_sha256, packed)
            await self._upload(blob, packed)
            return blob
        finally:
            packed.unlink(missing_ok=True)

    async def restore(self, blob: str, directory: Path) -> None:
        """Unpack a blob made by `save` into `directory`."""
        directory.mkdir(parents=True, exist_ok=True)
        packed = directory.with_suffix(".tar.gz")
        try:
            await self._download(blob, packed)
            await asyncio.to_thread(_unpack, packed, directory)
        finally:
            packed.unlink(missing_ok=True)

    async def _upload(self, blob: str, path: Path) -> None:
        """`path`, whose sha256 is `blob`, into the master's store, unless it is there."""
        if (await self._http.send("HEAD", f"/v1/blobs/{blob}")).status_code != 200:
            # Content-addressed: a repeat stores the same bytes, so it is safe to repeat.
            response = await self._http.send("PUT", f"/v1/blobs/{blob}", content=_Chunks(path), safe=True)
            response.raise_for_status()

    async def _download(self, blob: str, path: Path) -> None:
        """A blob into `path`, its sha256 checked (ValueError on a mismatch)."""
        digest = hashlib.sha256()
        response = await self._http.send("GET", f"/v1/blobs/{blob}", stream=True)
        try:
            response.raise_for_status()
            with open(path, "wb") as f:
                async for chunk in response.aiter_bytes(CHUNK):
                    digest.update(chunk)
                    f.write(chunk)
        finally:
            await response.aclose()
        if digest.hexdigest() != blob:
            raise ValueError(f"{path.name}: checksum mismatch (got {digest.hexdigest()}, want {blob})")


def _pack(directory: Path, target: Path) -> None:
    with tarfile.open(target, "w:gz") as tar:
        for entry in sorted(directory.iterdir()):
            tar.add(entry, arcname=entry.name)


def _unpack(packed: Path, directory: Path) -> None:
    with tarfile.open(packed, "r:gz") as tar:
        tar.extractall(directory, filter="data")  # no paths out of it, no devices


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
