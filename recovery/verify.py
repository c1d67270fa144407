"""`survey_log`: read every segment and report every problem, without stopping at the first.

Recovery (`LogScan`) stops at the first damage, because it must never replay past it. An
operator asking "what is wrong with this directory?" wants every problem and a summary of every
segment. The verdicts are the same as recovery's: each segment is read by the same
`SegmentReader` (its torn-tail policy included), and continuity between segments follows the
rule of `recovery/scan.py` (a gap matters only where it hides LSNs above the checkpoint), with
the same messages. So `survey_log(...).problems[0]` is the error opening the cache would raise.
The reader stops at a segment's first damage; `further_damage` then finds any later damage in
the same segment by resynchronising on intact frames.

Nothing here writes: segments are mapped read-only.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field

from wbcache.errors import CorruptLogError, UnsupportedFormatError
from wbcache.recovery.replay import PROGRESS_EVERY
from wbcache.recovery.scan import continuity_problem
from wbcache.wal import FORMAT_VERSION, SegmentReader, list_segments
from wbcache.wal.format import HEADER_SIZE, header_version
from wbcache.wal.reader import find_intact_frame, intact_frame, mapped


@dataclass
class SegmentReport:
    """One segment as the survey found it. `damage` is None for a segment recovery accepts."""

    path: str
    first_lsn: int  # from the segment's name
    last_lsn: int  # of the last valid record; first_lsn - 1 when there is none
    records: int  # valid records (up to the damage, if any)
    pending: int  # of those, records newer than the checkpoint
    size: int
    torn_bytes: int = 0  # a torn tail (last segment only): not damage, recovery drops it
    torn_reason: str | None = None
    damage: CorruptLogError | None = None

    @property
    def name(self) -> str:
        return os.path.basename(self.path)


@dataclass
class LogSurvey:
    """Every segment of `wal_dir` and every problem, in log order."""

    wal_dir: str
    checkpoint: int
    segments: list[SegmentReport] = field(default_factory=list)
    problems: list[CorruptLogError] = field(default_factory=list)
    vanished: list[str] = field(default_factory=list)  # deleted while read (a live owner)

    @property
    def records(self) -> int:
        return sum(segment.records for segment in self.segments)

    @property
    def pending(self) -> int:
        return sum(segment.pending for segment in self.segments)

    @property
    def size(self) -> int:
        return sum(segment.size for segment in self.segments)

    @property
    def torn_bytes(self) -> int:
        return sum(segment.torn_bytes for segment in self.segments)

    @property
    def last_lsn(self) -> int:
        """LSN of the last valid record, 0 when the log has none."""
        for segment in reversed(self.segments):
            if segment.records:
                return segment.last_lsn
        return 0


def survey_log(wal_dir: str, checkpoint: int, *,
               progress: Callable[[int], None] | None = None) -> LogSurvey:
    """Read every segment in `wal_dir` against the database `checkpoint`.

    `progress(n)` is called with the number of records read so far, every 65,536 records.
    Raises `UnsupportedFormatError` for a segment of an unknown format version (nothing else
    about such a log can be judged) and `OSError` when a segment cannot be read; every other
    problem is collected in `LogSurvey.problems`.
    """
    survey = LogSurvey(wal_dir, checkpoint)
    segments = list_segments(wal_dir)
    previous_last: int | None = None
    continuity_known = True  # False after a damaged or vanished segment: its end is unknown
    read = 0
    for index, segment in enumerate(segments):
        if continuity_known:
            gap = continuity_problem(segment, previous_last, checkpoint)
            if gap is not None:
                survey.problems.append(gap)
        reader = SegmentReader(segment.path, first_lsn=segment.first_lsn,
                               is_last=index == len(segments) - 1)
        pending = 0
        damage: CorruptLogError | None = None
        try:
            for record in reader:
                if record[0] > checkpoint:
                    pending += 1
                read += 1
                if progress is not None and not read % PROGRESS_EVERY:
                    progress(read)
        except CorruptLogError as exc:
            damage = exc
            survey.problems.append(exc)
            survey.problems.extend(further_damage(segment.path, exc.offset))
        except FileNotFoundError:
            # Only a live owner deletes segments, and only ones the database has: not damage.
            survey.vanished.append(segment.path)
            continuity_known = False
            continue
        survey.segments.append(SegmentReport(
            segment.path, segment.first_lsn, reader.last_lsn, reader.records, pending,
            reader.size, reader.torn_bytes, reader.torn_reason, damage,
        ))
        previous_last = reader.last_lsn
        continuity_known = damage is None
    return survey


def further_damage(path: str, offset: int) -> list[CorruptLogError]:
    """Damage in a segment after its first damage (at `offset`), which stops the reader: each
    later run of bytes holding no intact frame, found by resynchronising on intact frames as
    salvage counts them. Empty when the rest of the segment is intact."""
    try:
        with mapped(path) as (data, size):
            if size <= HEADER_SIZE:
                return []
            problems = []
            found = find_intact_frame(data, offset + 1, size)  # past the damage reported
            pos = found[0] if found is not None else None
            while pos is not None and pos < size:
                lsns, end = intact_frame(data, pos, size)
                if lsns:
                    pos = end
                    continue
                following = find_intact_frame(data, pos + 1, size)
                stop = following[0] if following is not None else size
                problems.append(CorruptLogError(
                    path, pos, f"further damage: bytes {pos}..{stop - 1} hold no intact record"))
                pos = following[0] if following is not None else None
            return problems
    except FileNotFoundError:
        return []


def check_format_versions(wal_dir: str) -> None:
    """Raise `UnsupportedFormatError` for the first segment whose (intact) header names a format
    version this wbcache cannot read. Reads 16 bytes per segment, so a tool can refuse a log
    from a newer wbcache before it reads, prints or changes anything."""
    for segment in list_segments(wal_dir):
        try:
            with open(segment.path, "rb") as file:
                version = header_version(file.read(HEADER_SIZE))
        except FileNotFoundError:  # deleted meanwhile by a live owner
            continue
        if version is not None and version != FORMAT_VERSION:
            raise UnsupportedFormatError(segment.path, version, FORMAT_VERSION)
