"""Files that must be private or must outlive a power loss: tokens, the client file, the store.

A secret is written to a new file that only its owner can read from the moment it exists,
then renamed over the old one: no reader ever sees it under a wider mode (not even one
who opened the old file before), and a crash leaves the old file or the new, never half.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

PRIVATE = 0o600


def write_secret(path: Path, text: str) -> None:
    """Put `text` in `path`, mode 0600 whatever the umask, synced to disk."""
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            os.fchmod(f.fileno(), PRIVATE)  # mkstemp's 0600 is still narrowed by the umask
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    sync_directory(path.parent)


def sync_directory(directory: Path) -> None:
    """Make the names in `directory` durable: a new or renamed file's data may be on disk
    while its name is not, until its directory is synced."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
