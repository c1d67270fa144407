"""`LogScan`: every record of the log, oldest first, checked for damage and gaps.

Continuity across segments: each segment's first LSN must follow the previous segment's last.
A gap is corruption only if it hides LSNs the database checkpoint does not cover; LSNs at or
below the checkpoint are in the database whatever the log says, so a missing segment there
(e.g. deleted by an interrupted truncation) loses nothing.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from wbcache.errors import CorruptLogError
from wbcache.wal import SegmentFile, SegmentReader, list_segments


@dataclass
class SegmentSummary:
    """What a scan learned about one segment."""

    path: str
    first_lsn: int
    last_lsn: int  # first_lsn - 1 when it holds no record
    records: int
    size: int
    torn_bytes: int = 0
    torn_reason: str | None = None


@dataclass
class LogScan:
    """Iterate `records()` once; the summaries fill in as it goes."""

    wal_dir: str
    checkpoint: int
    segments: list[SegmentFile] = field(init=False)
    summaries: list[SegmentSummary] = field(default_factory=list, init=False)

    def __post_init__(self) -> None:
        self.segments = list_segments(self.wal_dir)

    @property
    def last_lsn(self) -> int:
        """LSN of the last valid record, 0 when the log has none."""
        for summary in reversed(self.summaries):
            if summary.records:
                return summary.last_lsn
        return 0

    @property
    def torn_bytes(self) -> int:
        return sum(summary.torn_bytes for summary in self.summaries)

    def records(self) -> Iterator[list[Any]]:
        """Every valid record, LSN order. Raises `CorruptLogError` on damage or a gap."""
        for records in self.frames():
            yield from records

    def frames(self) -> Iterator[list[list[Any]]]:
        """The same records, one list per frame (one group-commit write)."""
        previous_last: int | None = None
        for index, segment in enumerate(self.segments):
            gap = continuity_problem(segment, previous_last, self.checkpoint)
            if gap is not None:
                raise gap
            reader = SegmentReader(segment.path, first_lsn=segment.first_lsn,
                                   is_last=index == len(self.segments) - 1)
            yield from reader.frames()
            self.summaries.append(SegmentSummary(
                segment.path, segment.first_lsn, reader.last_lsn, reader.records, reader.size,
                reader.torn_bytes, reader.torn_reason,
            ))
            previous_last = reader.last_lsn


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
                               f"(database checkpoint {checkpoint})")
    return None
