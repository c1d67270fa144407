"""`survey_log`: read every segment and report every problem, without stopping at the first.

Recovery (`read_log`) stops at the first damage, because it must never replay past it. An
operator asking "what is wrong with this directory?" wants every problem and a summary of every
segment. The verdicts are the same as recovery's: each segment is read by the same walker
(`wal.reader.read_segment`, its torn-tail policy and record checks included), and continuity
between segments follows the rule of `recovery/scan.py` (a gap matters only where it hides LSNs
above the checkpoint), with the same messages. So `survey_log(...).problems[0]` is the error
opening the cache would raise. The walker stops at a segment's first damage; `further_damage`
then finds any later damage in the same segment with the resync rule (`intact_frames`).

Nothing here writes: segments are mapped read-only.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field

from wbcache.errors import CorruptLogError, UnsupportedFormatError
from wbcache.recovery.replay import PROGRESS_EVERY
from wbcache.recovery.scan import continuity_problem
from wbcache.wal.format import FORMAT_VERSION, MARK_SIZE, READABLE_VERSIONS, read_header
from wbcache.wal.reader import (
    SegmentEnd,
    intact_frames,
    intact_marks,
    mapped,
    read_segment,
    zero_tail,
)
from wbcache.wal.records import DEFAULT_MAX_KEY_SIZE
from wbcache.wal.segments import list_segments


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
               progress: Callable[[int], None] | None = None,
               max_key_size: int = DEFAULT_MAX_KEY_SIZE,
               live_checkpoint: Callable[[], int] | None = None) -> LogSurvey:
    """Read every segment in `wal_dir` against the database `checkpoint`.

    `live_checkpoint` (a log a live cache holds): the database's checkpoint, read again once
    the segments are listed. Its owner deletes a segment only after committing a checkpoint
    that covers it, so a segment deleted before the listing is covered by the checkpoint read
    after it, and is not reported missing.

    `progress(n)` is called with the number of records read so far, every 65,536 records.
    Raises `UnsupportedFormatError` for a segment of an unknown format version (nothing else
    about such a log can be judged) and `OSError` when a segment cannot be read; every other
    problem is collected in `LogSurvey.problems`.
    """
    segments = list_segments(wal_dir)
    if live_checkpoint is not None:
        checkpoint = max(checkpoint, live_checkpoint())
    survey = LogSurvey(wal_dir, checkpoint)
    previous_last: int | None = None
    continuity_known = True  # False after a damaged or vanished segment: its end is unknown
    read = 0
    for index, segment in enumerate(segments):
        if continuity_known:
            gap = continuity_problem(segment, previous_last, checkpoint)
            if gap is not None:
                survey.problems.append(gap)
        pending = 0
        reading = read_segment(segment.path, first_lsn=segment.first_lsn,
                               is_last=index == len(segments) - 1, max_key_size=max_key_size)
        try:
            while True:
                try:
                    frame = next(reading)
                except StopIteration as stop:
                    end: SegmentEnd = stop.value
                    break
                for record in frame:
                    pending += record[0] > checkpoint
                before, read = read, read + len(frame)
                if progress is not None and read // PROGRESS_EVERY != before // PROGRESS_EVERY:
                    progress(read)
        except FileNotFoundError:
            # Only a live owner deletes segments, and only ones the database has: not damage.
            survey.vanished.append(segment.path)
            continuity_known = False
            continue
        if end.damage is not None:
            survey.problems.append(end.damage)
            survey.problems.extend(further_damage(segment.path, end.damage.offset,
                                                  max_key_size))
        survey.segments.append(SegmentReport(
            segment.path, segment.first_lsn, end.last_lsn, end.records, pending, end.size,
            end.torn_bytes, end.torn_reason, end.damage,
        ))
        previous_last = end.last_lsn
        continuity_known = end.damage is None
    return survey


def further_damage(path: str, offset: int,
                   max_key_size: int = DEFAULT_MAX_KEY_SIZE) -> list[CorruptLogError]:
    """Damage in a segment after its first damage (at `offset`), which stops the walker: each
    later run of bytes holding neither an intact frame (found with the resync rule) nor an
    intact sync mark, and not the zeros a mapped segment's writer reserved to its end (as the
    walker reads them: wal/reader.py). Empty when the rest of the segment is intact."""
    try:
        with mapped(path) as (data, size):
            problems = []
            frames = intact_frames(data, offset + 1, size, max_key_size)  # past the damage
            first = next(frames, None)
            if first is None:
                return []
            pos = first[2]
            header = read_header(data[:32])
            marked = header is not None and header.sync_marks  # else a mark is damage too
            marks = [(at, at + MARK_SIZE)
                     for at, _ in intact_marks(data, pos, size)] if marked else []
            pieces = sorted([*((at, end) for at, _, end in frames), *marks])
            for at, end in pieces:
                if at > pos:
                    problems.append(CorruptLogError(
                        path, pos, f"further damage: bytes {pos}..{at - 1} hold no intact "
                                   f"record"))
                pos = max(pos, end)  # a mark inside a frame's value is the value's
            reserved = marked and zero_tail(data, pos, size)
            if pos < size and not reserved:
                problems.append(CorruptLogError(
                    path, pos, f"further damage: bytes {pos}..{size - 1} hold no intact record"))
            return problems
    except (FileNotFoundError, CorruptLogError):  # gone meanwhile, or not a file at all
        return []


def check_format_versions(wal_dir: str) -> None:
    """Raise `UnsupportedFormatError` for the first segment whose (intact) header names a format
    version this wbcache cannot read. Reads a few bytes per segment, so a tool can refuse a log
    from a newer wbcache before it reads, prints or changes anything."""
    for segment in list_segments(wal_dir):
        try:
            fd = os.open(segment.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except (FileNotFoundError, OSError):  # deleted meanwhile, or not a file: no version
            continue
        try:
            if not os.path.isfile(segment.path):
                continue
            header = read_header(os.pread(fd, 32, 0))
        finally:
            os.close(fd)
        if header is not None and header.version not in READABLE_VERSIONS:
            raise UnsupportedFormatError(segment.path, header.version, FORMAT_VERSION)
