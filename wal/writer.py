"""`LogWriter`: appends framed records to the active segment and rotates segments.

Whether and when to fsync is decided one layer up (`wal/commit.py`); the writer only offers
`sync()`. It never appends to a segment that existed before it was created: every open starts a
fresh segment, so a torn tail can only ever be at the end of the newest file.

**The mapped segment** (fsync="interval"). There a write is acknowledged once it is in the page
cache, which a `kill -9` does not touch, and a lone writer paid one `write` system call per put
for that. Instead the active segment is written through a shared memory map, one window (1 MiB,
or less for a small segment) at a time, each reserved first (`SYSCALLS.reserve`: so that a
full disk is an error here, not a SIGBUS later): a put is a copy into memory the kernel already
owns (`write_mapped`). fdatasync writes back the map's dirty pages as it does written ones.
What the writer had not reached reads as zeros, which the reader takes as the clean end of a
segment (wal/reader.py). A segment is never shrunk back to its size: `wbcache inspect`, `verify`
and the like map it from other processes, and a file shrunk under a reader's map is a SIGBUS
in that reader. The fault-injection harness replacing `write`, or a crash point armed, retires
the map for good (`map_ready`): records are then written from the end of what was mapped, over
the zeros, so the harness sees every byte from then on. A record larger than
`MAPPED_RECORD_LIMIT` is not copied under the sequencer's lock: a leader writes it.

Thread-safety: `append`, `sync` and `close` are called by one group-commit leader at a time;
`frame_one` (the pipe's, wal/_pipe.c) with the sequencer's lock held, and `rotate_to` by the
one writer starting a segment, the lock released but every other writer kept out.
`write_mapped` and `mark` are called with the sequencer's lock held, never while a leader
writes records (`append`); a leader's fdatasync may run meanwhile. `delete_through` and `sizes`
may be called from any thread; they only touch the list of closed segments, under its own lock.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass

from wbcache.wal import crashpoints
from wbcache.wal.format import (
    MAX_SINGLE_RECORD,
    encode_frame,
    encode_header,
    encode_mark,
    encode_one_frame,
    encode_records,
    max_segment_bytes,
    read_header,
)
from wbcache.wal.segments import create_segment, delete_segments
from wbcache.wal.syscalls import SYSCALLS, Syscalls, write_all

# The calls as imported: one replaced later, on SYSCALLS or on its class, is the harness's.
_PLAIN_WRITE, _PLAIN_FDATASYNC, _PLAIN_WRITE_SYNC = (
    Syscalls.write, Syscalls.fdatasync, Syscalls.write_sync)
# Bytes of a mapped segment reserved and mapped at once (at most): a segment's file holds at
# most this much of zeros after its last write, and the process maps no more of the log.
_WINDOW = 1024 * 1024
_MIN_WINDOW = 64 * 1024  # a small segment's window: this, or its size rounded up to pages
# A record larger than this goes to a leader, written with the sequencer's lock released, not
# copied into the map under it (a 64 MiB copy would stall every other writer).
MAPPED_RECORD_LIMIT = 256 * 1024
# What mmap raises where a file system cannot map a file shared and writable.
_UNMAPPABLE = (errno.ENODEV, errno.EINVAL, errno.EOPNOTSUPP, errno.EACCES)

log = logging.getLogger("wbcache.wal")


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
        # Held for the writer's life: segments are made and deleted by path, so each time the
        # path must still lead to this directory (`_check_dir`).
        self._dir_fd = os.open(wal_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self._segment_size = segment_size
        self._header = encode_header(segment_size=segment_size, sync_marks=sync_marks)
        self._sync_marks = sync_marks
        # The mapped segment (module docstring): under fsync="interval", until retired.
        self._mapping = sync_marks and _unwatched()
        try:
            self._fd, self._path = create_segment(wal_dir, next_lsn, self._header,
                                                  mappable=self._mapping)
        except BaseException:
            os.close(self._dir_fd)
            raise
        self._first_lsn = next_lsn
        self._last_lsn = next_lsn - 1  # no record yet
        self._size = len(self._header)
        self._closed: list[ClosedSegment] = []
        self._closed_lock = threading.Lock()
        self._map: mmap.mmap | None = None
        self._map_start = self._map_end = 0
        self._map_limit = max_segment_bytes(read_header(self._header))  # type: ignore[arg-type]
        pages = -(-segment_size // mmap.PAGESIZE) * mmap.PAGESIZE
        self._window = min(_WINDOW, max(_MIN_WINDOW, pages))  # a multiple of the page size
        self._file_end = self._size  # the active segment's file size (past `_size`: reserved)
        try:
            self._map_first_window()
        except BaseException:
            self.close()
            raise

    def append(self, records: list[bytes], first_lsn: int, last_lsn: int, *,
               sync: bool = False) -> int:
        """Write records `first_lsn..last_lsn` (encoded, in LSN order) with ONE write call,
        as one frame (or more, only if they exceed the frame size limit: then a segment may be
        started between two of them, so that none grows past one frame over its size, and with
        `sync` each is fdatasync'd before the next is written). With
        `sync`, then `sync()`: the last write and the fdatasync in one C call when they can be
        (`SYSCALLS.write_sync`: the GIL let go once, not twice). Returns what `sync()` does
        (0 without `sync`)."""
        if self._mapping and not self.map_ready():
            self._retire_map()
        frames = _frames(records, first_lsn)
        last_frame = frames[-1][0]
        # Not with a crash point armed between the two, nor with either call replaced by the
        # fault-injection harness (it records or fails them one by one), unless it replaced
        # the one call too (then it sees that); nor into a map.
        one_call = sync and not self._mapping and not crashpoints.ARMED and (
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
                return synced
            if self._mapping:
                self._copy(data, self._size - len(data))
            else:
                write_all(self._fd, data)
            self._last_lsn = last
            if crashpoints.ARMED:
                crashpoints.reached("wal.after_write")
            if sync and data is not last_frame:
                # One unsynced frame at a time (docs/design.md, the log's rules): a power cut
                # could keep the next and lose this one, a bad frame followed by valid data
                SYSCALLS.fdatasync(self._fd)
        assert self._last_lsn == last_lsn
        return self.sync() if sync else 0

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

    def map_ready(self) -> bool:
        """Whether records may go through the map: under fsync="interval", not retired, and
        no harness watching (`_unwatched`)."""
        return self._mapping and _unwatched()

    def write_mapped(self, record: bytes, lsn: int) -> bool:
        """Append record `lsn` as a frame of its own through the map, and return True; or
        return False, writing nothing, when the segment is full (a leader's `append` starts
        the next one) or the map is retired. Raises `OSError` when no room can be reserved,
        and the log has then failed (wal/commit.py)."""
        if (self._size >= self._segment_size or not self._mapping
                or len(record) > MAPPED_RECORD_LIMIT):
            return False
        if not _unwatched():  # `map_ready()`, `_mapping` being known True
            self._retire_map()
            return False
        frame = encode_one_frame(record)
        at = self._size
        end = at + len(frame)
        if self._map_start <= at and end <= self._map_end:
            self._map[at - self._map_start:end - self._map_start] = frame  # type: ignore[index]
        else:
            self._copy(frame, at)
        # Counted once copied, not before as `append` does: a leader's `sync` reads the size
        # without the lock, and must not mark as fsync'd a frame still being copied.
        self._size = end
        self._last_lsn = lsn
        return True

    def _copy(self, data: bytes, at: int) -> None:
        """Copy `data` into the segment at offset `at` through the map, window by window."""
        view = memoryview(data)
        while view:
            if not self._map_start <= at < self._map_end:
                self._remap(at)
            count = min(len(view), self._map_end - at)
            start = at - self._map_start
            self._map[start:start + count] = view[:count]  # type: ignore[index]
            view, at = view[count:], at + count

    def _remap(self, at: int) -> None:
        """Map the window holding offset `at`, reserved on disk first (never past the largest
        file a reader accepts, wal/format.py)."""
        self._unmap()
        start = at - at % self._window
        length = min(self._window, self._map_limit - start)
        try:  # from the file's end: every byte written is before it
            SYSCALLS.reserve(self._fd, max(start, self._file_end), start + length)
        except OSError as error:  # a full disk: say which file (fallocate's error names none)
            if error.filename is not None:
                raise
            raise OSError(error.errno, error.strerror, self._path) from None
        self._file_end = max(self._file_end, start + length)
        self._map = mmap.mmap(self._fd, length, offset=start)
        self._map_start, self._map_end = start, start + length

    def _map_first_window(self) -> None:
        """Map a new segment's first window at once: a file system that refuses a shared
        writable map (FUSE with direct_io: ENODEV; 9p without a cache: EINVAL) leaves the map
        retired, records written, from the start. A failure to reserve room is raised."""
        if not self._mapping:
            return
        try:
            self._remap(self._size)
        except OSError as error:
            if error.errno not in _UNMAPPABLE:
                raise
            log.warning("the log is written, not mapped (%s): %s", self._path, error)
            self._retire_map()

    def _unmap(self) -> None:
        """Let go of the window (its dirty pages stay in the page cache)."""
        if self._map is not None:
            self._map.close()
            self._map = None
            self._map_start = self._map_end = 0

    def _retire_map(self) -> None:
        """From here on, `write` at the end of what was written (the descriptor does not
        append, wal/segments.py), over the reserved zeros: the harness sees it all."""
        self._unmap()
        self._mapping = False
        os.lseek(self._fd, self._size, os.SEEK_SET)

    def full(self) -> bool:
        """The next frame goes to a new segment (`append` rotates by itself; a `Pipe`'s
        writer calls `rotate_to` first)."""
        return self._size >= self._segment_size and self._last_lsn >= self._first_lsn

    def frame_one(self, record: bytes, lsn: int) -> bytes:
        """Record `lsn` as a frame of its own, counted as appended, for a `Pipe` to write
        into the segment (not `full()`)."""
        frame = encode_one_frame(record)
        self._size += len(frame)
        self._last_lsn = lsn
        return frame

    def rotate_to(self, first_lsn: int, switch: Callable[[int], None]) -> None:
        """Start a new segment at `first_lsn`, every record before it written and fsync'd
        already (by the pipe): the old segment needs no fdatasync of its own. `switch(fd)`
        hands the pipe the new descriptor before the old one is closed (a closed number may
        be reused by any open in the process)."""
        self._rotate(first_lsn, synced=True, switch=switch)

    def sync(self) -> int:
        """fdatasync the active segment: everything appended so far is then on disk. Returns
        the offset up to which it is, for `mark`."""
        if crashpoints.ARMED:
            crashpoints.reached("wal.before_fsync")
        synced = self._size
        SYSCALLS.fdatasync(self._fd)
        if crashpoints.ARMED:
            crashpoints.reached("wal.after_fsync")
        return synced

    def mark(self, synced: int) -> None:
        """With sync marks, say that the segment is fsync'd up to offset `synced` (returned by
        a `sync` that has returned; itself fsync'd by the next sync). The sequencer's lock
        held: mapped writers append meanwhile."""
        if self._sync_marks and synced > len(self._header):
            if self._mapping and not self.map_ready():
                self._retire_map()  # the harness replacing `write` sees the mark too
            mark = encode_mark(synced)
            if self._mapping:
                self._copy(mark, self._size)
                self._size += len(mark)
            else:
                self._size += len(mark)
                write_all(self._fd, mark)

    def _rotate(self, first_lsn: int, *, synced: bool = False,
                switch: Callable[[int], None] | None = None) -> None:
        # The old segment is made durable before the new one exists, so that only the newest
        # segment can ever end in a torn record (fsync="interval" leaves it unsynced otherwise).
        self._unmap()
        if not synced:
            SYSCALLS.fdatasync(self._fd)
        self._check_dir()
        fd, path = create_segment(self._wal_dir, first_lsn, self._header,
                                  mappable=self._mapping)
        old_fd = self._fd
        with self._closed_lock:
            self._closed.append(
                ClosedSegment(self._first_lsn, self._last_lsn, self._path,
                              max(self._size, self._file_end)))
            self._fd, self._path = fd, path
            self._first_lsn, self._size = first_lsn, len(self._header)
            self._file_end = self._size
        if switch is not None:
            switch(fd)
        SYSCALLS.close(old_fd)
        self._map_first_window()

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
        self._check_dir()
        delete_segments(self._wal_dir, [segment.path for segment in drop])
        with self._closed_lock:
            self._closed = [segment for segment in self._closed if segment not in drop]
        return len(drop)

    def sizes(self) -> tuple[int, int]:
        """(bytes, segments) of the log this writer holds on disk, the active segment included."""
        with self._closed_lock:
            closed_bytes = sum(segment.size for segment in self._closed)
            return max(self._size, self._file_end) + closed_bytes, len(self._closed) + 1

    def _check_dir(self) -> None:
        """Raise OSError (ESTALE: a failed I/O to the flusher and the group commit) unless
        the log's path still leads to the directory it named at open: one moved away, or
        swapped for a link, while the cache runs would have segments made, and another
        cache's deleted, in whatever is there now."""
        try:
            now = os.stat(self._wal_dir)
        except OSError:
            now = None
        held = os.fstat(self._dir_fd)
        if now is None or (now.st_dev, now.st_ino) != (held.st_dev, held.st_ino):
            raise OSError(
                errno.ESTALE,
                f"{self._wal_dir} is no longer the log directory this cache opened (moved, "
                f"removed or replaced while it ran): no segment is made or deleted through it; "
                f"close the cache and put its directory back")

    def close(self) -> None:
        """Idempotent: an interrupted `Cache.close` runs its steps again."""
        self._unmap()
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            SYSCALLS.close(fd)
        if self._dir_fd >= 0:
            dir_fd, self._dir_fd = self._dir_fd, -1
            os.close(dir_fd)


def _unwatched() -> bool:
    """No crash point armed and `write` not replaced by the fault-injection harness: it records
    or fails every byte written, and would not see a copy into memory. One that replaces only
    the syncs (LazyFS's worker journals them) leaves the map be."""
    return not crashpoints.ARMED and SYSCALLS.write is _PLAIN_WRITE


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
