"""The log format: only what the writer and the reader share.

A segment is a 20-byte header followed by frames:

    header = magic "WBCACHE\\0" (8) | version u16 LE | flags u16 LE | segment_size u32 LE
             | crc32(the 16 bytes before it) u32 LE
    frame  = frame magic b"\\xc1WBC" (4) | payload length u32 LE | crc32(payload) u32 LE | payload

Version 1 segments (16-byte header: magic | version u32 LE | crc32 u32 LE) are still read: as
`<8sHH` their version field reads as version 1 with no flags, and they carry no size.

A frame holds the records of one group-commit write: its payload is ONE msgpack array of
records, in LSN order (their encoding is `wal/records.py`). One CRC covers the whole write, so
if power loss keeps some pages of an unsynced write and not others, the frame fails as a whole
and no record of it can look like "valid data after damage". 0xC1 is never a msgpack type
byte.

`segment_size` is the size after which the writer starts a new segment; a segment only
exceeds it by one frame and two sync marks (`max_segment_bytes`: under fsync="interval" a
fsync in flight may mark after the frame that fills the segment, and the fsync for that frame
marks again), so a reader refuses a larger file at once, before reading it. Zeros reserved
after the last frame (a zero tail, below) count: the writer never reserves past that size.

**Sync marks** (flag `FLAG_SYNC_MARKS`, set by a writer under fsync="interval", where frames
are acknowledged before they are fsync'd): after each fsync the writer appends a mark frame

    mark   = mark magic b"\\xc1WBS" (4) | payload length u32 LE | crc32(payload) u32 LE
             | payload = synced_end as a msgpack uint64 (9 bytes)

saying "every byte before offset `synced_end` of this segment was fsync'd". A mark is written
only after the fsync it reports has returned, so any intact mark states a fact. Marks carry no
records and no LSN.

**The resync rule** (the one way to find data after damage): look for the next frame magic,
and accept a frame there only if it is intact: magic, length in 1..MAX_FRAME_PAYLOAD, inside
the file, checksum right, payload a non-empty list of well-formed records. Anything else is
skipped by searching for the next magic after it.

**A zero tail**: a segment with sync marks (fsync="interval") may end in zeros from a frame
or mark boundary on: its writer reserves space ahead (`wal/writer.py`), and where the zeros
start is where the log ends, not damage. Neither magic starts with a zero byte. Under
fsync="always" nothing is reserved, and zeros are judged as any other torn tail.

**The damage rule** (applied by `wal/reader.py`): a bad frame at offset D of the LAST segment
is a torn tail (the write a crash cut off, never acknowledged under fsync="always") unless
the resync rule finds an intact, newer frame after it; then it is corruption. In a segment
with sync marks, damage at or past the last fsync'd offset (the highest intact mark) is a torn
tail whatever follows it: unsynced pages may reach the disk in any order, and the writes they
held were acknowledged only as far as fsync="interval" promises. Damage before that offset,
or in any earlier segment (rotation fsyncs a segment before the next one exists), is
corruption.
"""

from __future__ import annotations

import mmap
import struct
import zlib
from dataclasses import dataclass

SEGMENT_MAGIC = b"WBCACHE\x00"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)

HEADER = struct.Struct("<8sHHII")
HEADER_SIZE = HEADER.size  # 20
_V1_HEADER = struct.Struct("<8sII")
_V1_HEADER_SIZE = _V1_HEADER.size  # 16

FLAG_SYNC_MARKS = 0x0001
_KNOWN_FLAGS = FLAG_SYNC_MARKS

FRAME_MAGIC = b"\xc1WBC"
MARK_MAGIC = b"\xc1WBS"
FRAME = struct.Struct("<4sII")
FRAME_SIZE = FRAME.size  # 12

# No frame payload (and so no record) is larger, so a corrupt length field can never make a
# reader allocate more than this. A group-commit write larger than this is split into frames.
MAX_FRAME_PAYLOAD = 64 * 1024 * 1024
# The largest single record: a frame of it alone (with its array header) fits the limit.
MAX_SINGLE_RECORD = MAX_FRAME_PAYLOAD - 16
# The largest segment_size a writer may use (it must fit the header's u32).
MAX_SEGMENT_SIZE = 1024 * 1024 * 1024
_MARK_BYTES = 2 * (FRAME_SIZE + 16)  # two mark frames: a payload is at most 10 bytes of msgpack


@dataclass(frozen=True)
class SegmentHeader:
    version: int
    flags: int
    segment_size: int | None  # None for version 1
    size: int  # bytes the header takes

    @property
    def sync_marks(self) -> bool:
        return bool(self.flags & FLAG_SYNC_MARKS)


def encode_header(*, segment_size: int = 64 * 1024 * 1024, sync_marks: bool = False,
                  version: int = FORMAT_VERSION) -> bytes:
    """A segment header (another `version` only to test that readers refuse it)."""
    head = struct.pack("<8sHHI", SEGMENT_MAGIC, version,
                       FLAG_SYNC_MARKS if sync_marks else 0, segment_size)
    return head + zlib.crc32(head).to_bytes(4, "little")


