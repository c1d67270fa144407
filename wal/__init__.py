"""The write-ahead log: format, record codec, writer, reader, segments and group commit.

Imports only the standard library, msgpack and `wbcache.errors` (docs/design.md, layers).
"""

from __future__ import annotations

from wbcache.wal.commit import GroupCommitter
from wbcache.wal.format import FORMAT_VERSION, MAX_FRAME_PAYLOAD
from wbcache.wal.reader import SegmentEnd, read_segment
from wbcache.wal.segments import SegmentFile, list_segments
from wbcache.wal.writer import LogWriter

__all__ = [
    "FORMAT_VERSION",
    "GroupCommitter",
    "LogWriter",
    "MAX_FRAME_PAYLOAD",
    "SegmentEnd",
    "SegmentFile",
    "list_segments",
    "read_segment",
]
