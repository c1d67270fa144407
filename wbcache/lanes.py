"""Shared directories: one LMDB database for every process of a machine, one lane per open cache.

    DIR/SHARED                marks the directory shared (written once, at its first open)
    DIR/backend               "lmdb"
    DIR/db/                   the database every lane flushes into (`SharedLmdbBackend`)
    DIR/lanes/<8 digits>/     a lane: LOCK, wal/, cache_id (the log half of a single-owner
                              directory, with the same rules)

A lane belongs to the process holding its LOCK (an exclusive flock, dropped by the kernel when
the process dies, even by SIGKILL). An open cache claims the first lane it can lock, or makes a
new one (`mkdir` is atomic: two processes never make the same lane), and recovers it (its log's
records beyond the lane's checkpoint into the database) before using it. So the number of
lanes stays near the peak number of processes that had the directory open at once.

A lane nobody holds is an orphan: its process died, and its log may hold acknowledged writes
the database lacks. Every open adopts every orphan before it returns (locks it, replays its
log into the database with its own checkpoint, deletes its segments, lets it go), and the
flusher of every open cache sweeps for orphans every `Options.adopt_interval` seconds, so no
write waits for a process that will never come back. Adoption and use exclude each other
through the lane's flock: a lane is adopted only while locked by the adopter.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from wbcache.errors import CacheLockedError, InvalidDirectoryError
from wbcache.layout import LANES_NAME, SHARED_NAME, Layout, complete_lane
from wbcache.lock import DirectoryLock
from wbcache.wal.syscalls import SYSCALLS

_MARK = b"wbcache shared directory 1\n"
_LANE_DIGITS = 8

log = logging.getLogger("wbcache.lanes")


def is_shared(root: str) -> bool:
    return os.path.lexists(os.path.join(root, SHARED_NAME))


def lanes_dir(root: str) -> str:
    return os.path.join(root, LANES_NAME)


def lane_roots(root: str) -> list[str]:
    """Every lane of the shared directory at `root`, in order."""
    try:
        names = os.listdir(lanes_dir(root))
    except FileNotFoundError:
        return []
    return [os.path.join(lanes_dir(root), name) for name in sorted(names)
            if len(name) == _LANE_DIGITS and name.isdigit()]


@dataclass
class Lane:
    """A lane this process holds (its flock taken)."""

    layout: Layout
    lock: DirectoryLock

    @property
    def name(self) -> str:
        return os.path.basename(self.layout.root)

    def release(self) -> None:
        self.lock.release()


def take(lane_root: str) -> Lane | None:
    """The lane at `lane_root`, locked and complete, or None if another process holds it."""
    layout = Layout(lane_root)
    try:
        lock = DirectoryLock.acquire(layout.lock)
    except CacheLockedError:
        return None
    try:
        complete_lane(layout)
    except BaseException:
        lock.release()
        raise
    return Lane(layout, lock)


def claim(root: str) -> Lane:
    """The first free lane of the shared directory at `root`, or a new one; locked."""
    for lane_root in lane_roots(root):
        lane = take(lane_root)
        if lane is not None:
            return lane
    while True:
        existing = lane_roots(root)
        number = int(os.path.basename(existing[-1])) + 1 if existing else 1
        lane_root = os.path.join(lanes_dir(root), f"{number:0{_LANE_DIGITS}d}")
        try:
            os.mkdir(lane_root, 0o700)
        except FileExistsError:
            continue  # another process made this one first: try the next number
        _fsync_dir(lanes_dir(root))
        lane = take(lane_root)
        if lane is not None:
            return lane


def orphans(root: str, *, mine: str | None = None) -> Iterator[Lane]:
    """Each lane no process holds (but `mine`), locked while the caller handles it; the
    caller releases it."""
    for lane_root in lane_roots(root):
        if lane_root == mine:
            continue
        lane = take(lane_root)
        if lane is not None:
            yield lane


def adopt_orphans(root: str, adopt: Callable[[Lane], int], *, mine: str | None = None) -> int:
    """Run `adopt` (replay a lane's log into the database; returns records replayed) on every
    orphan lane of `root`; return how many records were adopted in all. Orphans that hold
    nothing are only looked at."""
    adopted = 0
    for lane in orphans(root, mine=mine):
        try:
            if os.listdir(lane.layout.wal):
                records = adopt(lane)
                adopted += records
                if records:
                    log.info("adopted lane %s of %s (its process is gone): replayed %d "
                             "log records into the database", lane.name, root, records)
        finally:
            lane.release()
    return adopted


def mark_shared(root: str) -> None:
    """Make `root` (locked against a concurrent first open by the caller) a shared directory:
    `lanes/` and the `SHARED` mark, durable."""
    os.makedirs(lanes_dir(root), mode=0o700, exist_ok=True)
    path = os.path.join(root, SHARED_NAME)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)
    except FileExistsError:
        return
    try:
        os.write(fd, _MARK)
        os.fsync(fd)
    finally:
        os.close(fd)
    _fsync_dir(root)


def refuse_mismatch(root: str, shared: bool) -> None:
    """Refuse to open a shared directory as a single-owner one, or the other way round,
    saying which flag to use."""
    if shared and os.path.isdir(os.path.join(root, "wal")):
        raise InvalidDirectoryError(
            f"{root} is a single-owner cache directory: open it without shared=True (one "
            f"process at a time), or use a new directory for a shared cache")
    if not shared and is_shared(root):
        raise InvalidDirectoryError(
            f"{root} is a shared cache directory (several processes, a lane each): open it "
            f"with shared=True (wbcache.open(path, shared=True))")


def _fsync_dir(path: str) -> None:
    SYSCALLS.fsync_dir(path)
