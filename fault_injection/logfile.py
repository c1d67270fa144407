"""A sample log written by the real cache, and where its records, headers and fields lie.

The disk-damage campaigns (torn tails, corruption, parser fuzz) start from `SampleLog`: one
writer's workload (workload.py) written by a real `wbcache.Cache` into several small segments
and copied while the cache was still open, as a crash would leave them (every record is
acknowledged, nothing is flushed to the database). Operation i is record i + 1 (LSN i + 1), so
the state after any number of complete records is known (`workload.state_after`).

A frame (one group-commit write) holds one or more records; with one writer, one each. The
frame layout comes from `wbcache.wal.format`, the one definition writer and reader share.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import Any

import msgpack

import wbcache
from wbcache.fault_injection.workload import Op, ThreadWorkload, execute
from wbcache.wal.format import FRAME, FRAME_MAGIC, FRAME_SIZE, HEADER_SIZE, SEGMENT_MAGIC

SAMPLE_CYCLE = 0
SAMPLE_THREAD = 0


@dataclass(frozen=True)
class Frame:
    segment: int  # index in SampleLog.segments
    offset: int  # of the frame in its segment
    length: int  # frame header + payload
    records: int  # log records it holds

    @property
    def end(self) -> int:
        return self.offset + self.length


@dataclass
class SampleLog:
    segments: list[tuple[str, bytes]]  # (file name, content), oldest first
    ops: list[Op]
    frames: list[Frame]  # in LSN order across segments

    def write(self, wal_dir: str, segments: list[tuple[str, bytes]] | None = None) -> None:
        """Make `wal_dir` hold exactly these segments (default: the pristine ones)."""
        os.makedirs(wal_dir, exist_ok=True)
        for name in os.listdir(wal_dir):
            os.unlink(os.path.join(wal_dir, name))
        for name, data in self.segments if segments is None else segments:
            with open(os.path.join(wal_dir, name), "wb") as file:
                file.write(data)

    def records_before(self, segment: int, offset: int) -> int:
        """How many records lie in frames wholly before byte `offset` of segment `segment`
        (the log cut there)."""
        return sum(frame.records for frame in self.frames
                   if frame.segment < segment or (frame.segment == segment
                                                  and frame.end <= offset))

    def frame_at(self, segment: int, offset: int) -> Frame | None:
        """The frame holding byte `offset` of segment `segment`; None in the header."""
        for frame in self.frames:
            if frame.segment == segment and frame.offset <= offset < frame.end:
                return frame
        return None


def frames(data: bytes) -> list[tuple[int, int, int]]:
    """(offset, header + payload length, records) of every frame of a pristine segment."""
    found, pos = [], HEADER_SIZE
    while pos + FRAME_SIZE <= len(data):
        _, length, _ = FRAME.unpack_from(data, pos)
        payload = data[pos + FRAME_SIZE:pos + FRAME_SIZE + length]
        found.append((pos, FRAME_SIZE + length, len(msgpack.unpackb(payload, raw=False))))
        pos += FRAME_SIZE + length
    return found


def write_sample_log(seed: int, *, min_segments: int = 3, min_last_frames: int = 3,
                     segment_size: int = 4096, small_tail: bool = False) -> SampleLog:
    """Write operations until the log has `min_segments` segments and its last one at least
    `min_last_frames` frames (with `small_tail`, the last ones each under 200 bytes); return a
    copy of it as a crash would leave it."""
    scratch = tempfile.mkdtemp(prefix="wbcache-sample-")
    try:
        path = os.path.join(scratch, "cache")
        workload = ThreadWorkload(seed, SAMPLE_CYCLE, SAMPLE_THREAD)
        ops: list[Op] = []
        cache = wbcache.open(path, segment_size=segment_size, flush_interval=3600.0,
                             flush_threshold=1_000_000)
        try:
            while True:
                op = workload.next()
                ops.append(op)
                execute(cache, op)
                segments = _read_segments(os.path.join(path, "wal"))
                tail = frames(segments[-1][1])[-min_last_frames:]
                if (len(segments) >= min_segments and len(tail) >= min_last_frames
                        and (not small_tail or all(length < 200 for _, length, _ in tail))):
                    break
        finally:
            cache.close()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    found = [Frame(index, offset, length, records)
             for index, (_, data) in enumerate(segments)
             for offset, length, records in frames(data)]
    if sum(frame.records for frame in found) != len(ops):
        raise AssertionError(f"the sample log holds {len(found)} frames for {len(ops)} "
                             f"operations")
    return SampleLog(segments, ops, found)


def _read_segments(wal_dir: str) -> list[tuple[str, bytes]]:
    segments = []
    for name in sorted(os.listdir(wal_dir)):
        with open(os.path.join(wal_dir, name), "rb") as file:
            segments.append((name, file.read()))
    return segments


def read_state(path: str) -> tuple[dict[Any, Any], Any]:
    """Open the cache at `path` (recovering it); (every key and value, the recovery report)."""
    with wbcache.open(path) as cache:
        return dict(cache.items()), cache.recovery


def frame_lsns(data: bytes | bytearray) -> list[int]:
    """LSNs of the records in `data`, a run of complete frames (as one log write hands them
    to the OS); stops at anything that is not one."""
    lsns: list[int] = []
    pos = 0
    while pos + FRAME_SIZE <= len(data):
        magic, length, _ = FRAME.unpack_from(data, pos)
        end = pos + FRAME_SIZE + length
        if magic != FRAME_MAGIC or end > len(data):
            break
        try:
            records = msgpack.unpackb(bytes(data[pos + FRAME_SIZE:end]), raw=False)
            lsns.extend(record[0] for record in records)
        except Exception:  # not a frame of records: nothing to map
            break
        pos = end
    return lsns


def segment_last_lsn(path: str) -> int:
    """LSN of the last record in the valid frames of the segment at `path` (0: none)."""
    with open(path, "rb") as file:
        data = file.read()
    lsns = frame_lsns(data[HEADER_SIZE:]) if data[:8] == SEGMENT_MAGIC else []
    return lsns[-1] if lsns else 0
