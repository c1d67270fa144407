"""`replay_into`: bring the database up to the end of the log, then delete the log.

1. Read the database checkpoint C (every record with LSN <= C is already in the database).
2. Read the log, oldest first, folding every record with LSN > C into a coalesced state: the
   state after applying that prefix of the log, in LSN order (the no-holes guarantee). A key
   whose records since the last commit are all increments is also kept as a delta, so a
   backend shared by many caches (PostgreSQL) can add it to what other caches counted.
3. Whenever the state holds `CHUNK_KEYS` keys or `CHUNK_BYTES` of values, and at the end,
   apply it and the checkpoint it reflects (the LSN of the last record folded: always a whole
   record, so a batch is never split) in ONE database transaction, then start a new state. So
   memory stays bounded whatever the log holds, and a crash during recovery resumes after the
   last chunk committed.
4. Delete every segment, oldest first: all their records are now covered by the checkpoint.
   A torn tail goes with its segment; the report says how many bytes it held.

A crash at any step is safe: each chunk is all or nothing with its checkpoint, and after the
last one the next recovery finds every remaining record at or below the checkpoint and only
deletes. Damage stops the read before any record past it is folded: what was applied is a
prefix of the log.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from wbcache.recovery.scan import LogEnd, walk_log
from wbcache.wal import crashpoints
from wbcache.wal.records import OP_BATCH, OP_PUT, Deltas, Record, State, fold
from wbcache.wal.segments import delete_segments

if TYPE_CHECKING:
    from wbcache.backends.base import Backend

Key = Any  # str | bytes

PROGRESS_EVERY = 0x10000  # records between calls of a `progress` callback
# Keys folded before a chunk is applied: enough that a log cycling over a working set of up to
# this many keys is applied once, coalesced (1,000,000 records over 100,000 keys: one chunk);
# small enough that `wbcache recover` of 1,000,000 distinct keys peaks under 100 MB (bench/).
CHUNK_KEYS = 150_000
CHUNK_BYTES = 32 * 1024 * 1024  # bytes of values folded before a chunk is applied


@dataclass
class RecoveryReport:
    """What a recovery read and did. Field names are stable (the CLI prints them as JSON)."""

    segments: int
    records: int  # valid records read
    replayed: int  # records newer than the checkpoint, applied to the database
    keys: int  # entries written to the database (a key written by two chunks counts twice)
    torn_bytes: int
    torn_segment: str | None
    checkpoint_before: int
    checkpoint_after: int
    last_lsn: int  # last valid LSN in the log (0 when empty)
    seconds: float
    dry_run: bool = False

    @classmethod
    def of(cls, end: LogEnd, *, segments: int, replayed: int, keys: int, checkpoint_after: int,
           seconds: float, dry_run: bool) -> RecoveryReport:
        """The report of a recovery that read the log up to `end`."""
        return cls(segments=segments, records=end.records, replayed=replayed, keys=keys,
                   torn_bytes=end.torn_bytes, torn_segment=end.torn_segment,
                   checkpoint_before=end.checkpoint, checkpoint_after=checkpoint_after,
                   last_lsn=end.last_lsn, seconds=seconds, dry_run=dry_run)


def apply_changes(backend: Backend, values: Mapping[Key, bytes | None],
                  deltas: Mapping[Key, int], checkpoint: int) -> None:
    """Apply coalesced writes and the checkpoint in one `backend.apply` transaction.

    `values` holds each key's newest encoded value (None: deleted); `deltas` the keys whose
    writes were all increments, with their sum. A backend that applies increments gets those
    as deltas (so many caches' increments of one counter add up); any other gets the values.
    The flusher applies its batches through this too.
    """
    # The usual flush deletes nothing: `in` says so in C, in half the time of the scan.
    deletes = ([key for key, value in values.items() if value is None]
               if None in values.values() else [])
    if deltas and backend.applies_increments:
        puts = [(key, value) for key, value in values.items()
                if value is not None and key not in deltas]
        backend.apply(puts, deletes, checkpoint, list(deltas.items()))
    elif deletes:
        backend.apply([(key, value) for key, value in values.items() if value is not None],
                      deletes, checkpoint)
    else:  # only puts (the usual flush): hand over the items as they are, no copy
        backend.apply(values.items(), deletes, checkpoint)  # type: ignore[arg-type]


class Replay:
    """Folds records newer than `checkpoint` and applies them in chunks (module docstring).
    Feed it frames with `frame`; `finish` applies what is left."""

    def __init__(self, backend: Backend | None, checkpoint: int, *,
                 progress: Callable[[int], None] | None = None) -> None:
        self._backend = backend  # None: a dry run, nothing is applied
        self.checkpoint = checkpoint  # what the database holds so far
        self._state: State = {}
        self._deltas: Deltas = {}
        self._bytes = 0
        self._last = checkpoint  # LSN of the last record folded
        self._progress = progress
        self.records = 0  # read
        self.replayed = 0  # folded
        self.keys = 0  # written (or, in a dry run, that would be)

    def frame(self, records: list[Record]) -> None:
        after = self.checkpoint
        state, deltas = self._state, self._deltas
        size = self._bytes  # in locals, stored once per batch: this loop is recovery's cost
        folded = 0
        for record in records:
            if record[0] <= after:
                continue
            if record[1] == OP_PUT:  # the common case, inline
                key, value = record[2], record[3]
                replaced = state.get(key)  # the state's bytes, not the log's: coalesced
                size += len(value) - (len(replaced) if replaced else 0)
                state[key] = value
                if deltas:
                    deltas.pop(key, None)
            else:
                size += _fold_counted(state, record, deltas)
            folded += 1
        if folded:  # records run in LSN order: the last one was folded
            self._last = records[-1][0]
            self.replayed += folded
        self._bytes = size
        before = self.records
        self.records += len(records)
        if self._progress is not None and self.records // PROGRESS_EVERY != \
                before // PROGRESS_EVERY:
            self._progress(self.records)
        if len(state) >= CHUNK_KEYS or self._bytes >= CHUNK_BYTES:
            self._apply()

    def finish(self, last_lsn: int) -> int:
        """Apply what is left, with the checkpoint moved to `last_lsn` (the log's last valid
        LSN) if it is higher; return the checkpoint the database now holds."""
        self._last = max(self._last, last_lsn)
        self._apply()
        return self.checkpoint

    def _apply(self) -> None:
        if self._last <= self.checkpoint:
            return
        self.keys += len(self._state)
        if self._backend is not None:
            if crashpoints.ARMED:
                crashpoints.reached("recovery.before_replay")
            apply_changes(self._backend, self._state, self._deltas, self._last)
            if crashpoints.ARMED:
                crashpoints.reached("recovery.after_replay")
        self.checkpoint = self._last
        self._state, self._deltas, self._bytes = {}, {}, 0


def _fold_counted(state: State, record: Record, deltas: Deltas) -> int:
    """`fold` a record other than a plain put; return by how many bytes it changed the values
    `state` holds. Only plain puts were counted: a log of `put_many` batches was chunked by
    key count alone, and its recovery held 1.1 GB where one of single puts held 110 MB (a
    helper's hunt), a put replacing a batch's value taking off bytes never counted."""
    keys = (dict.fromkeys(item[1] for item in record[2]) if record[1] == OP_BATCH
            else (record[2],))
    before = sum(len(state.get(key) or b"") for key in keys)
    fold(state, record, deltas)
    return sum(len(state.get(key) or b"") for key in keys) - before


def replay_into(backend: Backend, wal_dir: str, *, dry_run: bool = False,
                progress: Callable[[int], None] | None = None) -> RecoveryReport:
    """Replay the log in `wal_dir` into `backend` and delete it (see the module docstring).

    With `dry_run`, compute the same report and change nothing. `progress(n)` is called with
    the number of records read so far, every 65,536 records. Raises `CorruptLogError` on damage
    other than a torn tail, and deletes nothing then. A log longer than one chunk is applied as
    it is read, so damage found further on leaves the database holding the valid records
    before it (a prefix of the log: never a hole); a caller that must change nothing when it
    refuses reads the log with `dry_run` first.
    """
    started = time.perf_counter()
    checkpoint = backend.checkpoint()
    replay = Replay(None if dry_run else backend, checkpoint, progress=progress)
    end = walk_log(wal_dir, checkpoint, replay.frame, max_key_size=backend.max_key_size)
    end.check()
    checkpoint_after = replay.finish(end.last_lsn)
    if not dry_run:
        delete_segments(wal_dir, [segment.path for segment in end.segments])
        if crashpoints.ARMED:
            crashpoints.reached("recovery.after_delete")
    return RecoveryReport.of(end, segments=len(end.segments), replayed=replay.replayed,
                             keys=replay.keys, checkpoint_after=checkpoint_after,
                             seconds=time.perf_counter() - started, dry_run=dry_run)
