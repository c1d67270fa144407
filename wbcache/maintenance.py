"""Operating on a cache directory from outside a cache: what `wbcache recover`, `inspect`,
`verify`, `dump`, `get` and `stats` call. This module recovers (`recover_directory`); the
read-only views are `wbcache.snapshot` (`open_snapshot`), re-exported here. Both come in
through `wbcache.directory` (`find_directory`, `open_database`): the layout checks, locks,
backend registry and identity `wbcache.open` uses, for every kind of directory it opens
(single-owner or shared; its own LMDB or a database named by URL, such as PostgreSQL, whose
URL the caller gives: it is never stored in the directory). No concrete backend is named here.

`recover_directory` replays into the database every log record it lacks, as opening the cache
does, holding the lock opening takes: the directory's LOCK (a live owner refuses it with
`CacheLockedError`, even for a dry run: a dry run predicts a recovery, and that one would be
refused), or, in a shared directory, each free lane's LOCK; a lane a live cache holds is left
alone and reported (its own process recovers and flushes it).

A refusal changes no byte. Every log is first read in full, writing nothing (a dry-run replay,
or a salvage plan): damage in any of them refuses the whole recovery before anything is
written, and a log longer than one of recovery's chunks is never half applied before damage
further on is found. Only when something is to be done does the LOCK get our pid, the database
open for writing (LMDB: not even its lock file before then), and each log replay (in chunks,
each one transaction with its checkpoint, as `wbcache.open` does).

Bad input is refused before anything is read: a missing path, a file, a directory that is not
a cache directory or one that flushes into another database than the URL given, a directory
of another database without its URL (`InvalidDirectoryError`), a permission problem
(`PermissionError`, naming the path), a log segment of an unknown format version
(`UnsupportedFormatError`). Nothing is created or changed in those cases.
"""

from __future__ import annotations

import dataclasses
import errno
import os
from collections.abc import Callable
from dataclasses import dataclass

from wbcache.backends import Backend
from wbcache.directory import DATA_FILE, FoundDirectory, find_directory, open_database
from wbcache.errors import CacheLockedError, InvalidDirectoryError
from wbcache.layout import LMDB_LOCK_FILE, QUARANTINE_NAME, Layout, check_linked_dirs
from wbcache.lock import DirectoryLock, owner_pid
from wbcache.recovery import RecoveryReport, replay_into
from wbcache.recovery.pending import estimate_log_records
from wbcache.recovery.salvage import SalvagePlan, SalvageReport, plan_salvage
from wbcache.recovery.verify import check_format_versions
from wbcache.snapshot import (
    DatabaseCheck,
    DirectorySnapshot,
    Found,
    LogView,
    QuarantinedFile,
    check_checkpoint,
    check_url,
    open_snapshot,
)
from wbcache.wal.segments import list_segments

# (phase, records read so far in that phase, estimated total): "reading" is the pass that reads
# every log without writing, "replaying" the one that writes. The estimate may be revised.
Progress = Callable[[str, int, int], None]
# Called with what a salvage would set aside from a damaged log (and that log's lane, None in
# a single-owner directory) before anything is changed; it may raise to cancel.
Confirm = Callable[[SalvageReport, "str | None"], None]

__all__ = [
    "DATA_FILE",
    "QUARANTINE_NAME",
    "Confirm",
    "DatabaseCheck",
    "DirectorySnapshot",
    "Found",
    "LaneOutcome",
    "LogView",
    "Progress",
    "QuarantinedFile",
    "RecoverOutcome",
    "open_snapshot",
    "recover_directory",
]


@dataclass
class LaneOutcome:
    """What recovering one lane of a shared directory did (or, in a dry run, would do)."""

    lane: str
    cache_id: str | None
    owner_pid: int | None  # the live cache holding it, when it was left alone
    report: RecoveryReport | None  # None: in use by a live cache, left alone
    set_aside: SalvageReport | None = None

    @property
    def in_use(self) -> bool:
        return self.report is None


@dataclass
class RecoverOutcome:
    """What `recover_directory` did (or, in a dry run, would do)."""

    path: str
    dry_run: bool
    salvage: bool  # whether --salvage was asked for
    report: RecoveryReport | None  # a single-owner directory's; None for a shared one
    set_aside: SalvageReport | None  # None when nothing was (or would be) set aside
    lanes: list[LaneOutcome] | None = None  # a shared directory's, in order

    @property
    def skipped(self) -> list[LaneOutcome]:
        """Lanes left alone because a live cache holds them."""
        return [lane for lane in self.lanes or [] if lane.in_use]


@dataclass
class _Target:
    """One log to recover: a single-owner directory's, or a lane's."""

    layout: Layout
    lane: str | None
    lock: DirectoryLock | None = None  # held exclusively; None: left alone (see in_use)
    in_use: bool = False  # a live cache holds it
    unlocked: bool = False  # a dry run's log whose LOCK is missing: read without one
    plan: RecoveryReport | SalvagePlan | None = None  # pass 1's; None: nothing to read
    done: RecoveryReport | None = None
    set_aside: SalvageReport | None = None


