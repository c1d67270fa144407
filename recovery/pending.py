"""What the log holds beyond the database checkpoint, for tools that read a directory without
recovering it (`wbcache dump --pending`, `wbcache get`, `wbcache stats`).

Records are read with `LogScan`, so a damaged log is refused exactly as opening the cache would
refuse it (`CorruptLogError`), and a torn tail is left out exactly as recovery drops it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import msgpack

from wbcache.recovery.replay import State, apply_record
from wbcache.recovery.scan import LogScan
from wbcache.wal import list_segments
from wbcache.wal.format import FRAME_MAGIC, HEADER_SIZE, OP_BATCH, OP_DELETE, OP_INCR, OP_PUT
from wbcache.wal.reader import intact_frame, mapped

OP_NAMES = {OP_PUT: "put", OP_DELETE: "delete", OP_INCR: "incr"}

_SAMPLE_BYTES = 256 * 1024  # per window sampled to estimate records per byte


@dataclass(frozen=True)
class LoggedOp:
    """One operation of a log record, with its op code spelled out."""

    op: str  # "put", "delete" or "incr"
    key: Any  # str | bytes
    value: bytes | None  # msgpack encoding of the value after the op (put, incr); None: delete
    delta: int | None = None  # incr only


@dataclass(frozen=True)
class LoggedRecord:
    """One log record: a single operation, or an atomic batch of them (`batch` True)."""

    lsn: int
    batch: bool
    ops: tuple[LoggedOp, ...]


def describe_record(record: list[Any]) -> LoggedRecord:
    """A decoded, validated record (as `SegmentReader` yields it) as a `LoggedRecord`."""
    if record[1] == OP_BATCH:
        return LoggedRecord(record[0], True, tuple(_describe_op(item, 0) for item in record[2]))
    return LoggedRecord(record[0], False, (_describe_op(record, 1),))


def _describe_op(item: list[Any], start: int) -> LoggedOp:
    op, key = item[start], item[start + 1]
    if op == OP_PUT:
        return LoggedOp("put", key, item[start + 2])
    if op == OP_DELETE:
        return LoggedOp("delete", key, None)
    return LoggedOp("incr", key, msgpack.packb(item[start + 3]), item[start + 2])


def pending_records(wal_dir: str, checkpoint: int) -> Iterator[LoggedRecord]:
    """Every record newer than `checkpoint`, in LSN order. Raises `CorruptLogError` (as
    opening would) when the log is damaged; records before the damage are yielded first."""
    for record in LogScan(wal_dir, checkpoint).records():
        if record[0] > checkpoint:
            yield describe_record(record)


def pending_state(wal_dir: str, checkpoint: int) -> State:
    """key -> encoded value (None: deleted) for every key the records newer than `checkpoint`
    touch: what recovery would write into the database. Raises `CorruptLogError`."""
    state: State = {}
    for record in LogScan(wal_dir, checkpoint).records():
        if record[0] > checkpoint:
            apply_record(state, record)
    return state


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


def summarize_pending(wal_dir: str, checkpoint: int) -> PendingSummary:
    """One pass over the log: what a recovery would replay. Raises `CorruptLogError`."""
    summary = PendingSummary()
    scan = LogScan(wal_dir, checkpoint)
    counts = {"put": 0, "delete": 0, "incr": 0}
    for record in scan.records():
        if record[0] <= checkpoint:
            continue
        summary.records += 1
        described = describe_record(record)
        summary.batches += described.batch
        for op in described.ops:
            counts[op.op] += 1
        apply_record(summary.state, record)
    summary.puts, summary.deletes, summary.incrs = counts["put"], counts["delete"], counts["incr"]
    summary.segments = len(scan.summaries)
    summary.wal_bytes = sum(segment.size for segment in scan.summaries)
    summary.torn_bytes = scan.torn_bytes
    summary.last_lsn = scan.last_lsn
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
    size = _size(last.path)
    return last.first_lsn - segments[0].first_lsn + int(_records_per_byte(last.path) * size)


def _records_per_byte(path: str) -> float:
    try:
        with mapped(path) as (data, size):
            if size <= HEADER_SIZE:
                return 0.0
            records = spanned = 0
            for start in (HEADER_SIZE, size // 3, 2 * size // 3):
                pos = at = data.find(FRAME_MAGIC, start)
                while pos != -1 and pos - at < _SAMPLE_BYTES:
                    lsns, end = intact_frame(data, pos, size)
                    if not lsns:
                        break
                    records += len(lsns)
                    pos = end
                if at != -1 and pos != -1:
                    spanned += pos - at
            return records / spanned if spanned else 1 / 64
    except FileNotFoundError:
        return 0.0


def _size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except FileNotFoundError:
        return 0
