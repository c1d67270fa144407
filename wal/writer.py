"""`LogWriter`: appends framed records to the active segment and rotates segments.

Whether and when to fsync is decided one layer up (`wal/commit.py`); the writer only offers
`sync()`. It never appends to a segment that existed before it was created: every open starts a
fresh segment, so a torn tail can only ever be at the end of the newest file.

Thread-safety: `append`, `sync` and `close` are called by one group-commit leader at a time;
`frame_one` (the pipe's, wal/_pipe.c) with the sequencer's lock held, and `rotate_to` by the
one writer starting a segment, the lock released but every other writer kept out.
`delete_through` and `sizes` may be called from any thread; they only touch the list of closed
segments, under its own lock.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

from wbcache.wal import crashpoints
from wbcache.wal.format import (
    MAX_SINGLE_RECORD,
    encode_frame,
    encode_header,
    encode_mark,
    encode_records,
)
from wbcache.wal.segments import create_segment, delete_segments
from wbcache.wal.syscalls import SYSCALLS, Syscalls, write_all

# The calls as imported: one replaced later, on SYSCALLS or on its class, is the harness's.
_PLAIN_WRITE, _PLAIN_FDATASYNC, _PLAIN_WRITE_SYNC = (
    Syscalls.write, Syscalls.fdatasync, Syscalls.write_sync)


@dataclass(frozen=True)
class ClosedSegment:
    first_lsn: int
    last_lsn: int
    path: str
    size: int


class LogWriter:
    """Writes the log of one open cache into `wal_dir`, starting a new segment at `next_lsn`.

    With `sync_marks` (fsync="interval": frames are acknowledged before they are fsync'd),
    every `sync()` is followed by a mark saying how far the segment is fsync'd, so that after a
    power cut a reader can tell unsynced damage from corruption (wal/format.py)."""

    def __init__(self, wal_dir: str, next_lsn: int, segment_size: int, *,
                 sync_marks: bool = False) -> None:
        self._wal_dir = wal_dir
        self._segment_size = segment_size
        self._header = encode_header(segment_size=segment_size, sync_marks=sync_marks)
        self._sync_marks = sync_marks
        self._fd, self._path = create_segment(wal_dir, next_lsn, self._header)
        self._first_lsn = next_lsn
        self._last_lsn = next_lsn - 1  # no record yet
        self._size = len(self._header)
        self._closed: list[ClosedSegment] = []
        self._closed_lock = threading.Lock()

    def append(self, records: list[bytes], first_lsn: int, last_lsn: int, *,
               sync: bool = False) -> None:
        """Write records `first_lsn..last_lsn` (encoded, in LSN order) with ONE write call,
        as one frame (or more, only if they exceed the frame size limit: then a segment may be
        started between two of them, so that none grows past one frame over its size). With
        `sync`, then `sync()`: the last write and the fdatasync in one C call when they can be
        (`SYSCALLS.write_sync`: the GIL let go once, not twice)."""
        frames = _frames(records, first_lsn)
        last_frame = frames[-1][0]
        # Not with a crash point armed between the two, nor with either call replaced by the
        # fault-injection harness (it records or fails them one by one), unless it replaced
        # the one call too (then it sees that).
        one_call = sync and not crashpoints.ARMED and (
            "write_sync" in vars(SYSCALLS)
            or SYSCALLS.write is Syscalls.write and SYSCALLS.fdatasync is Syscalls.fdatasync)
        for data, first, last in frames:
            if self.full():
                self._rotate(first)
            if crashpoints.ARMED:
                crashpoints.reached("wal.before_write")
            # Count what we attempt before writing: after a failed write the size is unknown,
            # and the cache refuses further writes anyway.
            self._size += len(data)
            if one_call and data is last_frame:
                synced = self._size
                # Raises if the write or the fdatasync fails; the log has then failed for good
                # (wal/commit.py), so `_last_lsn` is left as it was either way.
                SYSCALLS.write_sync(self._fd, data)
                self._last_lsn = last
                self._mark(synced)
                return
            write_all(self._fd, data)
            self._last_lsn = last
            if crashpoints.ARMED:
                crashpoints.reached("wal.after_write")
        assert self._last_lsn == last_lsn
        if sync:
            self.sync()

    @property
    def fd(self) -> int:
        return self._fd

    def pipe_ready(self) -> bool:
        """Whether a `Pipe` (wal/_pipe.c) may write this log: not with sync marks, a crash
        point armed, or a system call replaced by the fault-injection harness (it would not
        see the thread's calls)."""
        return (not self._sync_marks and not crashpoints.ARMED
                and SYSCALLS.write is _PLAIN_WRITE and SYSCALLS.fdatasync is _PLAIN_FDATASYNC
                and SYSCALLS.write_sync is _PLAIN_WRITE_SYNC)

    def full(self) -> bool:
        """The next frame goes to a new segment (`append` rotates by itself; a `Pipe`'s
        writer calls `rotate_to` first)."""
        return self._size >= self._segment_size and self._last_lsn >= self._first_lsn

    def frame_one(self, record: bytes, lsn: int) -> bytes:
        """Record `lsn` as a frame of its own, counted as appended, for a `Pipe` to write
        into the segment (not `full()`)."""
        frame = encode_frame(encode_records([record]))
        self._size += len(frame)
        self._last_lsn = lsn
        return frame

    def rotate_to(self, first_lsn: int, switch: Callable[[int], None]) -> None:
        """Start a new segment at `first_lsn`, every record before it written and fsync'd
        already (by the pipe): the old segment needs no fdatasync of its own. `switch(fd)`
        hands the pipe the new descriptor before the old one is closed (a closed number may
        be reused by any open in the process)."""
        self._rotate(first_lsn, synced=True, switch=switch)

    def sync(self) -> None:
        """fdatasync the active segment: everything appended so far is then on disk. With sync
        marks, then append a mark saying so (itself fsync'd by the next sync)."""
        if crashpoints.ARMED:
            crashpoints.reached("wal.before_fsync")
        synced = self._size
        SYSCALLS.fdatasync(self._fd)
        if crashpoints.ARMED:
            crashpoints.reached("wal.after_fsync")
        self._mark(synced)

    def _mark(self, synced: int) -> None:
        """With sync marks, say that the segment is fsync'd up to `synced` bytes (only once the
        fsync it reports has returned)."""
        if self._sync_marks and synced > len(self._header):
            mark = encode_mark(synced)
            self._size += len(mark)
            write_all(self._fd, mark)

    def _rotate(self, first_lsn: int, *, synced: bool = False,
                switch: Callable[[int], None] | None = None) -> None:
        # The old segment is made durable before the new one exists, so that only the newest
        # segment can ever end in a torn record (fsync="interval" leaves it unsynced otherwise).
        if not synced:
            SYSCALLS.fdatasync(self._fd)
        fd, path = create_segment(self._wal_dir, first_lsn, self._header)
        old_fd = self._fd
        with self._closed_lock:
            self._closed.append(
                ClosedSegment(self._first_lsn, self._last_lsn, self._path, self._size))
            self._fd, self._path = fd, path
            self._first_lsn, self._size = first_lsn, len(self._header)
        if switch is not None:
            switch(fd)
        SYSCALLS.close(old_fd)

    def delete_through(self, lsn: int) -> int:
        """Delete the closed segments whose records all have LSN <= `lsn`; return how many.

        The caller guarantees the database has committed everything up to `lsn`.
        """
        with self._closed_lock:
            drop = [segment for segment in self._closed if segment.last_lsn <= lsn]
        if not drop:
            return 0
        # Forget them only once deleted (and the directory fsync'd): after an error, the next
        # call tries again.
        delete_segments(self._wal_dir, [segment.path for segment in drop])
        with self._closed_lock:
            self._closed = [segment for segment in self._closed if segment not in drop]
        return len(drop)

    def sizes(self) -> tuple[int, int]:
        """(bytes, segments) of the log this writer holds on disk, the active segment included."""
        with self._closed_lock:
            closed_bytes = sum(segment.size for segment in self._closed)
            return self._size + closed_bytes, len(self._closed) + 1

    def close(self) -> None:
        SYSCALLS.close(self._fd)


def _frames(records: list[bytes], first_lsn: int) -> list[tuple[bytes, int, int]]:
    """(frame, first LSN, last LSN): one frame for the whole write, unless that would exceed
    the frame size limit."""
    if len(records) == 1 or sum(map(len, records)) <= MAX_SINGLE_RECORD:
        return [(encode_frame(encode_records(records)), first_lsn, first_lsn + len(records) - 1)]
    frames = []
    chunk: list[bytes] = []
    size = 0
    lsn = first_lsn
    for record in records:  # each record is at most MAX_SINGLE_RECORD (the cache checks)
        if chunk and size + len(record) > MAX_SINGLE_RECORD:
            frames.append((encode_frame(encode_records(chunk)), lsn, lsn + len(chunk) - 1))
            lsn += len(chunk)
            chunk, size = [], 0
        chunk.append(record)
        size += len(record)
    frames.append((encode_frame(encode_records(chunk)), lsn, lsn + len(chunk) - 1))
    return frames
