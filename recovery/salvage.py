"""Salvage: recover a damaged log up to its first damage and set the rest aside, never deleting it.

`plan_salvage` reads the log as recovery does and stops where recovery would refuse. Guarantee 2
(no holes) decides what is set aside: nothing newer than a lost record may survive it, so the
damaged segment AND every segment after it are moved, whole, into a quarantine directory; the
records before the damage are replayed. One exception: a damaged segment whose every LSN is at
or below the database checkpoint holds nothing the database lacks, so only that segment is set
aside and the scan goes on after it (this happens when a crash left flushed segments behind
and one of them later rotted).

`SalvagePlan.carry_out` then changes the directory, in an order that is safe to interrupt:
  1. one database transaction: the replayed state and the new checkpoint;
  2. rename the set-aside segments into a new run directory under the quarantine, then fsync
     the run directory and `wal/` (renames are not durable until their directories are);
  3. delete the remaining segments, all now covered by the checkpoint (as `replay_into` does);
  4. write `salvage.json` (this report) into the run directory.
A crash before 1 changed nothing. A crash after 1 leaves the damage in `wal/`: opening still
refuses, and salvaging again replays nothing and moves what is left. After 2, opening works.

How much was set aside is measured, not guessed: the bytes from the damage to the end of the
damaged segment plus every later segment, and the records of the intact frames (valid marker,
length and checksum, well-formed records) found in those bytes. A record destroyed by the
damage cannot be counted as one; its bytes are in the byte count, and the LSNs missing between
the replayed prefix and the last intact record set aside are counted as unreadable.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from wbcache.errors import CorruptLogError
from wbcache.recovery.replay import PROGRESS_EVERY, RecoveryReport, apply_changes
from wbcache.recovery.scan import LogEnd, walk_log
from wbcache.wal import crashpoints
from wbcache.wal.owned import open_private_dir
from wbcache.wal.reader import SegmentEnd, intact_frames, mapped
from wbcache.wal.records import Record, State, fold
from wbcache.wal.segments import SegmentFile, delete_segments, list_segments
from wbcache.wal.syscalls import SYSCALLS, write_all

if TYPE_CHECKING:
    from wbcache.backends.base import Backend

REPORT_NAME = "salvage.json"


@dataclass
class SetAside:
    """One segment moved into the quarantine. Field names are stable (the CLI prints them)."""

    name: str
    size: int
    offset: int  # first byte not replayed: the damage, or 0 for a segment after it
    reason: str | None  # the damage found here; None for a segment set aside because it follows
    records: int  # intact records in bytes offset..size
    records_in_database: int  # of those, LSN at or below the checkpoint after salvage
    first_lsn: int | None  # lowest and highest LSN of the intact records NOT in the database
    last_lsn: int | None
    moved_to: str | None = None  # its path in the quarantine, once moved

    @property
    def bytes(self) -> int:
        return self.size - self.offset


@dataclass
class SalvageReport:
    """What was, or in a dry run would be, set aside. Field names are stable."""

    quarantine_dir: str | None  # the run directory; None in a dry run or when nothing was moved
    segments: list[SetAside]
    replayed_through: int  # the checkpoint after salvage: every LSN up to it is in the database

    @property
    def records_set_aside(self) -> int:
        """Intact records set aside that the database does not hold."""
        return sum(item.records - item.records_in_database for item in self.segments)

    @property
    def records_in_database(self) -> int:
        """Intact records set aside that the database already holds (nothing lost)."""
        return sum(item.records_in_database for item in self.segments)

    @property
    def records_unreadable(self) -> int:
        """LSNs between the replayed prefix and the last intact record set aside that no intact
        record holds: records the damage destroyed. A lower bound: records destroyed after the
        last intact one cannot be counted."""
        last = self.last_lsn
        return 0 if last is None else last - self.replayed_through - self.records_set_aside

    @property
    def bytes_set_aside(self) -> int:
        return sum(item.bytes for item in self.segments)

    @property
    def first_lsn(self) -> int | None:
        return min((s.first_lsn for s in self.segments if s.first_lsn is not None), default=None)

    @property
    def last_lsn(self) -> int | None:
        return max((s.last_lsn for s in self.segments if s.last_lsn is not None), default=None)

    def as_dict(self) -> dict[str, Any]:
        return {
            "quarantine_dir": self.quarantine_dir,
            "records_set_aside": self.records_set_aside,
            "records_in_database": self.records_in_database,
            "records_unreadable": self.records_unreadable,
            "replayed_through": self.replayed_through,
            "bytes_set_aside": self.bytes_set_aside,
            "first_lsn": self.first_lsn,
            "last_lsn": self.last_lsn,
            "segments": [dict(asdict(item), bytes=item.bytes) for item in self.segments],
        }


@dataclass
class SalvagePlan:
    """The outcome of reading the log up to its damage; nothing has changed yet."""

    wal_dir: str
    checkpoint_before: int
    segments: int  # segments in wal/ when planned
    seconds: float = 0.0  # spent planning and carrying out (not waiting for a confirmation)
    state: State = field(default_factory=dict)
    deltas: dict[Any, int] = field(default_factory=dict)  # keys only incremented: their sum
    records: int = 0
    replayed: int = 0
    walked: list[SegmentEnd] = field(default_factory=list)  # every segment read, damaged too
    set_aside: list[SetAside] = field(default_factory=list)
    # Per set-aside segment: its path, and the last LSN replayed from it (None: none counts)
    _moves: list[tuple[str, int | None]] = field(default_factory=list)

    @property
    def read(self) -> list[SegmentEnd]:
        """The segments read whole: every record in them is replayed; deleted after replay."""
        return [segment for segment in self.walked if segment.damage is None]

    @property
    def last_lsn(self) -> int:
        """Last LSN of the replayed prefix (0 when none)."""
        return LogEnd(self.checkpoint_before, self.walked).last_lsn

    @property
    def checkpoint_after(self) -> int:
        return max(self.checkpoint_before, self.last_lsn)

    @property
    def damaged(self) -> bool:
        return bool(self.set_aside)

    def report(self, *, dry_run: bool) -> RecoveryReport:
        return RecoveryReport.of(LogEnd(self.checkpoint_before, self.walked),
                                 segments=self.segments, replayed=self.replayed,
                                 keys=len(self.state), checkpoint_after=self.checkpoint_after,
                                 seconds=self.seconds, dry_run=dry_run)

    def salvage_report(self, quarantine_dir: str | None = None) -> SalvageReport:
        return SalvageReport(quarantine_dir, self.set_aside, self.checkpoint_after)

    def _add(self, segment: SegmentFile, offset: int, reason: str | None,
             after_lsn: int | None) -> None:
        """Set aside `segment` from byte `offset`; its records are counted once the plan is
        complete and the checkpoint after salvage known (`_count`)."""
        self.set_aside.append(SetAside(os.path.basename(segment.path), _size(segment.path),
                                       offset, reason, 0, 0, None, None))
        self._moves.append((segment.path, after_lsn))

    def _count(self) -> None:
        checkpoint_after = self.checkpoint_after
        for item, (path, after_lsn) in zip(self.set_aside, self._moves, strict=True):
            for lsn in _intact_records(path, item.offset, after_lsn):
                item.records += 1
                if lsn <= checkpoint_after:
                    item.records_in_database += 1
                    continue
                item.first_lsn = lsn if item.first_lsn is None else min(item.first_lsn, lsn)
                item.last_lsn = lsn if item.last_lsn is None else max(item.last_lsn, lsn)

    def carry_out(self, backend: Backend, quarantine_root: str) -> SalvageReport:
        """Replay, move the set-aside segments into a new directory under `quarantine_root`,
        delete the rest (see the module docstring for the order and why it is safe)."""
        started = time.perf_counter()
        if crashpoints.ARMED:
            crashpoints.reached("recovery.before_replay")
        if self.checkpoint_after > self.checkpoint_before:
            apply_changes(backend, self.state, self.deltas, self.checkpoint_after)
        if crashpoints.ARMED:
            crashpoints.reached("recovery.after_replay")
        run_dir = None
        if self.set_aside:
            run_dir = _make_run_dir(quarantine_root)
            for item, (path, _) in zip(self.set_aside, self._moves, strict=True):
                item.moved_to = os.path.join(run_dir, item.name)
                SYSCALLS.rename(path, item.moved_to)
            SYSCALLS.fsync_dir(run_dir)
            SYSCALLS.fsync_dir(self.wal_dir)
        delete_segments(self.wal_dir, [summary.path for summary in self.read])
        if crashpoints.ARMED:
            crashpoints.reached("recovery.after_delete")
        report = self.salvage_report(run_dir)
        self.seconds += time.perf_counter() - started
        if run_dir is not None:
            _write_report(run_dir, self, report)
        return report


def plan_salvage(backend: Backend, wal_dir: str, *,
                 progress: Callable[[int], None] | None = None) -> SalvagePlan:
    """Read the log in `wal_dir` against `backend`'s checkpoint up to its first damage and
    decide what to replay and what to set aside. Changes nothing. `progress(n)` is called with
    the records read so far, every 65,536 records. Raises `UnsupportedFormatError` for a
    segment of an unknown format version: that is no damage, and salvage must not touch it."""
    checkpoint = backend.checkpoint()
    remaining = list_segments(wal_dir)
    started = time.perf_counter()
    plan = SalvagePlan(wal_dir, checkpoint, len(remaining))

    def on_frame(records: list[Record]) -> None:
        for record in records:
            if record[0] > checkpoint:
                fold(plan.state, record, plan.deltas)
                plan.replayed += 1
        before, plan.records = plan.records, plan.records + len(records)
        if progress is not None and plan.records // PROGRESS_EVERY != before // PROGRESS_EVERY:
            progress(plan.records)

    while remaining:
        end = walk_log(wal_dir, checkpoint, on_frame, max_key_size=backend.max_key_size,
                       segments=remaining)
        plan.walked.extend(end.segments)
        if end.problem is None:
            break
        remaining = _set_aside_from(plan, end)
    plan._count()
    plan.seconds = time.perf_counter() - started
    return plan


def _set_aside_from(plan: SalvagePlan, end: LogEnd) -> list[SegmentFile]:
    """Record what `end.problem` sets aside; return the segments still to be read."""
    damage = end.problem
    assert damage is not None
    if end.segments and end.segments[-1].damage is damage:  # damage inside a segment
        walked = end.segments[-1]
        damaged = SegmentFile(walked.first_lsn, walked.path)
        after_lsn = walked.last_lsn if walked.records else walked.first_lsn - 1
        later = end.unread
    else:  # a gap before a segment, which was not read
        damaged, later = end.unread[0], end.unread[1:]
        after_lsn = damaged.first_lsn - 1
    plan._add(damaged, damage.offset, damage.reason, after_lsn)
    if later and later[0].first_lsn - 1 <= plan.checkpoint_before:
        return later  # the damaged segment held only what the database has: read on
    for segment in later:
        plan._add(segment, 0, None, None)
    return []


def _intact_records(path: str, start: int, after_lsn: int | None) -> list[int]:
    """LSNs of the records in intact frames at or after byte `start` of segment `path`, found
    with the resync rule. In the damaged segment only frames newer than `after_lsn` count, as
    in the reader's own judgement, so that a stale frame inside a damaged region is not taken
    for records set aside."""
    try:
        with mapped(path) as (data, size):
            return [lsn for _, lsns, _ in intact_frames(data, start, size)
                    if after_lsn is None or lsns[0] > after_lsn for lsn in lsns]
    except CorruptLogError:  # not a regular file: it holds no records
        return []


def _make_run_dir(quarantine_root: str) -> str:
    """A new, empty directory under `quarantine_root` (created if missing), both durable.

    Nothing here is reached through a link: the quarantine is opened relative to the checked
    cache directory with O_NOFOLLOW and must be private (`wbcache.wal.owned`), and a run
    directory is made by mkdir relative to it, which never follows one (a name taken by
    anything, a planted link included, is skipped for the next)."""
    parent, name = os.path.split(quarantine_root)
    parent_fd = open_private_dir(parent, follow=True)  # the cache directory, checked again
    try:
        try:
            os.mkdir(name, 0o700, dir_fd=parent_fd)
            created = True
        except FileExistsError:
            created = False
        quarantine_fd = open_private_dir(name, dir_fd=parent_fd, shown=quarantine_root)
    finally:
        os.close(parent_fd)
    try:
        if created:
            SYSCALLS.fsync_dir(parent)
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        for attempt in range(1, 1000):
            run_name = stamp if attempt == 1 else f"{stamp}-{attempt}"
            try:
                os.mkdir(run_name, 0o700, dir_fd=quarantine_fd)
            except FileExistsError:
                continue
            SYSCALLS.fsync_dir(quarantine_root)
            return os.path.join(quarantine_root, run_name)
    finally:
        os.close(quarantine_fd)
    raise FileExistsError(f"no free run directory name under {quarantine_root}")


def _write_report(run_dir: str, plan: SalvagePlan, report: SalvageReport) -> None:
    """`salvage.json` beside the segments, so the quarantine explains itself later."""
    document = {"recovery": asdict(plan.report(dry_run=False)), "set_aside": report.as_dict()}
    path = os.path.join(run_dir, REPORT_NAME)
    # never written through anything already at that name (a link, a FIFO): O_EXCL, O_NOFOLLOW
    fd = SYSCALLS.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                       0o600)
    try:
        write_all(fd, (json.dumps(document, indent=2) + "\n").encode())
        SYSCALLS.fsync(fd)
    finally:
        SYSCALLS.close(fd)
    SYSCALLS.fsync_dir(run_dir)


def _size(path: str) -> int:
    return os.stat(path).st_size
