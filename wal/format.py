"""The log format: only what the writer and the reader share.

A segment is a 16-byte header followed by frames:

    header = magic "WBCACHE\\0" (8) | version u32 LE | crc32(magic + version) u32 LE
    frame  = frame magic b"\\xc1WBC" (4) | payload length u32 LE | crc32(payload) u32 LE | payload

A frame holds the records of one group-commit write: its payload is ONE msgpack array of
records, in LSN order. One CRC covers the whole write, so if power loss keeps some pages of an
unsynced write and not others, the frame fails as a whole and no record of it can look like
"valid data after damage". Each record is itself an array [lsn, op, ...data]:

    [lsn, OP_PUT, key, value]             value: the msgpack encoding of the user's value, as bin
    [lsn, OP_DELETE, key]
    [lsn, OP_INCR, key, delta, result]    result: the counter's value after the increment
    [lsn, OP_BATCH, [[op, key, ...], ...]] one atomic batch; each item is an op without its LSN

Keys are msgpack str or bin, which keeps "a" and b"a" apart. 0xC1 is never a msgpack type
byte, and the frame magic lets the reader look for valid frames after a damaged one (to tell a
torn tail from mid-log corruption) with a fast bytes search.
"""

from __future__ import annotations

import struct
import zlib

SEGMENT_MAGIC = b"WBCACHE\x00"
FORMAT_VERSION = 1
HEADER = struct.Struct("<8sII")
HEADER_SIZE = HEADER.size  # 16

FRAME_MAGIC = b"\xc1WBC"
FRAME = struct.Struct("<4sII")
FRAME_SIZE = FRAME.size  # 12

# No frame payload (and so no record) is larger, so a corrupt length field can never make a
# reader allocate more than this. A group-commit write larger than this is split into frames.
MAX_FRAME_PAYLOAD = 64 * 1024 * 1024
# The largest single record: a frame of it alone (with its array header) fits the limit.
MAX_SINGLE_RECORD = MAX_FRAME_PAYLOAD - 16

OP_PUT = 1
OP_DELETE = 2
OP_INCR = 3
OP_BATCH = 4


def encode_header(version: int = FORMAT_VERSION) -> bytes:
    head = SEGMENT_MAGIC + version.to_bytes(4, "little")
    return HEADER.pack(SEGMENT_MAGIC, version, zlib.crc32(head))


def header_version(data: bytes) -> int | None:
    """The format version in a segment header, or None when the header is damaged."""
    if len(data) < HEADER_SIZE:
        return None
    magic, version, crc = HEADER.unpack_from(data)
    if magic != SEGMENT_MAGIC or zlib.crc32(data[:12]) != crc:
        return None
    return int(version)


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
