"""Reading a segment: the one log walker, and the one resync rule.

`read_segment` walks a segment's frames from its header, yields each frame's records, and when
it is done *returns* what it found (`SegmentEnd`: records read, where valid data ends, a torn
tail, or the damage that stopped it). Nothing is filled in behind the caller's back: a caller
that stops early simply has no result.

Damage is judged by the rule stated in `wal/format.py`, applied in `_judge`:
  * in the LAST segment, a bad frame with no intact, newer frame after it is a torn tail: the
    write a crash cut off, never acknowledged (its fsync never returned); instead of treating
    it as an error we report where the valid data ends and how many bytes follow. In a segment
    with sync marks (fsync="interval"), damage at or past the last fsync'd offset is a torn
    tail whatever follows it;
  * anything else is corruption (`SegmentEnd.damage`, a `CorruptLogError` naming the segment
    and offset): a bad frame followed by a valid one, damage before the last fsync, damage in
    an earlier segment, and a frame whose checksum is right but whose content is not usable
    (an LSN out of sequence, a malformed record, a key the database cannot store, a value
    that does not decode: a torn write cannot produce those).
Zeros from a frame boundary to the end of a segment written under fsync="interval" (it has
sync marks) are its clean end, not damage: space the writer reserved and had not reached
(`zero_tail`; wal/format.py). Under fsync="always" they stay a torn tail.
`intact_frames` is the resync rule: every later consumer of a damaged segment (the damage
judgement here, `wbcache verify`, salvage's counts) finds data after damage with it alone.

A segment is checked before it is read: it must be a regular file (never a FIFO, a device or
a symlink), with a readable header, and no larger than its writer can have left
(`format.max_segment_bytes`), so a planted or runaway file is refused at once. Segments are
mapped, not read: a damaged length field makes the reader slice at most `MAX_FRAME_PAYLOAD`.

Over 500 lines on purpose: the walker, the resync rule (with the span checksums that keep it
one pass) and the damage rule judge the same bytes, and a gap between them shows only when
they are read side by side.
"""

from __future__ import annotations

import errno
import heapq
import mmap
import os
import stat
import zlib
from collections.abc import Callable, Generator, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from wbcache.errors import CorruptLogError, UnsupportedFormatError
from wbcache.wal.format import (
    FORMAT_VERSION,
    FRAME,
    FRAME_MAGIC,
    FRAME_SIZE,
    MARK_MAGIC,
    MAX_FRAME_PAYLOAD,
    READABLE_VERSIONS,
    SegmentHeader,
    decode_mark,
    header_problem,
    max_segment_bytes,
    read_header,
)
from wbcache.wal.records import (
    DEFAULT_MAX_KEY_SIZE,
    OP_PUT,
    Record,
    frame_lsns,
    read_frame,
)

try:  # the optional C fast path over runs of plain-put frames (wal/_walk.c, built by setup.py)
    from wbcache.wal import _walk as _fast
except ImportError:  # not built (no compiler): the same walk, in Python alone
    _fast = None
# It mirrors a subset of this walk's rules (format.py's frame, records.py's plain put): a build
# of another format or op code (a stale .so) is not used.
_scan = (_fast.scan if _fast is not None and (_fast.FRAME_SIZE, _fast.FRAME_MAGIC, _fast.OP_PUT)
         == (FRAME_SIZE, FRAME_MAGIC, OP_PUT) else None)

Data = mmap.mmap | bytes
_EMPTY = b""
# Pages of a segment read past are released from the process every so many bytes, at the end of
# a batch: they stay in the page cache, but a 64 MiB segment read whole no longer counts 64 MiB
# in the reader's RSS.
_RELEASE_EVERY = 8 * 1024 * 1024
_RELEASE: int | None = getattr(mmap, "MADV_DONTNEED", None)
_BATCH = 1024  # records handed over at once (whole frames)
_FILE_KINDS = {stat.S_IFIFO: "a FIFO", stat.S_IFCHR: "a character device",
               stat.S_IFBLK: "a block device", stat.S_IFSOCK: "a socket",
               stat.S_IFDIR: "a directory", stat.S_IFLNK: "a symbolic link"}


@dataclass
class SegmentEnd:
    """What reading one segment found, returned once it is read."""

    path: str
    first_lsn: int  # from the segment's name
    size: int
    records: int  # valid records read (up to the damage, if any)
    end: int  # offset just past the last valid frame: where a torn tail or the damage starts
    last_lsn: int  # of the last valid record; first_lsn - 1 when there is none
    torn_bytes: int = 0  # a torn tail (last segment only): not damage, recovery drops it
    torn_reason: str | None = None
    damage: CorruptLogError | None = None  # corruption that stopped the read
    synced_to: int = 0  # sync-marked segments: every byte before this offset was fsync'd

    def check(self) -> None:
        """Raise the damage found, if any."""
        if self.damage is not None:
            raise self.damage


