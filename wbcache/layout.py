"""The cache directory: `DIR/LOCK`, `DIR/wal/` (log segments), `DIR/db/` (LMDB), `DIR/cache_id`
(the directory's identity in a shared database) and `DIR/backend` (which kind of database the
directory flushes into, so that it is never recovered into another).

Opening is `claim` (check the path, create the root: nothing else, so two first opens racing
meet at the lock), then the lock, then `complete` (create the rest, under the lock).
Directories are created 0700, files 0600, and every creation is followed by an fsync of its
parent, so the layout itself survives power loss.
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
BACKEND_NAME = "backend"
SHARED_NAME = "SHARED"  # a shared directory (wbcache/lanes.py): lanes/ instead of LOCK and wal/
LANES_NAME = "lanes"
# What opening creates (wal/ and db/ stay empty until the cache writes). A crash part-way
# through the first open leaves some of these and nothing else: that directory is completed,
# not refused.
_LAYOUT_NAMES = frozenset({WAL_NAME, DB_NAME, LOCK_NAME, CACHE_ID_NAME, f"{CACHE_ID_NAME}.tmp",
                           BACKEND_NAME, f"{BACKEND_NAME}.tmp", SHARED_NAME, LANES_NAME})


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

    @property
    def backend_path(self) -> str:
        return os.path.join(self.root, BACKEND_NAME)

    def cache_id(self) -> str:
        """The directory's identity, made once (at the first open) and never changed."""
        with open(self.cache_id_path, encoding="ascii") as file:
            return file.read().strip()

    def backend_kind(self) -> str | None:
        """The kind of database the directory flushes into ("lmdb", "postgresql"), or None
        if no open has recorded one yet."""
        try:
            with open(self.backend_path, encoding="ascii") as file:
                return file.read().strip() or None
        except FileNotFoundError:
            return None

    def is_cache_dir(self) -> bool:
        """A single-owner cache directory, or a shared one."""
        return ((os.path.isdir(self.wal) and os.path.isfile(self.lock))
                or os.path.isfile(os.path.join(self.root, SHARED_NAME)))


def claim(path: str | os.PathLike[str]) -> Layout:
    """The layout at `path`, its root created if missing (and nothing else yet). An existing
    path must be a wbcache directory, an empty directory or what an interrupted first open
    left; anything else raises `InvalidDirectoryError` and is left untouched."""
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
    return layout


def complete(layout: Layout) -> None:
    """Lock held: create what the directory still lacks (wal/, db/, cache_id) and make the
    root's entries durable (the LOCK file the lock just created among them)."""
    for sub in (layout.wal, layout.db):
        if not os.path.isdir(sub):
            _make_dir(sub)
    if not os.path.exists(layout.cache_id_path):
        _write_durably(layout.cache_id_path, f"{uuid.uuid4().hex}\n".encode())
    SYSCALLS.fsync_dir(layout.root)


def complete_lane(layout: Layout) -> None:
    """Lane lock held: create what a lane of a shared directory still lacks (wal/, cache_id;
    its database is the shared directory's) and make the lane's entries durable."""
    if not os.path.isdir(layout.wal):
        _make_dir(layout.wal)
    if not os.path.exists(layout.cache_id_path):
        _write_durably(layout.cache_id_path, f"{uuid.uuid4().hex}\n".encode())
    SYSCALLS.fsync_dir(layout.root)


def record_backend(layout: Layout, kind: str) -> None:
    """Lock held: remember that the directory flushes into a `kind` database, or raise
    `InvalidDirectoryError` if it already flushes into another. Replaying a log into the wrong
    database would lose its writes for the right one."""
    recorded = layout.backend_kind()
    if recorded is None:
        _write_durably(layout.backend_path, f"{kind}\n".encode())
    elif recorded != kind:
        raise InvalidDirectoryError(
            f"{layout.root} flushes into a {recorded} database, not {kind}: open it with its "
            f"own backend (wbcache.open(path, backend=...)), or its log would be replayed "
            f"into the wrong database"
        )


def _interrupted_layout(root: str) -> bool:
    """Whether `root` holds only what an interrupted first open leaves (see _LAYOUT_NAMES)."""
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
    """mkdir -p, 0700, fsyncing each parent; another process creating it first is fine."""
    parent = os.path.dirname(path)
    if parent and not os.path.isdir(parent):
        _make_dir(parent)
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        if not os.path.isdir(path):
            raise
    SYSCALLS.fsync_dir(parent or ".")
