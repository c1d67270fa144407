"""Shared directories: one LMDB database for every process of a machine, one lane per open cache.

    DIR/SHARED                marks the directory shared (written once, at its first open)
    DIR/backend               "lmdb"
    DIR/db/                   the database every lane flushes into (`SharedLmdbBackend`)
    DIR/lanes/<8 digits>/     a lane: LOCK, wal/, cache_id (the log half of a single-owner
                              directory, with the same rules), and LANE, which marks it a
                              lane wherever it is reached from (`refuse_lane`)

A lane is named by its number, 8 digits (`00000001`); a new lane takes the lowest number no lane
has, so numbers stay near the peak number of processes too. Every name of 8 digits or more in
lanes/ is a lane (a longer one: made by a wbcache that numbered past 99999999), so no lane's
log is ever out of sight of adoption and recovery. Each must be a private directory, never a
link: a link there is refused, never followed (`lane_roots`).

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
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from wbcache.errors import CacheLockedError, InvalidDirectoryError
from wbcache.layout import (
    LANE_NAME,
    LANES_NAME,
    SHARED_NAME,
    WAL_NAME,
    Layout,
    complete_lane,
    opened_root,
)
from wbcache.lock import DirectoryLock
from wbcache.wal.owned import check_private_dir, open_private_dir
from wbcache.wal.syscalls import SYSCALLS

_MARK = b"wbcache shared directory 1\n"
_LANE_DIGITS = 8  # a new lane's name: its number, zero-padded
_LAST_NUMBER = 10**_LANE_DIGITS - 1  # the last a new lane takes: its name keeps 8 digits

log = logging.getLogger("wbcache.lanes")


def is_shared(root: str) -> bool:
    return os.path.lexists(os.path.join(root, SHARED_NAME))


def lanes_dir(root: str) -> str:
    return os.path.join(root, LANES_NAME)


def lane_roots(root: str) -> list[str]:
    """Every lane of the shared directory at `root`, in the order of their numbers: each name
    of 8 digits or more in lanes/ (module docstring).

    A lane must be a private directory, never a link: anything else raises
    `InvalidDirectoryError` (no lane is skipped, as a skipped lane's log would be silently
    out of sight). Followed, a link would make a directory that is not this one's lane a
    lane: its log replayed into this database and deleted, our log written there. lanes/ is
    private (checked here too), so nobody else can swap a lane checked here for a link. Two
    lanes of one identity raise it too (`_refuse_twins`)."""
    lanes_path = lanes_dir(root)
    try:
        with opened_root(root) as root_fd:
            lanes_fd = open_private_dir(LANES_NAME, dir_fd=root_fd, shown=lanes_path)
    except FileNotFoundError:
        return []
    try:
        names = sorted((name for name in os.listdir(lanes_fd) if _is_lane_name(name)),
                       key=lambda name: (int(name), name))
        for name in names:
            _check_lane(lanes_fd, os.path.join(lanes_path, name))
    finally:
        os.close(lanes_fd)
    roots = [os.path.join(lanes_path, name) for name in names]
    _refuse_twins(roots)
    return roots


def _refuse_twins(roots: list[str]) -> None:
    """Refuse lanes of one identity (cache_id): a lane copied back into lanes/. Their
    checkpoint is one, so a flush of either would mark the other's unflushed records as in
    the database, and a crash would then lose them. A lane not yet given its identity (its
    first use in progress), or whose identity is not one wbcache wrote (refused when used),
    is not compared."""
    seen: dict[str, str] = {}
    for root in roots:
        try:
            identity = Layout(root).cache_id()
        except (FileNotFoundError, InvalidDirectoryError):
            continue
        twin = seen.setdefault(identity, root)
        if twin != root:
            raise InvalidDirectoryError(
                f"lanes {twin} and {root} have one identity (cache_id {identity}): one is a "
                f"copy of the other, and the two would share one checkpoint in the database "
                f"(a flush of either would count the other's unflushed writes as flushed). "
                f"Nothing was changed. Stop every process using the directory, keep the lane "
                f"that was in use last and move the other out of lanes/")


def _is_lane_name(name: str) -> bool:
    return len(name) >= _LANE_DIGITS and name.isascii() and name.isdigit()


def _check_lane(lanes_fd: int, path: str) -> None:
    info = os.stat(os.path.basename(path), dir_fd=lanes_fd, follow_symlinks=False)
    if stat.S_ISLNK(info.st_mode):
        raise InvalidDirectoryError(
            f"{path} is a symbolic link, not a lane: wbcache never follows a link in "
            f"{os.path.dirname(path)} (it would replay and delete a log that is not this "
            f"directory's). Remove the link; what it points at is left untouched")
    check_private_dir(info, path)


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
    """The lane at `lane_root`, locked and complete, or None if another process holds it. Its
    LOCK still names the process that last held it: a shared open records its own pid once
    nothing can refuse it any more (its replay, a linked wal/), so a refusal leaves the file
    as found (wbcache/directory.py); an adoption, which lets go at once, records none."""
    layout = Layout(lane_root)
    try:
        lock = DirectoryLock.acquire(layout.lock, record_owner=False)
    except CacheLockedError:
        return None
    try:
        complete_lane(layout)  # may refuse the lane: its LOCK then still as found
    except BaseException:
        lock.release()
        raise
    return Lane(layout, lock)


def claim(root: str) -> Lane:
    """The first free lane of the shared directory at `root`, or a new one; locked. Raises
    `CacheLockedError` if every number a new lane could take is a lane held by a live
    process."""
    found = lane_roots(root)
    for lane_root in found:
        lane = take(lane_root)
        if lane is not None:
            return lane
    # A new lane: the lowest number free (module docstring). Each number is tried once, so
    # this ends: one another process makes or takes first is its, and we go on to the next.
    existing = {int(os.path.basename(lane_root)) for lane_root in found}
    for number in range(1, _LAST_NUMBER + 1):
        if number in existing:
            continue
        lane_root = os.path.join(lanes_dir(root), f"{number:0{_LANE_DIGITS}d}")
        try:
            os.mkdir(lane_root, 0o700)
        except FileExistsError:
            continue  # another process made this one first
        _fsync_dir(lanes_dir(root))
        lane = take(lane_root)
        if lane is not None:
            return lane
    raise CacheLockedError(
        f"{root} has no free lane: lanes 1 to {_LAST_NUMBER} are all held by live processes, "
        f"and a new lane cannot be numbered beyond")


def orphans(root: str, *, mine: str | None = None) -> Iterator[Lane]:
    """Each lane no process holds (but `mine`), locked while the caller handles it; the
    caller releases it."""
    for lane_root in lane_roots(root):
        if lane_root == mine:
            continue
        lane = take(lane_root)
        if lane is not None:
            yield lane


def adopt_orphans(root: str, adopt: Callable[[Lane], int], *, mine: str | None = None,
                  say: Callable[..., None] | None = None) -> int:
    """Run `adopt` (replay a lane's log into the database; returns records replayed) on every
    orphan lane of `root`; return how many records were adopted in all. Orphans that hold
    nothing are only looked at. Each adoption is logged, here or by `say(logger, level,
    message, *args)` (the flusher's sweep passes `log_later`: wal/deferred.py)."""
    adopted = 0
    for lane in orphans(root, mine=mine):
        try:
            if os.listdir(lane.layout.wal):
                records = adopt(lane)
                adopted += records
                if records:
                    (say or _log_now)(log, logging.INFO, "adopted lane %s of %s (its process "
                                      "is gone): replayed %d log records into the database",
                                      lane.name, root, records)
        finally:
            lane.release()
    return adopted


def _log_now(logger: logging.Logger, level: int, message: str, *args: object) -> None:
    logger.log(level, message, *args)


def mark_shared(root: str) -> None:
    """Make `root` (its LOCK held shared by the caller, against a single-owner first open:
    wbcache/directory.py) a shared directory:
    `lanes/` and the `SHARED` mark, durable."""
    os.makedirs(lanes_dir(root), mode=0o700, exist_ok=True)
    path = os.path.join(root, SHARED_NAME)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)
    except FileExistsError:  # another first open's, perhaps not yet durable
        sync_mark(root)
        return
    try:
        os.write(fd, _MARK)
        os.fsync(fd)
    finally:
        os.close(fd)
    _fsync_dir(root)


def sync_mark(root: str) -> None:
    """Make `lanes/` and the `SHARED` mark, found in `root`, durable (an fsync of `root`):
    the first open that made them may not have yet, and a lane's writes acknowledged before
    they are would go with them in a power cut."""
    _fsync_dir(root)


def check_marked(root: str) -> None:
    """Refuse a shared directory (`root`, marked `SHARED`) in a state no open makes: a
    single-owner's `wal/` beside the mark (the first open's lock lets only one kind be
    made), or no `lanes/` (made before the mark). Either would put a log out of sight of
    the opens and the commands, which would call the directory sound."""
    if os.path.isdir(os.path.join(root, WAL_NAME)):
        raise InvalidDirectoryError(
            f"{root} has both a SHARED mark (a shared directory's) and a wal/ directory (a "
            f"single-owner one's log), which no open makes: wbcache will not guess which one "
            f"the directory is. Nothing was changed. Keep the one it was made as: for a "
            f"single-owner cache remove SHARED (and lanes/, if its lanes hold no log); for a "
            f"shared one, move wal/ out of the directory")
    if not os.path.isdir(lanes_dir(root)):
        raise InvalidDirectoryError(
            f"{root} has a SHARED mark but no lanes/ directory: its lanes, with any "
            f"acknowledged writes their logs held that were not yet flushed, are gone. If "
            f"lanes/ was removed on purpose, make it again (mkdir -m 0700 {lanes_dir(root)}) "
            f"to open the directory with what its database holds")


def refuse_mismatch(root: str, shared: bool) -> None:
    """Refuse to open a shared directory as a single-owner one, or the other way round,
    saying which flag to use (or one in a state no open makes: `check_marked`)."""
    if is_shared(root):
        check_marked(root)
    if shared and os.path.isdir(os.path.join(root, WAL_NAME)):
        raise InvalidDirectoryError(
            f"{root} is a single-owner cache directory: open it without shared=True (one "
            f"process at a time), or use a new directory for a shared cache")
    if not shared and is_shared(root):
        raise shared_directory(root)


def refuse_lane(path: str) -> None:
    """Refuse `path` if it is a lane of a shared directory. A lane holds what a single-owner
    directory holds (LOCK, wal/, cache_id), so opened or recovered as one, its log would be
    replayed into a new database inside the lane and deleted: its acknowledged writes gone
    from the shared database, and the shared directory refused at its next open (records
    missing from the lane's log). Nothing is changed."""
    real = os.path.realpath(path)
    if os.path.basename(real) == LANES_NAME and is_shared(os.path.dirname(real)):
        raise InvalidDirectoryError(  # empty, it would be taken for a new directory
            f"{real} holds the lanes of the shared cache directory {os.path.dirname(real)}, "
            f"and is not a cache directory of its own: open {os.path.dirname(real)} with "
            f"shared=True, and name it to the wbcache commands. Nothing was changed")
    lanes_path, name = os.path.split(real)
    root = os.path.dirname(lanes_path)
    if os.path.basename(lanes_path) == LANES_NAME and _is_lane_name(name) and is_shared(root):
        raise InvalidDirectoryError(
            f"{real} is lane {name} of the shared cache directory {root}, not a cache "
            f"directory of its own: open {root} with shared=True (wbcache.open(path, "
            f"shared=True)), and name {root} to the wbcache commands. Nothing was changed")
    for mark in (LANE_NAME, f"{LANE_NAME}.tmp"):  # a lane elsewhere (module docstring); .tmp:
        if os.path.lexists(os.path.join(real, mark)):  # its first use killed mid-write
            raise InvalidDirectoryError(
                f"{real} holds {mark}, the mark of a lane of a shared cache directory: it is "
                f"taken for a lane reached outside that directory's lanes/ (moved, copied or "
                f"mounted there), not a cache directory of its own, as its log belongs to the "
                f"shared directory's database. Nothing was changed. A copy: remove it (the "
                f"lane itself, with its log, is still in lanes/; two lanes of one identity "
                f"would share a checkpoint). Moved out: put it back in lanes/ under a number no "
                f"lane has, and open the shared directory with shared=True. Never a lane: "
                f"remove {mark}")


def shared_directory(root: str) -> InvalidDirectoryError:
    """The refusal of a single-owner open of the shared directory `root`."""
    return InvalidDirectoryError(
        f"{root} is a shared cache directory (several processes, a lane each): open it with "
        f"shared=True (wbcache.open(path, shared=True))")


def _fsync_dir(path: str) -> None:
    SYSCALLS.fsync_dir(path)