def recover_directory(path: str | os.PathLike[str], *, backend: str | None = None,
                      dry_run: bool = False, salvage: bool = False,
                      progress: Progress | None = None,
                      confirm: Confirm | None = None) -> RecoverOutcome:
    """Replay into the database every log record it lacks, then delete the log, exactly as
    opening the cache would (see the module docstring).

    `backend`: the URL of the database the directory flushes into, when it is not its own LMDB
    (required then, refused otherwise). `dry_run`: read everything, report, change nothing.
    `salvage`: on damage, replay the log up to it and move the damaged segment and all after
    it into the quarantine/ beside that log, `<time>/` (see `wbcache.recovery.salvage`);
    `confirm(report, lane)` is called for each damaged log before anything is changed, and
    may raise to cancel. `progress(phase, done, estimate)` is called as records are read.

    Raises `InvalidDirectoryError`, `PermissionError`, `CacheLockedError` (a single-owner
    directory's live owner), `CorruptLogError` (damage, without `salvage`; nothing changed),
    `UnsupportedFormatError` (nothing changed, even with `salvage`); for a URL, what its
    backend raises (`ValueError` for a bad URL, `PostgresError`)."""
    found = find_directory(path)
    check_url(found, backend)
    logs = _logs(found)
    if not dry_run:
        _check_writable(found, logs, salvage=salvage)
    targets = _lock_targets(found, logs, dry_run=dry_run)
    try:
        if not found.shared and targets[0].in_use:
            layout = found.layout
            pid = owner_pid(layout.lock)
            holder = f"a live cache (pid {pid})" if pid is not None else "another process"
            raise CacheLockedError(f"{layout.root} is in use by {holder}; stop it first "
                                   f"(opening the cache recovers the directory anyway)")
        free = [target for target in targets if target.lock is not None or target.unlocked]
        if free:  # before anything is read (a lane's wal/ is no link; a shared db/ may be)
            check_linked_dirs(found.layout, write=False)
        for target in free:
            check_format_versions(target.layout.wal)
        phases = _Phases(progress, [target.layout.wal for target in free])
        phases.start("reading")
        for target in free:  # pass 1: every log read in full, nothing written
            _read(found, backend, target, salvage, phases)
        phases.end()
        if not dry_run:
            if confirm is not None:
                for target in free:
                    if isinstance(target.plan, SalvagePlan) and target.plan.damaged:
                        confirm(target.plan.salvage_report(), target.lane)
            phases.start("replaying")
            for target in free:  # pass 2
                _write(found, backend, target, phases)
            phases.end()
        return _outcome(found, targets, dry_run=dry_run, salvage=salvage)
    finally:
        for target in targets:
            if target.lock is not None:
                target.lock.release()


def _logs(found: FoundDirectory) -> list[Layout]:
    """The directory's log, or each lane's, checked as `wbcache.open` checks it: a lane's
    wal/ is never a link (`FoundDirectory.lanes`). Recovery replays a lane's log into the
    database and deletes it, so a wal/ linked to another cache directory's log would cost that
    directory its writes."""
    return found.lanes() if found.shared else [found.layout]


def _lock_targets(found: FoundDirectory, logs: list[Layout], *,
                  dry_run: bool) -> list[_Target]:
    """The `logs` to recover, each locked as `wbcache.open` locks it (exclusively; a dry run
    opens the LOCK read-only) or marked in use. Writes nothing: our pid goes into a LOCK only
    once something is to be written."""
    wanted = [_Target(log, os.path.basename(log.root) if found.shared else None)
              for log in logs]
    try:
        for target in wanted:
            if not os.path.isdir(target.layout.wal):
                continue  # a lane made a moment ago, or left by a crash first thing: no log
            try:
                target.lock = DirectoryLock.acquire(target.layout.lock, record_owner=False,
                                                    writable=not dry_run)
            except CacheLockedError:
                target.in_use = True
            except FileNotFoundError:  # a log without its LOCK (lost, removed): no one holds
                if not dry_run:        # it by name; the recovery itself makes it
                    raise
                target.unlocked = True
    except BaseException:
        for target in wanted:
            if target.lock is not None:
                target.lock.release()
        raise
    return wanted


def _read(found: FoundDirectory, url: str | None, target: _Target, salvage: bool,
          phases: _Phases) -> None:
    """Pass 1: read the target's whole log against its checkpoint, writing nothing."""
    lane = _lane_of(target) if found.shared else None
    if found.shared and lane is None:
        return
    if not found.shared:
        _cache_id(target.layout)  # read as `wbcache.open` reads it: one it refuses, refused
    reader = open_database(found, url, lane=lane, still=True)
    try:
        check_checkpoint(found, target.layout.wal, reader.checkpoint())
        on_records = phases.for_log()
        plan: SalvagePlan | RecoveryReport
        if salvage:
            plan = plan_salvage(reader, target.layout.wal, progress=on_records)
        else:
            plan = replay_into(reader, target.layout.wal, dry_run=True, progress=on_records)
        records = plan.records
    finally:
        reader.close()
    target.plan = plan
    phases.finished(records)