# ------------------------------------------------------------------ files

def file_problem(path: str) -> str | None:
    """Why the entry at `path` cannot be a segment (not a regular file), or None. Does not
    follow a symlink. Raises FileNotFoundError for a missing file."""
    mode = os.lstat(path).st_mode
    if stat.S_ISREG(mode):
        return None
    return f"not a regular file but {_FILE_KINDS.get(stat.S_IFMT(mode), 'a special file')}"


@contextmanager
def mapped(path: str) -> Iterator[tuple[Data, int]]:
    """(the segment's bytes, mapped read-only, and its size) for the `with` block. Never
    follows a symlink nor blocks on a FIFO: raises `CorruptLogError` for a non-regular file."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # O_NOFOLLOW met a symlink
            raise CorruptLogError(path, 0, "not a regular file but a symbolic link") from None
        raise
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            kind = _FILE_KINDS.get(stat.S_IFMT(info.st_mode), "a special file")
            raise CorruptLogError(path, 0, f"not a regular file but {kind}")
        size = info.st_size
        data: Data = mmap.mmap(fd, 0, access=mmap.ACCESS_READ) if size else _EMPTY
    finally:
        os.close(fd)
    try:
        yield data, size
    finally:
        if isinstance(data, mmap.mmap):
            data.close()


# ------------------------------------------------------------------ the resync rule

def intact_frame(data: Data, at: int, size: int, max_key_size: int = DEFAULT_MAX_KEY_SIZE,
                 checksums: _Checksums | None = None) -> tuple[Sequence[int], int]:
    """(LSNs of its records, end offset) of an intact frame at `at`, or ([], 0). Intact:
    magic, length in range, inside the file, checksum right, every record usable. Whether its
    LSNs fit the log around it is the caller's question. `checksums` computes the payload's
    checksum without reading it (`_Checksums`)."""
    if size - at < FRAME_SIZE:
        return [], 0
    magic, length, crc = FRAME.unpack_from(data, at)
    end = at + FRAME_SIZE + length
    if magic != FRAME_MAGIC or not 0 < length <= MAX_FRAME_PAYLOAD or end > size:
        return [], 0
    if checksums is not None:
        if checksums.of(at + FRAME_SIZE, end) != crc:
            return [], 0
        payload = data[at + FRAME_SIZE:end]
    else:
        payload = data[at + FRAME_SIZE:end]
        if zlib.crc32(payload) != crc:
            return [], 0
    lsns = frame_lsns(payload, max_key_size)
    return ([], 0) if lsns is None else (lsns, end)


def intact_frames(data: Data, start: int, size: int, max_key_size: int = DEFAULT_MAX_KEY_SIZE,
                  candidate: Callable[[int], bool] | None = None
                  ) -> Iterator[tuple[int, Sequence[int], int]]:
    """(offset, LSNs, end) of every intact frame at or after `start`, in file order, found by
    the resync rule: search for the frame magic, accept only an intact frame there, go on
    from its end (or from the byte after a magic that did not start one). `candidate(at)`,
    asked first in file order, passes over a magic without decoding it (`_Extent.writers`).

    Each magic's checksum comes from `_Checksums`, not from reading its payload: a damaged
    region full of frame-shaped headers, each claiming a long payload (a torn value holding
    them), costs one pass over the bytes, not one per header.

    A segment larger than any its writer leaves holds no frame of the writer's: none is
    searched for (`read_segment` refuses it; a planted sparse file of many GiB would cost as
    many GiB of reading to `wbcache verify`, `inspect` and salvage)."""
    if size > max_segment_bytes(read_header(data[:32])):
        return
    checksums = _Checksums(data, start)
    at = data.find(FRAME_MAGIC, start)
    while at != -1:
        lsns, end = (intact_frame(data, at, size, max_key_size, checksums)
                     if candidate is None or candidate(at) else ([], 0))
        if lsns:
            yield at, lsns, end
            at = data.find(FRAME_MAGIC, end)
        else:
            at = data.find(FRAME_MAGIC, at + 1)


class _Checksums:
    """The CRC-32 of any span of `data` at or after `start`, in about constant time: running
    checksums from `start` are kept every `_BLOCK` bytes (computed once, forward, as far as
    asked), and the checksum of data[a:b] follows from those up to a and up to b, CRC-32
    being linear: crc(A + B) = shift(crc(A), len(B)) ^ crc(B) (zlib's crc32_combine)."""

    def __init__(self, data: Data, start: int) -> None:
        self._data = data
        self._start = start
        self._marks = [0]  # crc32(data[start:start + i * _BLOCK]) for each i so far

    def of(self, a: int, b: int) -> int:
        """zlib.crc32(data[a:b]), for start <= a <= b <= len(data)."""
        if b - a <= _DIRECT:  # as cheap to read as to compute
            return zlib.crc32(self._data[a:b])
        return self._upto(b) ^ _shift(self._upto(a), b - a)

    def _upto(self, end: int) -> int:
        """zlib.crc32(data[start:end])."""
        index = (end - self._start) // _BLOCK
        marks, data = self._marks, self._data
        while len(marks) <= index:
            at = self._start + (len(marks) - 1) * _BLOCK
            marks.append(zlib.crc32(data[at:at + _BLOCK], marks[-1]))
        at = self._start + index * _BLOCK
        return zlib.crc32(data[at:end], marks[index])


_BLOCK = 1024  # bytes between two running checksums kept
_DIRECT = 256  # a span this short is checksummed by reading it
_CRC_POLY = 0xEDB88320  # CRC-32 (zlib's), bit-reversed


def _times(a: int, b: int) -> int:
    """a * b modulo the CRC-32 polynomial (bit-reversed: x^0 is the top bit)."""
    product = 0
    bit = 1 << 31
    while a:
        if a & bit:
            product ^= b
            a ^= bit
        bit >>= 1
        b = (b >> 1) ^ _CRC_POLY if b & 1 else b >> 1
    return product


# x^(2^k) modulo the polynomial, for k = 0..63
_X_POWERS = [1 << 30]
for _ in range(63):
    _X_POWERS.append(_times(_X_POWERS[-1], _X_POWERS[-1]))
_shifts: dict[int, int] = {}  # byte count -> x^(8 * count): claimed lengths repeat


def _python_shift(crc: int, count: int) -> int:
    """What crc(A) contributes to crc(A + B) for any B of `count` bytes: crc(A + B) ^ crc(B),
    given crc(A) (crc(A) times x^(8 * count))."""
    power = _shifts.get(count)
    if power is None:
        power, n, k = 1 << 31, count, 3  # x^0; count bytes are 8 * count = count << 3 bits
        while n:
            if n & 1:
                power = _times(_X_POWERS[k], power)
            n >>= 1
            k += 1
        if len(_shifts) >= 4096:
            _shifts.clear()
        _shifts[count] = power
    return _times(power, crc)


# In C where the module is built (zlib's crc32_combine): some 60 times quicker per header.
_shift = getattr(_fast, "crc32_shift", _python_shift)


def intact_marks(data: Data, start: int, size: int) -> Iterator[tuple[int, int]]:
    """(offset, synced_end) of every intact sync mark at or after `start`."""
    at = data.find(MARK_MAGIC, start)
    while at != -1:
        mark = decode_mark(data, at, size)
        if mark is not None:
            yield at, mark[0]
        at = data.find(MARK_MAGIC, at + 1)


class _Extent:
    """Which bytes after a bad frame at `offset` the writer can have put there, for the damage
    rule. `claimed` is (end, crc) when the frame's marker and length looked sound: its bytes up
    to that end are its own payload, a user's value, which may hold anything log-shaped (a copy
    of another segment holds intact frames and sync marks). A frame or mark found inside that
    extent is the writer's only if the bytes before it match the claimed checksum, i.e. the bad
    frame is intact and only its length field was damaged; one at or past the end is the
    writer's (nothing it writes overlaps a frame). Without `claimed` everything is.

    Asked in file order: the checksum is carried forward, each byte read once, so a value full
    of log-shaped bytes costs one pass over it, not one per hit."""

    def __init__(self, data: Data, offset: int, claimed: tuple[int, int] | None) -> None:
        self._data = data
        self._end, self._crc = claimed if claimed is not None else (offset, 0)
        self._upto = offset + FRAME_SIZE  # the payload's checksum is `_running` up to here
        self._running = 0

    def writers(self, at: int) -> bool:
        """Whether a frame or mark found at `at` can be the writer's. A match ends the extent
        there: the bad frame's real payload ends at `at`, and everything after is the
        writer's (the frames and then the mark of a later fsync, say)."""
        if at >= self._end:
            return True
        if at > self._upto:
            self._running = zlib.crc32(self._data[self._upto:at], self._running)
            self._upto = at
        if self._running != self._crc:
            return False
        self._end = at
        return True

    def frame_starts(self) -> Iterator[tuple[int, int]]:
        """(offset, 0) of each frame magic inside the extent, as `intact_marks` gives marks
        (a frame says nothing synced): where the bad frame's real payload may end. Not
        decoded: the checksum in `writers` is the test, one pass over the extent, however
        many frame-shaped headers claiming large lengths a value holds."""
        at = self._data.find(FRAME_MAGIC, self._upto, self._end)
        while at != -1:
            yield at, 0
            at = self._data.find(FRAME_MAGIC, at + 1, self._end)


_NO_MAGIC = bytes(4)
_ZERO_CHUNK = 1024 * 1024


def zero_tail(data: Data, at: int, size: int) -> bool:
    """Whether every byte from `at` to the end of the segment is zero: space its writer
    reserved and had not reached (wal/writer.py's mapped segment), a clean end of the log.
    Read a chunk at a time; pages read are released from the process again."""
    release = (data.madvise if isinstance(data, mmap.mmap) and _RELEASE is not None
               else None)
    for start in range(at, size, _ZERO_CHUNK):
        end = min(start + _ZERO_CHUNK, size)
        if data[start:end].count(0) != end - start:
            return False
        if release is not None:
            page = start - start % mmap.PAGESIZE
            release(_RELEASE, page, end - page)
    return True


# ------------------------------------------------------------------ the walker

def read_segment(path: str, *, first_lsn: int, is_last: bool,
                 max_key_size: int = DEFAULT_MAX_KEY_SIZE
                 ) -> Generator[list[Record], None, SegmentEnd]:
    """Yield the records of the segment at `path` frame by frame (one group-commit write
    each), in LSN order starting at `first_lsn`; return a `SegmentEnd`.

    Damage is judged as the module docstring says and returned, never raised. Raises
    `UnsupportedFormatError` for a segment of a version (or flags) this reader does not know,
    `FileNotFoundError` if the file vanished, other `OSError`s if it cannot be read."""
    result = SegmentEnd(path, first_lsn, 0, 0, 0, first_lsn - 1)
    kind = file_problem(path)
    if kind is not None:
        result.damage = CorruptLogError(path, 0, kind)
        return result
    with mapped(path) as (data, size):
        result.size = size
        header = read_header(data[:32])
        if header is not None and header_problem(header) is not None:
            if header.version not in READABLE_VERSIONS:
                raise UnsupportedFormatError(path, header.version, FORMAT_VERSION)
            result.damage = CorruptLogError(
                path, 0, f"segment header with {header_problem(header)}")
            return result
        # Before anything past the header is read, a header-less file too (it is searched
        # for frames, below): a planted sparse file of many GiB costs nothing on disk.
        if size > max_segment_bytes(header):
            result.damage = CorruptLogError(
                path, 0, f"segment of {size} bytes is larger than any its writer leaves "
                         f"({max_segment_bytes(header)} bytes); refusing to read it")
            return result
        if header is None:
            _judge(result, data, 0, "damaged or missing segment header", None,
                   is_last, max_key_size, None)
            return result
        yield from _walk(result, data, header, is_last, max_key_size)
    return result


def _walk(result: SegmentEnd, data: Data, header: SegmentHeader, is_last: bool,
          max_key_size: int) -> Generator[list[Record], None, None]:
    # This loop is recovery's cost (one pass per frame): progress lives in locals, stored in
    # `result` when the walk ends. Records are handed over in batches of whole, checked frames
    # (a lone writer's log is one record per frame: one generator step per frame would cost
    # more than reading it).
    size = result.size
    pos = header.size
    expected = result.first_lsn
    count = 0
    marks = header.sync_marks
    unpack_frame = FRAME.unpack_from
    crc32 = zlib.crc32
    released = 0  # pages before this offset were released
    release = (data.madvise if isinstance(data, mmap.mmap) and _RELEASE is not None
               else None)
    batch: list[Record] = []
    reason: str | None = None  # why the walk stopped before the end of the file
    claimed: tuple[int, int] | None = None
    corrupt = False  # the reason is corruption whatever follows (a complete, wrong frame)
    scan = _scan
    while pos < size:
        records = None
        if scan is not None:
            # As far as the frames are plain puts this loop would accept as they are, the C
            # fast path takes them (wal/_walk.c); it stops at the first other frame, which the
            # loop below judges.
            records, fast_end, fast_next = scan(data, pos, size, expected, max_key_size,
                                                MAX_FRAME_PAYLOAD, _BATCH - len(batch),
                                                released + _RELEASE_EVERY)
            if records:
                pos, expected = fast_end, fast_next
        if not records:
            if size - pos < FRAME_SIZE:
                if not (marks and zero_tail(data, pos, size)):
                    reason = "frame header cut off at end of file"
                break
            magic, length, crc = unpack_frame(data, pos)
            if magic != FRAME_MAGIC:
                if marks and magic == MARK_MAGIC:
                    mark = decode_mark(data, pos, size)
                    if mark is not None:
                        result.synced_to = max(result.synced_to, mark[0])
                        pos = mark[1]
                        continue
                if marks and magic == _NO_MAGIC and zero_tail(data, pos, size):
                    break  # where the writer had not reached: the clean end (format.py)
                reason = "bad frame marker"
                break
            if length == 0 or length > MAX_FRAME_PAYLOAD:
                reason = f"frame length {length} out of range"
                break
            end = pos + FRAME_SIZE + length
            if end > size:
                reason, claimed = f"frame of {length} bytes cut off at end of file", (end, crc)
                break
            payload = data[pos + FRAME_SIZE:end]
            if crc32(payload) != crc:
                reason, claimed = "checksum mismatch", (end, crc)
                break
            # From here the frame is a complete write: anything wrong is corruption.
            corrupt = True
            records, reason = read_frame(payload, max_key_size, expected)
            if reason is not None:  # nothing of a wrong frame counts
                break
            expected += len(records)
            corrupt = False
            pos = end
        count += len(records)
        batch += records
        # A batch ends at _BATCH records or _RELEASE_EVERY bytes read, whichever comes first:
        # a log of big values has few records, and its pages must be released all the same.
        if len(batch) >= _BATCH or pos - released >= _RELEASE_EVERY:
            if pos - released >= _RELEASE_EVERY:
                upto = pos - pos % mmap.PAGESIZE
                if release is not None:
                    release(_RELEASE, released, upto - released)
                released = upto
            yield batch
            batch = []
    if batch:
        yield batch
    result.records, result.end, result.last_lsn = count, pos, expected - 1
    if reason is None:
        return
    if corrupt:
        result.damage = CorruptLogError(result.path, pos, reason)
        return
    _judge(result, data, pos, reason, claimed, is_last, max_key_size, header)


def _judge(result: SegmentEnd, data: Data, offset: int, reason: str,
           claimed: tuple[int, int] | None, is_last: bool, max_key_size: int,
           header: SegmentHeader | None) -> None:
    """Apply the damage rule (module docstring) to a bad frame at `offset`: a torn tail
    (`torn_bytes`) or corruption (`damage`).

    `claimed` is (end, crc) when the bad frame's marker and length looked sound: then an
    intact-looking frame or sync mark INSIDE that extent may be a user's value that happens to
    hold log bytes (a torn write of it must stay a torn tail). It counts as evidence of
    corruption only if the bytes before it match the claimed checksum (`_Extent`)."""
    result.end = offset
    if not is_last:
        result.damage = CorruptLogError(result.path, offset, reason)
        return
    size = result.size
    extent = _Extent(data, offset, claimed)
    if header is not None and header.sync_marks:
        # A mark inside a torn frame's payload is a user's bytes, not the writer's word: a
        # kill -9 mid-copy of a value holding a copy of a log must stay a torn tail. Frame
        # starts inside the extent are asked too, in file order with the marks: the writer's
        # next frame at the bad frame's real end (only its length damaged) ends the extent,
        # so that a mark after more frames (one fsync covers several) still counts.
        later = max((synced for at, synced in heapq.merge(intact_marks(data, offset, size),
                                                          extent.frame_starts())
                     if extent.writers(at)), default=0)
        synced = max(result.synced_to, later)
        if synced > offset:
            result.damage = CorruptLogError(
                result.path, offset, f"{reason}, before offset {synced}, which was fsync'd")
            return
        result.torn_bytes, result.torn_reason = size - offset, (
            f"{reason} (past the last fsync at offset {result.synced_to}: "
            f"fsync=\"interval\" may lose this much)")
        return
    # Frames inside the extent are asked first whether they can be the writer's, undecoded:
    # a value full of frame-shaped headers costs one pass, not one checksum per header.
    for at, lsns, _ in intact_frames(data, offset + 1, size, max_key_size, extent.writers):
        if lsns[0] > result.last_lsn:
            result.damage = CorruptLogError(
                result.path, offset, f"{reason}; a valid record follows at offset {at}")
            return
    result.torn_bytes, result.torn_reason = size - offset, reason


def drain(walk: Generator[list[Record], None, SegmentEnd]) -> SegmentEnd:
    """Read a segment to its end, discarding the records; return what it found."""
    while True:
        try:
            next(walk)
        except StopIteration as stop:
            return stop.value  # type: ignore[no-any-return]
