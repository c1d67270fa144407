"""Reading the whole log: every segment, oldest first, checked for damage and gaps.

`read_log` chains `wal.reader.read_segment` over the segments of `DIR/wal/` and *returns* what
it found (`LogEnd`) once it stops: at the end of the log, or at the first problem (damage in a
segment, or a gap between segments). `walk_log` is the same, driven by a callback.

Continuity across segments: each segment's first LSN must follow the previous segment's last.
A gap is corruption only if it hides LSNs the database checkpoint does not cover; LSNs at or
below the checkpoint are in the database whatever the log says, so a missing segment there
(e.g. deleted by an interrupted truncation) loses nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from dataclasses import dataclass, field

from wbcache.errors import CorruptLogError
from wbcache.wal.reader import SegmentEnd, read_segment
from wbcache.wal.records import DEFAULT_MAX_KEY_SIZE, Record
from wbcache.wal.segments import SegmentFile, list_segments


@dataclass
class LogEnd:
    """What reading the log found, up to where it stopped."""

    checkpoint: int
    segments: list[SegmentEnd] = field(default_factory=list)  # read, the damaged one included
    problem: CorruptLogError | None = None  # the damage or gap that stopped the read
    unread: list[SegmentFile] = field(default_factory=list)  # after the problem, not read

    @property
    def records(self) -> int:
        return sum(segment.records for segment in self.segments)

    @property
    def last_lsn(self) -> int:
        """LSN of the last valid record read, 0 when there is none."""
        for segment in reversed(self.segments):
            if segment.records:
                return segment.last_lsn
        return 0

    @property
    def torn_bytes(self) -> int:
        return sum(segment.torn_bytes for segment in self.segments)

    @property
    def torn_segment(self) -> str | None:
        torn = [segment.path for segment in self.segments if segment.torn_bytes]
        return torn[-1] if torn else None

    @property
    def size(self) -> int:
        return sum(segment.size for segment in self.segments)

    def check(self) -> None:
        """Raise the problem that stopped the read, if any."""
        if self.problem is not None:
            raise self.problem


def read_log(wal_dir: str, checkpoint: int, *, max_key_size: int = DEFAULT_MAX_KEY_SIZE,
             segments: list[SegmentFile] | None = None
             ) -> Generator[list[Record], None, LogEnd]:
    """Yield the log's records frame by frame, oldest first; return a `LogEnd`. `segments`
    (default: every segment in `wal_dir`) lets a caller resume after a segment it set aside.
    Raises `UnsupportedFormatError` and `OSError` as `read_segment` does."""
    listed = list_segments(wal_dir) if segments is None else segments
    end = LogEnd(checkpoint)
    previous_last: int | None = None
    for index, segment in enumerate(listed):
        gap = continuity_problem(segment, previous_last, checkpoint)
        if gap is not None:
            end.problem, end.unread = gap, listed[index:]
            return end
        result = yield from read_segment(segment.path, first_lsn=segment.first_lsn,
                                         is_last=index == len(listed) - 1,
                                         max_key_size=max_key_size)
        end.segments.append(result)
        if result.damage is not None:
            end.problem, end.unread = result.damage, listed[index + 1:]
            return end
        previous_last = result.last_lsn
    return end


def walk_log(wal_dir: str, checkpoint: int, on_frame: Callable[[list[Record]], None], *,
             max_key_size: int = DEFAULT_MAX_KEY_SIZE,
             segments: list[SegmentFile] | None = None) -> LogEnd:
    """`read_log`, calling `on_frame(records)` for each frame; returns the `LogEnd`."""
    reading = read_log(wal_dir, checkpoint, max_key_size=max_key_size, segments=segments)
    while True:
        try:
            on_frame(next(reading))
        except StopIteration as stop:
            return stop.value  # type: ignore[no-any-return]


def continuity_problem(segment: SegmentFile, previous_last: int | None,
                       checkpoint: int) -> CorruptLogError | None:
    """The gap or overlap before `segment` (see the module docstring), or None.

    `previous_last` is the last LSN of the segment before (None for the first segment).
    """
    expected = checkpoint + 1 if previous_last is None else previous_last + 1
    if segment.first_lsn < expected and previous_last is not None:
        return CorruptLogError(segment.path, 0,
                               f"segment starts at LSN {segment.first_lsn}, overlapping the "
                               f"previous segment, which ends at LSN {previous_last}")
    if segment.first_lsn > expected and segment.first_lsn - 1 > checkpoint:
        return CorruptLogError(segment.path, 0,
                               f"records {expected}..{segment.first_lsn - 1} are missing "
                               f"(database checkpoint {checkpoint})",
                               missing=(expected, segment.first_lsn - 1))
    return None
