"""Content-addressed files in the master's state directory, for `shoal copy`.

A push uploads each file once (its name is its sha256), and every agent then fetches it
over HTTP from here, in chunks, with the transport's own flow control; a pull has each
agent upload its file here for the client to fetch. Identical files are stored once, and
an upload whose bytes do not match its name is refused and leaves nothing behind. Blobs
not touched for `keep` seconds are swept.

The store holds `quota` bytes at most, uploads under way counted as they are written: an
upload that would pass it is refused with 507 (Insufficient Storage: the server's room,
not the request, is at fault, and the same upload may succeed once blobs are swept) and
leaves nothing behind either. Each upload's own size is capped before it gets here (see
`limits`).
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

from shoal.errors import SpecError

CHUNK = 1 << 20


class BlobStore:
    def __init__(self, root: Path, quota: int, keep: float = 3600.0) -> None:
        self.root = root
        self.keep = keep
        self.quota = quota
        root.mkdir(parents=True, exist_ok=True)
        # Partial files a stopped master left count too, until the sweep takes them.
        self.used = sum(path.stat().st_size for path in root.iterdir())

    def path(self, blob: str) -> Path:
        return self.root / blob

    def has(self, blob: str) -> bool:
        return self.path(blob).exists()

    async def put(self, blob: str, chunks: AsyncIterator[bytes], declared: int | None = None) -> int:
        """Store the bytes of `chunks` (`declared` of them, if known) as `blob`; returns the
        size. SpecError if the bytes are not what the name says, or if they would pass the
        quota (507)."""
        self._room_for(declared or 0)
        digest = hashlib.sha256()
        size = 0
        partial = self.root / f".{blob}.{os.getpid()}.{id(chunks)}"
        try:
            with open(partial, "wb") as f:
                async for chunk in chunks:
                    self._room_for(len(chunk))
                    digest.update(chunk)
                    f.write(chunk)
                    size += len(chunk)
                    self.used += len(chunk)
            if digest.hexdigest() != blob:
                raise SpecError("blob", f"the content's sha256 is {digest.hexdigest()}, not {blob}")
            replaced = self.path(blob).stat().st_size if self.has(blob) else 0
            os.replace(partial, self.path(blob))
            self.used -= replaced
        except BaseException:
            self.used -= size
            raise
        finally:
            partial.unlink(missing_ok=True)
        return size

    def _room_for(self, size: int) -> None:
        if self.used + size > self.quota:
            raise SpecError(
                "body",
                f"the blob store is full: {self.used} of its {self.quota} bytes are taken (the "
                "master's blob_quota); blobs untouched for a while are swept",
                status=507,
            )

    def touch(self, blob: str) -> None:
        os.utime(self.path(blob))

    def sweep(self, now: float | None = None) -> int:
        """Delete blobs untouched for `keep` seconds; returns how many."""
        cutoff = (now or time.time()) - self.keep
        removed = 0
        for path in self.root.iterdir():
            try:
                stat = path.stat()
                if stat.st_mtime < cutoff:
                    path.unlink()
                    self.used -= stat.st_size
                    removed += 1
            except FileNotFoundError:
                continue
        return removed
