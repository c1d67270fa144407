"""What the log holds beyond the database checkpoint, for tools that read a directory without
recovering it (`wbcache dump --pending`, `wbcache get`, `wbcache stats`).

The log is read with `read_log`, so a damaged log is refused exactly as opening the cache would
refuse it (`CorruptLogError`), and a torn tail is left out exactly as recovery drops it.
Records are described, folded and counted by the record codec (`wal/records.py`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Generator, Iterator
from dataclasses import dataclass, field

from wbcache.errors import CorruptLogError
from wbcache.recovery.scan import LogEnd, read_log, walk_log
from wbcache.wal.reader import intact_frames, mapped
from wbcache.wal.records import (
    DEFAULT_MAX_KEY_SIZE,
    OP_BATCH,
    LoggedOp,
    LoggedRecord,
    Record,
    State,
    count_ops,
    describe,
    fold,
)
from wbcache.wal.segments import list_segments

__all__ = ["LoggedOp", "LoggedRecord", "PendingSummary", "estimate_log_records",
           "pending_records", "pending_state", "summarize_pending"]

_SAMPLE_BYTES = 256 * 1024  # per window sampled to estimate records per byte
# At most this long sampling: a torn value full of frame-shaped headers, each claiming a large
# payload, costs a checksum of that payload per header (`intact_frames`), and an estimate
# must not hold up the recovery it sizes.
_SAMPLE_SECONDS = 0.5


def pending_records(wal_dir: str, checkpoint: int, *,
                    max_key_size: int = DEFAULT_MAX_KEY_SIZE) -> Iterator[LoggedRecord]:
    """Every record newer than `checkpoint`, in LSN order, as it is read. Raises
    `CorruptLogError` (as opening would) when the log is damaged; the records before the
    damage are yielded first."""
    end = yield from _newer(read_log(wal_dir, checkpoint, max_key_size=max_key_size),
                            checkpoint)
    end.check()


def _newer(reading: Generator[list[Record], None, LogEnd], checkpoint: int
           ) -> Generator[LoggedRecord, None, LogEnd]:
    while True:
        try:
            frame = next(reading)
        except StopIteration as stop:
            return stop.value  # type: ignore[no-any-return]
        for record in frame:
            if record[0] > checkpoint:
                yield describe(record)


def pending_state(wal_dir: str, checkpoint: int, *,
                  max_key_size: int = DEFAULT_MAX_KEY_SIZE) -> State:
    """key -> encoded value (None: deleted) for every key the records newer than `checkpoint`
    touch: what recovery would write into the database. Raises `CorruptLogError`."""
    return summarize_pending(wal_dir, checkpoint, max_key_size=max_key_size).state


@dataclass
class PendingSummary:
    """Counts over the records newer than the checkpoint, and the state they leave."""

    records: int = 0
    puts: int = 0  # operations, batches' included
    deletes: int = 0
    incrs: int = 0
    batches: int = 0  # records that are batches
    state: State = field(default_factory=dict)  # key -> encoded value, None: deleted
    segments: int = 0
    wal_bytes: int = 0
    torn_bytes: int = 0
    last_lsn: int = 0  # last valid LSN in the log, 0 when it has none


def summarize_pending(wal_dir: str, checkpoint: int, *,
                      max_key_size: int = DEFAULT_MAX_KEY_SIZE) -> PendingSummary:
    """One pass over the log: what a recovery would replay. Raises `CorruptLogError`."""
    summary = PendingSummary()
    counts: dict[str, int] = {}

    def on_frame(records: list[Record]) -> None:
        for record in records:
            if record[0] <= checkpoint:
                continue
            summary.records += 1
            summary.batches += record[1] == OP_BATCH
            count_ops(record, counts)
            fold(summary.state, record)

    end = walk_log(wal_dir, checkpoint, on_frame, max_key_size=max_key_size)
    end.check()
    summary.puts, summary.deletes, summary.incrs = (
        counts.get("put", 0), counts.get("delete", 0), counts.get("incr", 0))
    summary.segments = len(end.segments)
    summary.wal_bytes = end.size
    summary.torn_bytes = end.torn_bytes
    summary.last_lsn = end.last_lsn
    return summary


def estimate_log_records(wal_dir: str) -> int:
    """About how many records the log holds, cheaply, to size a progress bar.

    Exact for every segment but the last when the names are contiguous (a segment holds the
    LSNs from its name to the next one's). The last is its size times the records per byte of
    a few windows spread over it: keys and values often grow through a log, so its first
    records alone would mislead.
    """
    segments = list_segments(wal_dir)
    if not segments:
        return 0
    last = segments[-1]
    try:
        size = os.lstat(last.path).st_size
    except FileNotFoundError:
        return 0
    return last.first_lsn - segments[0].first_lsn + int(_records_per_byte(last.path) * size)


class _OutOfTime(Exception):
    """Sampling for the estimate took `_SAMPLE_SECONDS`."""


def _records_per_byte(path: str) -> float:
    try:
        with mapped(path) as (data, size):
            records = spanned = 0
            deadline = time.monotonic() + _SAMPLE_SECONDS

            def in_time(at: int) -> bool:
                if time.monotonic() >= deadline:
                    raise _OutOfTime
                return True

            for start in (0, size // 3, 2 * size // 3):
                first = end = None
                try:
                    for at, lsns, end in intact_frames(data, start, size, candidate=in_time):
                        if first is None:
                            first = at
                        records += len(lsns)
                        if end - first >= _SAMPLE_BYTES:
                            break
                except _OutOfTime:  # what was counted so far is the sample
                    if first is not None and end is not None:
                        spanned += end - first
                    break
                if first is not None and end is not None:
                    spanned += end - first
            return records / spanned if spanned else 1 / 64
    except (OSError, CorruptLogError):  # gone meanwhile, or not a file: no estimate
        return 0.0
