"""A sample log written by the real cache, and where its records, headers and fields lie.

The disk-damage campaigns (torn tails, corruption, parser fuzz) start from `SampleLog`: one
writer's workload (workload.py) written by a real `wbcache.Cache` into several small segments
and copied while the cache was still open, as a crash would leave them (every record is
acknowledged, nothing is flushed to the database). Operation i is record i + 1 (LSN i + 1), so
the state after any number of complete records is known (`workload.state_after`).

A frame (one group-commit write) holds one or more records; with one writer, one each. Frames
are found by the log's own reader (`wbcache.wal.reader`: `intact_frames`, the resync rule, and
`read_segment`, the walker), never by a walker of the harness's own.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import Any

import wbcache
from wbcache.fault_injection.workload import Op, ThreadWorkload, execute
from wbcache.wal.format import HEADER_SIZE
from wbcache.wal.reader import drain, intact_frames, read_segment

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
    """(offset, header + payload length, records) of every frame of a pristine segment, as the
    reader finds them; raises AssertionError if they do not tile the segment after its header
    (then it is not pristine)."""
    found = [(at, end - at, len(lsns))
             for at, lsns, end in intact_frames(data, HEADER_SIZE, len(data))]
    ends = [HEADER_SIZE] + [offset + length for offset, length, _ in found]
    starts = [offset for offset, _, _ in found] + [len(data)]
    if ends != starts:
        raise AssertionError("the sample log's frames do not tile its segment")
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
    to the OS), found by the reader's resync rule (`intact_frames`)."""
    return [lsn for _, lsns, _ in intact_frames(bytes(data), 0, len(data)) for lsn in lsns]


def segment_last_lsn(path: str) -> int:
    """LSN of the last record in the valid frames of the segment at `path` (0: none), as the
    log's walker (`read_segment`) reads it: up to any damage, which it reports, not raises."""
    name = os.path.basename(path)
    if not (name.endswith(".log") and name[:-4].isdigit()):
        return 0
    end = drain(read_segment(path, first_lsn=int(name[:-4]), is_last=False))
    return end.last_lsn if end.records else 0
