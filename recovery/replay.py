"""`replay_into`: bring the database up to the end of the log, then delete the log.

1. Read the database checkpoint C (every record with LSN <= C is already in the database).
2. Scan the log, oldest first, and fold every record with LSN > C into one coalesced state:
   the state after applying that prefix of the log, in LSN order (DESIGN.md, guarantee 2).
   A key whose records since C are all increments is also kept as a delta, so a backend
   shared by many caches (PostgreSQL) can add it to what other caches counted.
3. Apply that state and the new checkpoint (the last valid LSN) in one database transaction.
4. Delete every segment, oldest first: all their records are now covered by the checkpoint.
   A torn tail goes with its segment; the report says how many bytes it held.

A crash at any step is safe: until step 3 commits nothing has changed, and after it the next
recovery finds every remaining record at or below the checkpoint and only deletes.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import msgpack

from wbcache.recovery.scan import LogScan
from wbcache.wal import crashpoints
from wbcache.wal.format import OP_BATCH, OP_INCR, OP_PUT
from wbcache.wal.segments import delete_segments

if TYPE_CHECKING:
    from wbcache.backends.base import Backend

Key = Any  # str | bytes

PROGRESS_EVERY = 0x10000  # records between calls of a `progress` callback
State = dict[Key, "bytes | None"]  # key -> encoded value, or None for a delete


@dataclass
class RecoveryReport:
    """What a recovery read and did. Field names are stable (the CLI prints them as JSON)."""

    segments: int
    records: int  # valid records read
    replayed: int  # records newer than the checkpoint, applied to the database
    keys: int  # distinct keys those records touched
    torn_bytes: int
    torn_segment: str | None
    checkpoint_before: int
    checkpoint_after: int
    last_lsn: int  # last valid LSN in the log (0 when empty)
    seconds: float
    dry_run: bool = False


def apply_record(state: State, record: list[Any], deltas: dict[Key, int] | None = None) -> None:
    """Fold one decoded log record into `state` (and, if given, `deltas`: per key, the sum of
    its increments while it has seen nothing but increments)."""
    op = record[1]
    if op == OP_BATCH:
        for item in record[2]:
            _apply_op(state, item, 0, deltas)
    else:
        _apply_op(state, record, 1, deltas)


def _apply_op(state: State, item: list[Any], start: int, deltas: dict[Key, int] | None) -> None:
    op, key = item[start], item[start + 1]
    if op == OP_INCR:  # the reader has validated it: [op, key, delta, result]
        if deltas is not None and (key in deltas or key not in state):
            deltas[key] = deltas.get(key, 0) + item[start + 2]
        state[key] = msgpack.packb(item[start + 3])
        return
    state[key] = item[start + 2] if op == OP_PUT else None
    if deltas:
        deltas.pop(key, None)


def apply_changes(backend: Backend, values: Mapping[Key, bytes | None],
                  deltas: Mapping[Key, int], checkpoint: int) -> None:
    """Apply coalesced writes and the checkpoint in one `backend.apply` transaction.

    `values` holds each key's newest encoded value (None: deleted); `deltas` the keys whose
    writes were all increments, with their sum. A backend that applies increments gets those
    as deltas (so many caches' increments of one counter add up); any other gets the values.
    The flusher applies its batches through this too.
    """
    deletes = [key for key, value in values.items() if value is None]
    if deltas and getattr(backend, "applies_increments", False):
        puts = [(key, value) for key, value in values.items()
                if value is not None and key not in deltas]
        backend.apply(puts, deletes, checkpoint, list(deltas.items()))
    elif deletes:
        backend.apply([(key, value) for key, value in values.items() if value is not None],
                      deletes, checkpoint)
    else:  # only puts (the usual flush): hand over the items as they are, no copy
        backend.apply(values.items(), deletes, checkpoint)  # type: ignore[arg-type]


def replay_into(backend: Backend, wal_dir: str, *, dry_run: bool = False,
                progress: Callable[[int], None] | None = None) -> RecoveryReport:
    """Replay the log in `wal_dir` into `backend` and delete it (see the module docstring).

    With `dry_run`, compute the same report and change nothing. `progress(n)` is called with
    the number of records read so far, every 65,536 records. Raises `CorruptLogError` (nothing
    changed) on damage other than a torn tail.
    """
    started = time.perf_counter()
    checkpoint = backend.checkpoint()
    scan = LogScan(wal_dir, checkpoint)
    state: State = {}
    deltas: dict[Key, int] = {}
    records = replayed = 0
    for frame in scan.frames():
        for record in frame:
            if record[0] <= checkpoint:
                continue
            if record[1] == OP_PUT:  # the common case, inline: this loop is recovery's cost
                state[record[2]] = record[3]
                if deltas:
                    deltas.pop(record[2], None)
            else:
                apply_record(state, record, deltas)
            replayed += 1
        if progress is not None and (records + len(frame)) // PROGRESS_EVERY != \
                records // PROGRESS_EVERY:
            progress(records + len(frame))
        records += len(frame)
    last_lsn = scan.last_lsn
    checkpoint_after = max(checkpoint, last_lsn)
    if not dry_run:
        if crashpoints.ARMED:
            crashpoints.reached("recovery.before_replay")
        if checkpoint_after > checkpoint:
            apply_changes(backend, state, deltas, checkpoint_after)
        if crashpoints.ARMED:
            crashpoints.reached("recovery.after_replay")
        delete_segments(wal_dir, [segment.path for segment in scan.segments])
        if crashpoints.ARMED:
            crashpoints.reached("recovery.after_delete")
    torn = [summary for summary in scan.summaries if summary.torn_bytes]
    return RecoveryReport(
        segments=len(scan.segments),
        records=records,
        replayed=replayed,
        keys=len(state),
        torn_bytes=scan.torn_bytes,
        torn_segment=torn[-1].path if torn else None,
        checkpoint_before=checkpoint,
        checkpoint_after=checkpoint_after,
        last_lsn=last_lsn,
        seconds=time.perf_counter() - started,
        dry_run=dry_run,
    )
