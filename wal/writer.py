"""`LogWriter`: appends framed records to the active segment and rotates segments.

Whether and when to fsync is decided one layer up (`wal/commit.py`); the writer only offers
`sync()`. It never appends to a segment that existed before it was created: every open starts a
fresh segment, so a torn tail can only ever be at the end of the newest file.

Thread-safety: `append`, `sync` and `close` are called by one group-commit leader at a time.
`delete_through` and `sizes` may be called from any thread; they only touch the list of closed
segments, under its own lock.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from wbcache.wal import crashpoints
from wbcache.wal.format import HEADER_SIZE
from wbcache.wal.segments import create_segment, delete_segments
from wbcache.wal.syscalls import SYSCALLS, write_all


@dataclass(frozen=True)
class ClosedSegment:
    first_lsn: int
    last_lsn: int
    path: str
    size: int


class LogWriter:
    """Writes the log of one open cache into `wal_dir`, starting a new segment at `next_lsn`."""

    def __init__(self, wal_dir: str, next_lsn: int, segment_size: int) -> None:
        self._wal_dir = wal_dir
        self._segment_size = segment_size
        self._fd, self._path = create_segment(wal_dir, next_lsn)
        self._first_lsn = next_lsn
        self._last_lsn = next_lsn - 1  # no record yet
        self._size = HEADER_SIZE
        self._closed: list[ClosedSegment] = []
        self._closed_lock = threading.Lock()

    def append(self, data: bytes, first_lsn: int, last_lsn: int) -> None:
        """Write the framed records `first_lsn..last_lsn` (already in LSN order) to the log."""
        if self._size >= self._segment_size and self._last_lsn >= self._first_lsn:
            self._rotate(first_lsn)
        if crashpoints.ARMED:
            crashpoints.reached("wal.before_write")
        # Count what we attempt before writing: after a failed write the size is unknown, and
        # the cache refuses further writes anyway.
        self._size += len(data)
        write_all(self._fd, data)
        self._last_lsn = last_lsn
        if crashpoints.ARMED:
            crashpoints.reached("wal.after_write")

    def sync(self) -> None:
        """fdatasync the active segment: everything appended so far is then on disk."""
        if crashpoints.ARMED:
            crashpoints.reached("wal.before_fsync")
        SYSCALLS.fdatasync(self._fd)
        if crashpoints.ARMED:
            crashpoints.reached("wal.after_fsync")

    def _rotate(self, first_lsn: int) -> None:
        # The old segment is made durable before the new one exists, so that only the newest
        # segment can ever end in a torn record (fsync="interval" leaves it unsynced otherwise).
        SYSCALLS.fdatasync(self._fd)
        fd, path = create_segment(self._wal_dir, first_lsn)
        old_fd = self._fd
        with self._closed_lock:
            self._closed.append(ClosedSegment(self._first_lsn, self._last_lsn, self._path, self._size))
            self._fd, self._path = fd, path
            self._first_lsn, self._size = first_lsn, HEADER_SIZE
        SYSCALLS.close(old_fd)

    def delete_through(self, lsn: int) -> int:
        """Delete the closed segments whose records all have LSN <= `lsn`; return how many.

        The caller guarantees the database has committed everything up to `lsn`.
        """
        with self._closed_lock:
            keep = [segment for segment in self._closed if segment.last_lsn > lsn]
            drop = [segment.path for segment in self._closed if segment.last_lsn <= lsn]
            self._closed = keep
        delete_segments(self._wal_dir, drop)
        return len(drop)

    def sizes(self) -> tuple[int, int]:
        """(bytes, segments) of the log this writer holds on disk, the active segment included."""
        with self._closed_lock:
            return (self._size + sum(segment.size for segment in self._closed), len(self._closed) + 1)

    def close(self) -> None:
        SYSCALLS.close(self._fd)
