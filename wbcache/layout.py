"""The cache directory: `DIR/LOCK`, `DIR/wal/` (log segments), `DIR/db/` (LMDB).

Directories are created 0700 and every creation is followed by an fsync of its parent, so the
layout itself survives power loss.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass

from wbcache.errors import InvalidDirectoryError
from wbcache.wal.syscalls import SYSCALLS

LOCK_NAME = "LOCK"
WAL_NAME = "wal"
DB_NAME = "db"
CACHE_ID_NAME = "cache_id"
# What `prepare` creates (wal/ and db/ stay empty until after it returns). A crash part-way
# through the first open leaves some of these and nothing else: that directory is completed,
# not refused.
_LAYOUT_NAMES = frozenset({WAL_NAME, DB_NAME, LOCK_NAME, CACHE_ID_NAME, f"{CACHE_ID_NAME}.tmp"})


@dataclass(frozen=True)
class Layout:
    root: str

    @property
    def lock(self) -> str:
        return os.path.join(self.root, LOCK_NAME)

    @property
    def wal(self) -> str:
        return os.path.join(self.root, WAL_NAME)

    @property
    def db(self) -> str:
        return os.path.join(self.root, DB_NAME)

    @property
    def cache_id_path(self) -> str:
        return os.path.join(self.root, CACHE_ID_NAME)

    def cache_id(self) -> str:
        """The directory's identity, made once (at `prepare`) and never changed."""
        with open(self.cache_id_path, encoding="ascii") as file:
            return file.read().strip()

    def is_cache_dir(self) -> bool:
        return os.path.isdir(self.wal) and os.path.isfile(self.lock)

    def check_existing(self) -> None:
        """Raise `InvalidDirectoryError` unless root is an existing wbcache directory."""
        if not os.path.exists(self.root):
            raise InvalidDirectoryError(f"{self.root} does not exist")
        if not os.path.isdir(self.root):
            raise InvalidDirectoryError(f"{self.root} is not a directory")
        if not self.is_cache_dir():
            raise InvalidDirectoryError(f"{self.root} is not a wbcache directory (no {LOCK_NAME} and {WAL_NAME}/)")


def prepare(path: str | os.PathLike[str]) -> Layout:
    """The layout at `path`, created if missing. An existing path must be a wbcache directory
    or an empty directory; anything else raises `InvalidDirectoryError` and is left untouched."""
    layout = Layout(os.path.abspath(os.fspath(path)))
    root = layout.root
    if os.path.exists(root):
        if not os.path.isdir(root):
            raise InvalidDirectoryError(f"{root} exists and is not a directory")
        if not layout.is_cache_dir() and os.listdir(root) and not _interrupted_layout(root):
            raise InvalidDirectoryError(
                f"{root} is not empty and not a wbcache directory; refusing to write into it"
            )
    else:
        _make_dir(root)
    for sub in (layout.wal, layout.db):
        if not os.path.isdir(sub):
            _make_dir(sub)
    if not os.path.exists(layout.lock):
        fd = os.open(layout.lock, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
        os.close(fd)
        SYSCALLS.fsync_dir(root)
    if not os.path.exists(layout.cache_id_path):
        _write_durably(layout.cache_id_path, f"{uuid.uuid4().hex}\n".encode())
    return layout


def _interrupted_layout(root: str) -> bool:
    """Whether `root` holds only what an interrupted `prepare` leaves (see _LAYOUT_NAMES)."""
    names = set(os.listdir(root))
    return names <= _LAYOUT_NAMES and not any(
        os.listdir(os.path.join(root, name)) for name in names & {WAL_NAME, DB_NAME}
        if os.path.isdir(os.path.join(root, name)))


def _write_durably(path: str, data: bytes) -> None:
    """Create `path` holding `data` atomically (temp file, fsync, rename, directory fsync)."""
    temporary = f"{path}.tmp"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(temporary, path)
    SYSCALLS.fsync_dir(os.path.dirname(path))


def _make_dir(path: str) -> None:
    parent = os.path.dirname(path)
    if parent and not os.path.isdir(parent):
        _make_dir(parent)
    os.mkdir(path, 0o700)
    SYSCALLS.fsync_dir(parent or ".")
