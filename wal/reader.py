"""`SegmentReader`: reads the records of one segment and tells a torn tail from corruption.

The policy, applied in `_damage`:
  * A bad frame in the LAST segment with no valid frame anywhere after it is a torn tail:
    the write that was cut off by the crash was never acknowledged (its fsync never returned),
    so instead of considering this an error we report where the valid data ends and how many
    bytes follow it. Zero-filled and garbage tails fall under this rule.
  * A bad frame followed by a valid one, or a bad frame in any earlier segment, is corruption:
    `CorruptLogError` naming the segment and the offset. Nothing is deleted.
  * A frame whose checksum is right but whose content is wrong (an LSN out of sequence, an
    unknown operation) is corruption wherever it is: a torn write cannot produce it.
A frame is one group-commit write, all or nothing (wal/format.py).

Segments are mapped, not read: a damaged length field can make the reader slice at most
`MAX_FRAME_PAYLOAD` bytes, and a huge file is never loaded whole.
"""

from __future__ import annotations

import mmap
import os
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import msgpack

from wbcache.errors import CorruptLogError, UnsupportedFormatError
from wbcache.wal.format import (
    FORMAT_VERSION,
    FRAME,
    FRAME_MAGIC,
    FRAME_SIZE,
    HEADER_SIZE,
    MAX_FRAME_PAYLOAD,
    OP_BATCH,
    OP_DELETE,
    OP_INCR,
    OP_PUT,
    header_version,
)

_EMPTY = b""


def decode_records(payload: bytes) -> Any:
    """msgpack-decode a frame payload (a list of records, if well formed).

    Limits follow len(payload), itself capped by MAX_FRAME_PAYLOAD.
    """
    return msgpack.unpackb(payload, raw=False, strict_map_key=False, use_list=True)


def _is_key(key: object) -> bool:
    return type(key) is str or type(key) is bytes


def _valid_op(item: list[Any], start: int) -> bool:
    """Whether item[start:] is a well-formed operation (op code first)."""
    size = len(item) - start
    op = item[start]
    if op == OP_PUT:
        return size == 3 and _is_key(item[start + 1]) and type(item[start + 2]) is bytes
    if op == OP_DELETE:
        return size == 2 and _is_key(item[start + 1])
    if op == OP_INCR:
        return (size == 4 and _is_key(item[start + 1])
                and type(item[start + 2]) is int and type(item[start + 3]) is int)
    return False


def valid_record(record: object) -> bool:
    """Whether a decoded payload is a well-formed [lsn, op, ...] record."""
    if type(record) is not list or len(record) < 3 or type(record[0]) is not int or record[0] < 1:
        return False
    if record[1] == OP_BATCH:
        items = record[2]
        return (len(record) == 3 and type(items) is list and len(items) > 0
                and all(type(item) is list and len(item) > 1 and _valid_op(item, 0)
                        for item in items))
    return _valid_op(record, 1)


@contextmanager
def mapped(path: str) -> Iterator[tuple[mmap.mmap | bytes, int]]:
    """(the segment's bytes, mapped read-only, and its size) for the `with` block."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        data: mmap.mmap | bytes = mmap.mmap(fd, 0, access=mmap.ACCESS_READ) if size else _EMPTY
    finally:
        os.close(fd)
    try:
        yield data, size
    finally:
        if isinstance(data, mmap.mmap):
            data.close()


def intact_frame(data: mmap.mmap | bytes, at: int, size: int) -> tuple[list[int], int]:
    """(LSNs of its records, end offset) of a valid frame at `at`, or ([], 0).

    Valid: marker, length in range, checksum right, every record well formed. Whether its LSNs
    fit the log around it is the caller's question."""
    if size - at < FRAME_SIZE:
        return [], 0
    magic, length, crc = FRAME.unpack_from(data, at)
    end = at + FRAME_SIZE + length
    if magic != FRAME_MAGIC or not 0 < length <= MAX_FRAME_PAYLOAD or end > size:
        return [], 0
    payload = data[at + FRAME_SIZE:end]
    if zlib.crc32(payload) != crc:
        return [], 0
    try:
        records = decode_records(payload)
    except Exception:  # msgpack raises several types for bad input
        return [], 0
    if type(records) is not list or not records or not all(map(valid_record, records)):
        return [], 0
    return [record[0] for record in records], end


def find_intact_frame(data: mmap.mmap | bytes, start: int, size: int
                      ) -> tuple[int, list[int], int] | None:
    """(offset, LSNs, end) of the first valid frame at or after `start`, resynchronising on the
    frame marker, or None."""
    at = data.find(FRAME_MAGIC, start)
    while at != -1:
        lsns, end = intact_frame(data, at, size)
        if lsns:
            return at, lsns, end
        at = data.find(FRAME_MAGIC, at + 1)
    return None


