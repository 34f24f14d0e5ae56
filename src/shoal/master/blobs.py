"""Content-addressed files in the master's state directory, for `shoal copy`.

A push uploads each file once (its name is its sha256), and every agent then fetches it
over HTTP from here, in chunks, with the transport's own flow control; a pull has each
agent upload its file here for the client to fetch. Identical files are stored once, and
an upload whose bytes do not match its name is refused and leaves nothing behind. Blobs
not touched for `keep` seconds are swept.
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
    def __init__(self, root: Path, keep: float = 3600.0) -> None:
        self.root = root
        self.keep = keep
        root.mkdir(parents=True, exist_ok=True)

    def path(self, blob: str) -> Path:
        return self.root / blob

    def has(self, blob: str) -> bool:
        return self.path(blob).exists()

    async def put(self, blob: str, chunks: AsyncIterator[bytes]) -> int:
        """Store the bytes of `chunks` as `blob`; returns the size. SpecError if the bytes
        are not what the name says."""
        digest = hashlib.sha256()
        size = 0
        partial = self.root / f".{blob}.{os.getpid()}.{id(chunks)}"
        try:
            with open(partial, "wb") as f:
                async for chunk in chunks:
                    digest.update(chunk)
                    f.write(chunk)
                    size += len(chunk)
            if digest.hexdigest() != blob:
                raise SpecError("blob", f"the content's sha256 is {digest.hexdigest()}, not {blob}")
            os.replace(partial, self.path(blob))
        finally:
            partial.unlink(missing_ok=True)
        return size

    def touch(self, blob: str) -> None:
        os.utime(self.path(blob))

    def sweep(self, now: float | None = None) -> int:
        """Delete blobs untouched for `keep` seconds; returns how many."""
        cutoff = (now or time.time()) - self.keep
        removed = 0
        for path in self.root.iterdir():
            try:
                if path.stat().st_mtime < cutoff:
                    path.unlink()
                    removed += 1
            except FileNotFoundError:
                continue
        return removed