def encode_v1_header(version: int = 1) -> bytes:
    """A version-1 header (or any version number in that layout, for tests of refusal)."""
    head = SEGMENT_MAGIC + version.to_bytes(4, "little")
    return head + zlib.crc32(head).to_bytes(4, "little")


def read_header(data: bytes) -> SegmentHeader | None:
    """The header at the start of `data`, or None when it is damaged or cut off. A header with
    an intact checksum and an unknown version is returned as is: the caller refuses it."""
    if len(data) < _V1_HEADER_SIZE or data[:8] != SEGMENT_MAGIC:
        return None
    version, flags = struct.unpack_from("<HH", data, 8)
    if version == 1 and flags == 0:
        crc = int.from_bytes(data[12:16], "little")
        if zlib.crc32(data[:12]) != crc:
            return None
        return SegmentHeader(1, 0, None, _V1_HEADER_SIZE)
    if len(data) < HEADER_SIZE:
        # A version-1-layout header of an unknown version is still recognisable
        if zlib.crc32(data[:12]) == int.from_bytes(data[12:16], "little"):
            return SegmentHeader(int.from_bytes(data[8:12], "little"), 0, None,
                                 _V1_HEADER_SIZE)
        return None
    magic, version, flags, segment_size, crc = HEADER.unpack_from(data)
    if zlib.crc32(data[:16]) == crc:
        return SegmentHeader(version, flags, segment_size, HEADER_SIZE)
    if zlib.crc32(data[:12]) == int.from_bytes(data[12:16], "little"):
        return SegmentHeader(int.from_bytes(data[8:12], "little"), 0, None, _V1_HEADER_SIZE)
    return None


def header_problem(header: SegmentHeader) -> str | None:
    """Why an intact header cannot be read by this version, or None."""
    if header.version not in READABLE_VERSIONS:
        return f"format version {header.version}"
    if header.flags & ~_KNOWN_FLAGS:
        return f"unknown flags {header.flags:#06x}"
    return None


def max_segment_bytes(header: SegmentHeader | None) -> int:
    """The largest file a writer can have left under this header (see the module docstring);
    for a header that cannot be read (None), the largest any writer leaves."""
    size = MAX_SEGMENT_SIZE if header is None or header.segment_size is None else (
        header.segment_size)
    return size + FRAME_SIZE + MAX_FRAME_PAYLOAD + _MARK_BYTES


_FIXARRAY_HEADS = [bytes((0x90 | count,)) for count in range(16)]


def encode_records(records: list[bytes]) -> bytes:
    """A frame payload: the msgpack array of already-encoded records."""
    count = len(records)
    if count < 16:
        head = _FIXARRAY_HEADS[count]
    elif count < 1 << 16:
        head = b"\xdc" + count.to_bytes(2, "big")
    else:
        head = b"\xdd" + count.to_bytes(4, "big")
    return head + b"".join(records)


def encode_frame(payload: bytes) -> bytes:
    return FRAME.pack(FRAME_MAGIC, len(payload), zlib.crc32(payload)) + payload


# A frame of one record: its header and the array head (fixarray of 1) packed at once, the
# CRC carried on from the head's, so the record is copied once (a put's hot path).
_ONE_RECORD = struct.Struct("<4sIIB")
_ONE_RECORD_HEAD = 0x91
_ONE_RECORD_CRC = zlib.crc32(bytes((_ONE_RECORD_HEAD,)))


def encode_one_frame(record: bytes) -> bytes:
    """`encode_frame(encode_records([record]))`, byte for byte, in one step."""
    return _ONE_RECORD.pack(FRAME_MAGIC, len(record) + 1, zlib.crc32(record, _ONE_RECORD_CRC),
                            _ONE_RECORD_HEAD) + record


MARK_SIZE = FRAME_SIZE + 9  # a sync mark: its frame header and a msgpack uint64


def encode_mark(synced_end: int) -> bytes:
    """A sync mark: every byte of this segment before `synced_end` is fsync'd."""
    payload = synced_end.to_bytes(8, "big")
    payload = b"\xcf" + payload  # msgpack uint64
    return FRAME.pack(MARK_MAGIC, len(payload), zlib.crc32(payload)) + payload


def decode_mark(data: bytes | memoryview | mmap.mmap, at: int, size: int
                ) -> tuple[int, int] | None:
    """(synced_end, end offset) of an intact mark at `at`, or None."""
    if size - at < FRAME_SIZE:
        return None
    magic, length, crc = FRAME.unpack_from(data, at)
    end = at + FRAME_SIZE + length
    if magic != MARK_MAGIC or end != at + MARK_SIZE or end > size:
        return None
    payload = bytes(data[at + FRAME_SIZE:end])
    if zlib.crc32(payload) != crc or payload[0] != 0xCF:
        return None
    return int.from_bytes(payload[1:], "big"), end