class SegmentReader:
    """Iterate the records of the segment at `path` whose name says it starts at `first_lsn`.

    After iteration: `end` is the offset just past the last valid record, `torn_bytes` how many
    bytes of torn tail follow it (0 when the segment ends cleanly), `last_lsn` the LSN of the
    last valid record (first_lsn - 1 when there is none), `records` how many were read.
    """

    def __init__(self, path: str, *, first_lsn: int, is_last: bool) -> None:
        self.path = path
        self.first_lsn = first_lsn
        self.is_last = is_last
        self.size = 0
        self.end = 0
        self.torn_bytes = 0
        self.torn_reason: str | None = None
        self.last_lsn = first_lsn - 1
        self.records = 0

    def __iter__(self) -> Iterator[list[Any]]:
        for records in self.frames():
            yield from records

    def frames(self) -> Iterator[list[list[Any]]]:
        """The records frame by frame (one group-commit write each): fewer steps for bulk
        readers such as recovery."""
        with mapped(self.path) as (data, self.size):
            yield from self._frames(data)

    def _frames(self, data: mmap.mmap | bytes) -> Iterator[list[list[Any]]]:
        size = self.size
        version = header_version(data[:HEADER_SIZE])
        if version is None:
            self._damage(data, 0, "damaged or missing segment header", self.first_lsn - 1)
            return
        if version != FORMAT_VERSION:
            raise UnsupportedFormatError(self.path, version, FORMAT_VERSION)
        # This loop is recovery's cost (one pass per frame): progress lives in locals, handed
        # to `_damage` when damage is judged and stored when the loop ends.
        pos = HEADER_SIZE
        expected = self.first_lsn
        count = 0
        unpack_frame = FRAME.unpack_from
        crc32 = zlib.crc32
        unpackb = msgpack.unpackb
        try:
            while pos < size:
                if size - pos < FRAME_SIZE:
                    self._damage(data, pos, "record header cut off at end of file", expected - 1)
                    return
                magic, length, crc = unpack_frame(data, pos)
                if magic != FRAME_MAGIC:
                    self._damage(data, pos, "bad record marker", expected - 1)
                    return
                if length == 0 or length > MAX_FRAME_PAYLOAD:
                    self._damage(data, pos, f"record length {length} out of range", expected - 1)
                    return
                end = pos + FRAME_SIZE + length
                if end > size:
                    self._damage(data, pos, f"record of {length} bytes cut off at end of file",
                                 expected - 1, claimed=(end, crc))
                    return
                payload = data[pos + FRAME_SIZE:end]
                if crc32(payload) != crc:
                    self._damage(data, pos, "checksum mismatch", expected - 1,
                                 claimed=(end, crc))
                    return
                try:  # decode_records, inlined
                    records = unpackb(payload, raw=False, strict_map_key=False)
                except Exception as exc:  # msgpack raises several types for bad input
                    raise CorruptLogError(self.path, pos, f"undecodable frame ({exc})") from exc
                if type(records) is not list or not records:
                    raise CorruptLogError(self.path, pos,
                                          "malformed frame (not a list of records)")
                for record in records:  # a frame is all or nothing: check it whole, then yield
                    # A put [lsn, OP_PUT, key, value] is checked inline (valid_record, the
                    # common case); anything else goes through valid_record.
                    if not (type(record) is list and len(record) == 4 and record[1] == OP_PUT
                            and type(record[0]) is int and type(record[3]) is bytes
                            and (type(record[2]) is str or type(record[2]) is bytes)
                            ) and not valid_record(record):
                        raise CorruptLogError(self.path, pos, "malformed record")
                    if record[0] != expected:
                        raise CorruptLogError(self.path, pos, f"record has LSN {record[0]} "
                                                              f"where {expected} was expected")
                    expected += 1
                count += len(records)
                pos = end
                yield records
        finally:
            self.records = count
            if self.torn_bytes == 0:
                self.end, self.last_lsn = pos, expected - 1

    def _damage(self, data: mmap.mmap | bytes, offset: int, reason: str, last_lsn: int,
                claimed: tuple[int, int] | None = None) -> None:
        """Apply the torn-tail policy to a bad record at `offset` (see the module docstring).

        `claimed` is (end, crc) when the bad record's marker and length looked sound: then a
        valid-looking record INSIDE that extent may be a user's value that happens to hold a
        log record (a torn write of it must stay a torn tail). It counts as evidence of
        corruption only if the bytes before it match the claimed checksum, i.e. the bad
        record is intact and only its length field was damaged.
        """
        self.end, self.last_lsn = offset, last_lsn
        if not self.is_last:
            raise CorruptLogError(self.path, offset, reason)
        later = self._find_valid_record(data, offset, claimed)
        if later is not None:
            raise CorruptLogError(
                self.path, offset, f"{reason}; a valid record follows at offset {later}"
            )
        self.end = offset
        self.torn_bytes = self.size - offset
        self.torn_reason = reason

    def _find_valid_record(self, data: mmap.mmap | bytes, offset: int,
                           claimed: tuple[int, int] | None) -> int | None:
        """Offset of the first valid frame after the bad one at `offset` that is newer than
        the last good record and proves the damage is not a torn tail, or None."""
        found = find_intact_frame(data, offset + 1, self.size)
        while found is not None:
            at, lsns, _ = found
            if lsns[0] > self.last_lsn and (
                    claimed is None or at >= claimed[0]
                    or zlib.crc32(data[offset + FRAME_SIZE:at]) == claimed[1]):
                return at
            found = find_intact_frame(data, at + 1, self.size)
        return None
