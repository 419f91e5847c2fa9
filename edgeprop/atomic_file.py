"""Atomic file writes: a temp file in the target's folder, fsync, then rename.

A crash, a kill or a full disk never leaves half a file: readers see the old file
until the new one is whole. Files get mode 0644, not mkstemp's 0600, because
checkpoints, caches, assets and reports are meant to be read by others.
"""

from __future__ import annotations

import os
import re
import tempfile
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import IO, Iterator


@contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb", *,
                make_dirs: bool = True) -> Iterator[IO]:
    """Yield a file to write; on a clean exit it replaces `path`, else it is removed."""
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if make_dirs:
        folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    with suppress(OSError):  # make the rename itself durable
        dfd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_open(path, "wb") as f:
        f.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_open(path, "w") as f:
        f.write(text)


def cannot_write_in(folder: str | os.PathLike) -> str | None:
    """Why a file cannot be made in `folder` (the OS's reason), or None when it can.
    It makes and removes a temp file, as atomic_open will: permission bits say
    nothing for root, and /proc or sysfs refuse only a real attempt."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=".edgeprop-probe.", suffix=".tmp", dir=folder)
    except OSError as e:
        return e.strerror or type(e).__name__
    os.close(fd)
    with suppress(OSError):
        os.unlink(tmp)
    return None


def safe_name(text: str, default: str, limit: int = 80) -> str:
    """`text` as a file or folder name part: ASCII letters, digits, `_`, `.` and `-`
    (any other character becomes `_`), at most `limit` long, never empty."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", text)[:limit] or default


def rescue_folder(tag: str) -> Path:
    """A fresh folder in the temp dir for weights whose own destination cannot take
    them (a full disk, a folder gone): learned weights are never lost. The temp dir is
    often another file system; the caller names the folder to the user."""
    return Path(tempfile.mkdtemp(prefix=f"edgeprop-rescue-{safe_name(tag, 'weights', 60)}-"))
