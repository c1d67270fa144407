"""Segment files in `DIR/wal/`: naming, listing, creating, deleting.

A segment is named after the LSN of its first record, zero-padded to 20 digits, so names sort
as text in LSN order (`00000000000000000042.log`). Creating or deleting one is followed by an
fsync of the directory, so the change survives power loss before anything depends on it.

A segment is always a regular file: an entry with a segment's name that is a symbolic link, a
FIFO, a device or a directory was planted, and is refused (`InvalidDirectoryError`) rather than
followed, opened, skipped or deleted. A new segment is created with O_EXCL and O_NOFOLLOW, so
it is never written through anything already there.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass

from wbcache.errors import InvalidDirectoryError
from wbcache.wal import crashpoints
from wbcache.wal.owned import check_regular, describe
from wbcache.wal.syscalls import SYSCALLS, write_all

SUFFIX = ".log"
_NAME_DIGITS = 20


@dataclass(frozen=True)
class SegmentFile:
    """A segment on disk: the LSN its name gives and its path."""

    first_lsn: int
    path: str


def segment_name(first_lsn: int) -> str:
    return f"{first_lsn:0{_NAME_DIGITS}d}{SUFFIX}"


def parse_segment_name(name: str) -> int | None:
    """The first LSN a segment file name encodes, or None if it is not a segment name."""
    stem, suffix = name[: -len(SUFFIX)], name[-len(SUFFIX):]
    # isascii: str.isdigit accepts '²' (which int() refuses) and other scripts' digits
    if suffix != SUFFIX or len(stem) != _NAME_DIGITS or not (stem.isascii() and stem.isdigit()):
        return None
    return int(stem)


def list_segments(wal_dir: str) -> list[SegmentFile]:
    """Every segment in `wal_dir`, oldest first. Files with other names are not segments and
    are ignored; an entry with a segment's name that is not a regular file raises
    `InvalidDirectoryError` (module docstring)."""
    found = []
    with os.scandir(wal_dir) as entries:
        for entry in entries:
            lsn = parse_segment_name(entry.name)
            if lsn is None:
                continue
            if not entry.is_file(follow_symlinks=False):
                raise _not_a_segment(entry.path, entry.stat(follow_symlinks=False).st_mode)
            check_regular(entry.stat(follow_symlinks=False), entry.path)  # another's: refused
            found.append(SegmentFile(lsn, entry.path))
    found.sort(key=lambda segment: segment.first_lsn)
    return found


def create_segment(wal_dir: str, first_lsn: int, header: bytes, *, mappable: bool = False
                   ) -> tuple[int, str]:
    """Create a segment starting with `header`, durable (file and directory fsync'd) before
    returning.

    Returns the open file descriptor (write-only, appending) and the path. If `mappable`, it is
    readable too, as a shared writable map needs, and not appending, so that room for the map
    can be reserved at an offset (`Syscalls.reserve`); its offset is then the end of the header.
    """
    path = os.path.join(wal_dir, segment_name(first_lsn))
    if crashpoints.ARMED:
        crashpoints.reached("wal.segment.before_create")
    flags = ((os.O_RDWR if mappable else os.O_WRONLY | os.O_APPEND)
             | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        fd = SYSCALLS.open(path, flags, 0o600)
    except FileExistsError:
        mode = os.lstat(path).st_mode
        if stat.S_ISREG(mode):
            raise
        raise _not_a_segment(path, mode) from None
    try:
        write_all(fd, header)
        SYSCALLS.fdatasync(fd)
        if crashpoints.ARMED:
            crashpoints.reached("wal.segment.after_create")
        SYSCALLS.fsync_dir(wal_dir)
        if crashpoints.ARMED:
            crashpoints.reached("wal.segment.after_dir_fsync")
    except BaseException:
        SYSCALLS.close(fd)
        raise
    return fd, path


def _not_a_segment(path: str, mode: int) -> InvalidDirectoryError:
    return InvalidDirectoryError(
        f"{path} is {describe(mode)}, not a log segment; wbcache never follows a link or "
        f"opens a FIFO or device in its log: move it out of {os.path.dirname(path)}")


def delete_segments(wal_dir: str, paths: list[str]) -> None:
    """Delete segments oldest first, then fsync the directory once.

    Oldest first, so a crash part-way leaves a contiguous run of newer segments; recovery skips
    whatever the database checkpoint already covers and deletes it.
    """
    if not paths:
        return
    for path in paths:
        if crashpoints.ARMED:
            crashpoints.reached("wal.segment.before_delete")
        try:
            SYSCALLS.unlink(path)
        except FileNotFoundError:
            pass
    SYSCALLS.fsync_dir(wal_dir)
    if crashpoints.ARMED:
        crashpoints.reached("wal.segment.after_delete")