def _lane_of(target: _Target) -> Layout | None:
    """The lane to attach the database to; None for a lane with no identity yet, whose log is
    empty (a lane's cache_id is written before anything can be logged in it)."""
    try:
        target.layout.cache_id()
    except FileNotFoundError:
        if list_segments(target.layout.wal):
            raise InvalidDirectoryError(
                f"{target.layout.cache_id_path} is missing, but the lane's log holds "
                f"segments: without its identity its checkpoint cannot be read") from None
        return None
    return target.layout


def _write(found: FoundDirectory, url: str | None, target: _Target, phases: _Phases) -> None:
    """Pass 2: carry out what pass 1 found to do, if anything."""
    plan = target.plan
    if plan is None:
        return
    if isinstance(plan, RecoveryReport) and not plan.segments:
        target.done = dataclasses.replace(plan, dry_run=False)  # nothing to replay or delete
        return
    if isinstance(plan, SalvagePlan) and not plan.segments:
        target.done = plan.report(dry_run=False)
        return
    assert target.lock is not None
    writer: Backend = open_database(found, url, lane=target.layout if found.shared else None,
                                    write=True)  # may refuse (its files): LOCK still as found
    try:
        target.lock.record_owner()
    except BaseException:
        writer.close()
        raise
    try:
        if isinstance(plan, SalvagePlan):
            quarantine = os.path.join(target.layout.root, QUARANTINE_NAME)
            done = plan.carry_out(writer, quarantine)
            target.set_aside = done if plan.damaged else None
            target.done = plan.report(dry_run=False)
        else:
            target.done = replay_into(writer, target.layout.wal, progress=phases.for_log())
            phases.finished(target.done.records)
    finally:
        writer.close()


def _outcome(found: FoundDirectory, targets: list[_Target], *, dry_run: bool,
             salvage: bool) -> RecoverOutcome:
    for target in targets:
        plan = target.plan
        if dry_run and isinstance(plan, SalvagePlan):
            target.done = plan.report(dry_run=True)
            target.set_aside = plan.salvage_report() if plan.damaged else None
        elif dry_run and isinstance(plan, RecoveryReport):
            target.done = plan
        if target.done is None and not target.in_use:  # no log, nothing done
            target.done = _nothing(dry_run)
    if not found.shared:
        only = targets[0]
        return RecoverOutcome(found.root, dry_run, salvage, only.done, only.set_aside)
    lanes = [LaneOutcome(target.lane or "", _cache_id(target.layout),
                         owner_pid(target.layout.lock) if target.in_use else None,
                         None if target.in_use else target.done, target.set_aside)
             for target in targets]
    set_aside = [lane.set_aside for lane in lanes if lane.set_aside is not None]
    return RecoverOutcome(found.root, dry_run, salvage, None,
                          set_aside[0] if len(set_aside) == 1 else None, lanes)


def _nothing(dry_run: bool) -> RecoveryReport:
    return RecoveryReport(segments=0, records=0, replayed=0, keys=0, torn_bytes=0,
                          torn_segment=None, checkpoint_before=0, checkpoint_after=0,
                          last_lsn=0, seconds=0.0, dry_run=dry_run)


def _cache_id(layout: Layout) -> str | None:
    try:
        return layout.cache_id()
    except FileNotFoundError:
        return None


def _check_writable(found: FoundDirectory, logs: list[Layout], *, salvage: bool) -> None:
    """Refuse up front, changing nothing, when recovery could not finish for lack of permission
    (as root, `os.access` grants everything, and so would the kernel)."""
    needed = [path for log in logs for path in (log.lock, log.wal)]
    if found.embedded:
        db = found.layout.db
        needed += [db] + [os.path.join(db, name) for name in (DATA_FILE, LMDB_LOCK_FILE)]
    if salvage:
        needed += [log.root for log in logs]
    for path in needed:
        if os.path.exists(path) and not os.access(path, os.W_OK):
            raise PermissionError(errno.EACCES, "Permission denied (recover needs write access)",
                                  path)


class _Phases:
    """Progress over every log, per pass: the first pass's estimate is sampled, a later one's is
    the records the pass before read (the logs are locked)."""

    def __init__(self, progress: Progress | None, wal_dirs: list[str]) -> None:
        self._progress = progress
        self._estimate = sum(map(estimate_log_records, wal_dirs)) if progress else 0
        self._phase = ""
        self._done = 0

    def start(self, phase: str) -> None:
        self._phase, self._done = phase, 0
        if self._progress is not None:
            self._progress(phase, 0, self._estimate)

    def for_log(self) -> Callable[[int], None] | None:
        """The callback for recovery's `progress(records)` while the next log is read."""
        progress = self._progress
        if progress is None:
            return None
        phase, base, estimate = self._phase, self._done, self._estimate
        return lambda done: progress(phase, base + done, max(estimate, base + done))

    def finished(self, records: int) -> None:
        self._done += records

    def end(self) -> None:
        """The phase is over: its true total, so a bar ends full. The next pass reads the same
        locked logs, so that total is its estimate (the sampled one may be well off)."""
        if self._progress is not None:
            self._progress(self._phase, self._done, self._done)
        self._estimate = self._done
