"""Small helpers the log tests share: frame records by hand, find frames, damage bytes, read
a segment back, read in a thread with a bound."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack

from wbcache.wal import SegmentEnd, read_segment
from wbcache.wal.format import FRAME, FRAME_SIZE, HEADER_SIZE, encode_frame, encode_records


def frame(record: Any) -> bytes:
    """A frame of one record, as a lone writer's group commit writes it."""
    return encode_frame(encode_records([msgpack.packb(record)]))


def record_offsets(data: bytes) -> list[int]:
    """Start offset of every frame, walked by the length fields alone (no checks)."""
    offsets, pos = [], HEADER_SIZE
    while pos + FRAME_SIZE <= len(data):
        offsets.append(pos)
        _, length, _ = FRAME.unpack_from(data, pos)
        pos += FRAME_SIZE + length
    return offsets


def flip_byte(path: Path, offset: int, mask: int = 0x01) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= mask
    path.write_bytes(bytes(data))


def truncate(path: Path, size: int) -> None:
    with path.open("r+b") as file:
        file.truncate(size)


def segment_records(path: str | Path, first_lsn: int = 1, *, is_last: bool = True
                    ) -> tuple[list[Any], SegmentEnd]:
    """Every record of the segment, and what the reader returned (its damage not raised)."""
    records: list[Any] = []
    reading = read_segment(str(path), first_lsn=first_lsn, is_last=is_last)
    while True:
        try:
            records.extend(next(reading))
        except StopIteration as stop:
            return records, stop.value


def in_a_thread(call: Callable[[], Any], seconds: float = 60) -> list[Any]:
    """[what `call()` returned], or [] if it still runs after `seconds`: a read that would
    take hours fails the test instead of hanging it."""
    result: list[Any] = []
    thread = threading.Thread(target=lambda: result.append(call()), daemon=True)
    thread.start()
    thread.join(seconds)
    return result
