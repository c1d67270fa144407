"""Read-only views of a cache directory (`open_snapshot`): what `wbcache inspect`, `verify`,
`stats`, `dump` and `get` read. `wbcache.maintenance` (which recovers) re-exports it; the two
are split only to keep each readable. The way in is `wbcache.directory` (`find_directory`,
`open_database`): the layout checks, locks, backend registry and identity `wbcache.open` uses;
nothing here names a concrete backend.

* A single-owner directory: its LOCK is held SHARED, which keeps a cache from opening (and the
  log and database from changing) while the snapshot reads, and LMDB is read without its own
  lock file, so not one byte of the directory changes. Beside a live cache it still reads,
  through LMDB's reader table, and says the view may be stale (`live_owner`).
* A shared directory has no lock of its own. Each free lane's LOCK is held shared (its log
  cannot change and no process adopts it meanwhile); a lane a live cache holds is reported in
  use and its log read as it stands. The database is read as the caches read it, through
  LMDB's lock file, since any process may open a new lane and flush at any moment.
* A directory that flushes into a database named by URL (PostgreSQL) is read through that
  database, given by the caller (the URL is never stored in the directory), attached to the
  directory's cache_id as `wbcache.open` attaches it. Other caches may write it meanwhile.

The data after recovery (`items`, `get`, `entries_after_recovery`) is the database with the
pending records of each log a recovery would replay now (`replayed_logs`: the directory's, or
each FREE lane's, in lane order) applied over it as recovery applies them (`wbcache.replayed`).
A lane in use belongs to its live cache, which flushes it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from wbcache.backends import Backend, Key
from wbcache.codec import check_key, decode_value
from wbcache.directory import (
    DATA_FILE,
    FoundDirectory,
    check_flushed_here,
    find_directory,
    open_database,
)
from wbcache.directory import count_after_recovery as _count_after
from wbcache.errors import (
    CacheClosedError,
    ConcurrentChangeError,
    CorruptLogError,
    InvalidDirectoryError,
)
from wbcache.layout import QUARANTINE_NAME, Layout, check_linked_dirs
from wbcache.lock import DirectoryLock, owner_pid
from wbcache.recovery.pending import (
    LoggedRecord,
    PendingSummary,
    pending_records,
    summarize_pending,
)
from wbcache.recovery.verify import LogSurvey, check_format_versions, survey_log
from wbcache.replayed import Found, Replayed, fold_log
from wbcache.wal.records import State

__all__ = ["DatabaseCheck", "DirectorySnapshot", "Found", "LogView", "QuarantinedFile",
           "check_checkpoint", "check_url", "open_snapshot"]


def check_url(found: FoundDirectory, url: str | None) -> None:
    """Refuse a database URL for a directory of the embedded database, and a directory of
    another database without one, saying how to give it. One line, no URL in it."""
    if url is not None and found.embedded:
        raise InvalidDirectoryError(
            f"{found.root} flushes into its own LMDB database (db/); a backend URL is only "
            f"for a directory that flushes into another database: drop --backend (and unset "
            f"WBCACHE_BACKEND)")
    if url is None and not found.embedded:
        raise InvalidDirectoryError(
            f"{found.root} flushes into a {found.kind} database, whose URL is never stored in "
            f"the directory: give it with --backend URL or in the environment variable "
            f"WBCACHE_BACKEND (the URL the cache opens it with, table included)")


def check_checkpoint(found: FoundDirectory, wal_dir: str, checkpoint: int) -> None:
    """`check_flushed_here` for a database named by URL (the embedded one is the
    directory's own)."""
    if not found.embedded:
        check_flushed_here(found.layout, wal_dir, checkpoint)


@dataclass(frozen=True)
class QuarantinedFile:
    path: str  # relative to the quarantine/ it is in
    size: int


@dataclass
class DatabaseCheck:
    """What reading every database entry found."""

    entries: int = 0
    str_keys: int = 0
    bytes_keys: int = 0
    value_bytes: int = 0
    largest_value: int = 0
    problems: list[str] = field(default_factory=list)


@dataclass
class LogView:
    """One log of the directory as the snapshot found it: a single-owner directory's (`lane`
    None), or a lane's."""

    layout: Layout  # of the directory, or of the lane
    lane: str | None
    in_use: bool  # a live cache holds it: read as it stands, maybe stale
    owner_pid: int | None  # that cache's pid, when known
    cache_id: str | None
    has_log: bool  # False for a lane made a moment ago (or left by a crash) with no log yet
    checkpoint: int = 0  # every record up to it is in the database
    held: DirectoryLock | None = field(default=None, repr=False)  # our shared lock on it

    @property
    def wal(self) -> str:
        return self.layout.wal


def _watch(layout: Layout, lane: str | None) -> LogView:
    """`layout`'s log, its LOCK held shared when no live cache holds it."""
    held, in_use = _hold(layout)
    has_log = os.path.isdir(layout.wal)
    if held is None and not in_use and has_log:
        # No LOCK when we looked, a log now: a lane claimed meanwhile (its LOCK comes before
        # its log), or a log whose LOCK was lost or removed, perhaps under a live cache still
        # holding the file. Look again; still none: read it as a live cache's, as it stands.
        held, in_use = _hold(layout)
        in_use = in_use or held is None
    cache_id = None
    try:
        cache_id = layout.cache_id()
    except FileNotFoundError:
        pass
    except BaseException:
        if held is not None:
            held.release()
        raise
    return LogView(layout, lane, in_use, owner_pid(layout.lock) if in_use else None, cache_id,
                   has_log, held=held)


def _hold(layout: Layout) -> tuple[DirectoryLock | None, bool]:
    """(our shared lock on `layout`'s LOCK, whether a live cache holds it): (None, False)
    when there is no LOCK (a lane between its mkdir and its LOCK: nothing logged yet)."""
    try:
        held = DirectoryLock.acquire_shared(layout.lock)
    except FileNotFoundError:
        return None, False
    return held, held is None


class DirectorySnapshot:
    """A read-only view of a cache directory (module docstring). Use `open_snapshot`; close
    it (or use `with`)."""

    def __init__(self, found: FoundDirectory, url: str | None) -> None:
        check_url(found, url)
        self.found = found
        self.path = found.root
        self.shared = found.shared
        self.logs: list[LogView] = []
        self._db: Backend | None = None
        self._replayed_view: Replayed | None = None
        self._delta_logs: list[LogView] = []  # live logs whose increments are added here
        try:
            if found.shared:
                for lane in found.lanes():  # one at a time: close() releases those held
                    self.logs.append(_watch(lane, os.path.basename(lane.root)))
            else:
                self.logs.append(_watch(found.layout, None))
            # A wal/ or db/ linked to another directory's (a copy's link, or another cache's
            # own): open and recover refuse it, so the view does too, before reading it, not
            # report another cache's records as this one's (an outside audit).
            check_linked_dirs(found.layout, write=False)
            for log in self.logs:
                if log.has_log:
                    check_format_versions(log.wal)
            # a single-owner directory held shared is still: LMDB is read without its lock file
            self._db = open_database(found, url, still=self.still)
            for log in self.logs:
                log.checkpoint = self._checkpoint_of(log)
                if log.has_log:
                    check_checkpoint(found, log.wal, log.checkpoint)
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> DirectorySnapshot:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None
        for log in self.logs:
            if log.held is not None:
                log.held.release()
                log.held = None

    @property
    def kind(self) -> str:
        """The kind of database ("lmdb", "postgresql")."""
        return self.found.kind

    @property
    def still(self) -> bool:
        """Whether nothing can change the directory while the snapshot reads: a single-owner
        directory no live cache holds (its database may still be shared with other caches)."""
        return not self.shared and not self.logs[0].in_use

    @property
    def live_owner(self) -> bool:
        """Whether a live cache holds the directory (shared: any of its lanes)."""
        return any(log.in_use for log in self.logs)

    @property
    def owner_pid(self) -> int | None:
        """The live owner's pid, for a single-owner directory (a shared one's are per lane)."""
        return None if self.shared else self.logs[0].owner_pid

    @property
    def replayed_logs(self) -> list[LogView]:
        """The logs a recovery would replay now: the directory's (beside a live cache too: a
        view that may be stale), or each free lane's."""
        return [log for log in self.logs if log.has_log and not (self.shared and log.in_use)]

    def _checkpoint_of(self, log: LogView) -> int:
        if not self.shared:
            return self._database().checkpoint()
        if log.cache_id is None:
            return 0
        view = open_database(self.found, None, lane=log.layout)
        try:
            return view.checkpoint()
        finally:
            view.close()

    def _database(self) -> Backend:
        if self._db is None:
            raise CacheClosedError(f"snapshot of {self.path} is closed")
        return self._db

    def _only(self, log: LogView | None) -> LogView:
        if log is not None:
            return log
        if self.shared:
            raise ValueError(f"{self.path} is a shared directory: name one of its lanes")
        return self.logs[0]

    # the directory and the database

    def cache_id(self) -> str | None:
        """A single-owner directory's identity (None for one made before it, or shared)."""
        return None if self.shared else self.logs[0].cache_id

    def checkpoint(self, log: LogView | None = None) -> int:
        return self._only(log).checkpoint

    def database_entries(self) -> int:
        return self._database().count()

    def database_file_bytes(self) -> int | None:
        """The size of the embedded database's file; None for a database named by URL."""
        if not self.found.embedded:
            return None
        try:
            return os.path.getsize(os.path.join(self.found.layout.db, DATA_FILE))
        except FileNotFoundError:
            return 0

    def check_database(self) -> DatabaseCheck:
        """Read every entry and decode every value; problems are collected, not raised."""
        check = DatabaseCheck()
        database = self._database()
        try:
            for key, value in database.items():
                check.entries += 1
                if type(key) is str:
                    check.str_keys += 1
                else:
                    check.bytes_keys += 1
                check.value_bytes += len(value)
                check.largest_value = max(check.largest_value, len(value))
                try:
                    decode_value(value)
                except Exception as exc:  # msgpack raises several types for bad input
                    check.problems.append(f"database value of key {key!r} cannot be decoded "
                                          f"({type(exc).__name__}: {exc})")
            count = database.count()
        except Exception as exc:  # any database's read error is a finding, not a crash
            check.problems.append(f"database unreadable after {check.entries} entries: "
                                  f"{type(exc).__name__}: {exc}")
            return check
        # Only a database nobody else writes must agree with itself.
        if count != check.entries and not check.problems and self.still and self.found.embedded:
            check.problems.append(f"database says it holds {count} entries; "
                                  f"reading found {check.entries}")
        return check

    def quarantine(self, log: LogView | None = None) -> list[QuarantinedFile]:
        """Files set aside by earlier salvages, under the quarantine/ beside the log. Listed,
        never followed: a link in it is given its own size (a link to a file outside would
        otherwise be listed as that file, and a dangling one fail the command)."""
        root = os.path.join(self._only(log).layout.root, QUARANTINE_NAME)
        found = []
        for directory, _, names in os.walk(root):
            for name in sorted(names):
                full = os.path.join(directory, name)
                try:
                    size = os.stat(full, follow_symlinks=False).st_size
                except FileNotFoundError:  # removed since the listing
                    continue
                found.append(QuarantinedFile(os.path.relpath(full, root), size))
        return sorted(found, key=lambda item: item.path)

    # a log

    def survey(self, log: LogView | None = None,
               progress: Callable[[int], None] | None = None) -> LogSurvey:
        """Every segment and every problem (`wbcache.recovery.verify.survey_log`)."""
        log = self._only(log)
        if not log.has_log:
            return LogSurvey(log.wal, log.checkpoint)
        return survey_log(log.wal, log.checkpoint, progress=progress,
                          max_key_size=self._database().max_key_size,
                          live_checkpoint=((lambda: self._checkpoint_of(log)) if log.in_use
                                           else None))

    def pending_records(self, log: LogView | None = None) -> Iterator[LoggedRecord]:
        """The records a recovery would replay from `log`, oldest first. Raises
        `CorruptLogError` (after yielding the records before the damage)."""
        log = self._only(log)
        try:
            yield from pending_records(log.wal, log.checkpoint,
                                       max_key_size=self._database().max_key_size)
        except (FileNotFoundError, CorruptLogError) as exc:
            raise self._read_failed(log, exc) from None

    def pending_summary(self, log: LogView | None = None) -> PendingSummary:
        """Counts over the records a recovery would replay from `log` (one pass). Raises
        `CorruptLogError`."""
        log = self._only(log)
        try:
            return summarize_pending(log.wal, log.checkpoint,
                                     max_key_size=self._database().max_key_size)
        except (FileNotFoundError, CorruptLogError) as exc:
            raise self._read_failed(log, exc) from None

    # the data as the caches will see it after recovery

    def entries_after_recovery(self, pending: Iterable[State]) -> int:
        """How many keys the caches hold once the pending states of `replayed_logs` (in that
        order) are applied: what `len(cache)` will be."""
        return _count_after(self._database(), pending)

    def items(self) -> Iterator[tuple[Key, bytes]]:
        """Every (key, encoded value) after recovery, in `key_order`. Raises `CorruptLogError`
        before yielding anything when a log to replay is damaged, `ConcurrentChangeError`
        when a live cache flushed increments meanwhile (below)."""
        items = self._replayed().items(self._database(), ordered=self.found.embedded)
        self._check_no_flush_under_deltas()  # the counters' stored values are read by now
        return items

    def get(self, key: Key) -> Found:
        """`key`'s value after recovery. Raises `CorruptLogError` when a log is damaged,
        `ConcurrentChangeError` when a live cache flushed increments meanwhile (below),
        `TypeError`/`ValueError` for a key no write can have stored (empty, over the
        database's limit, a str that is not UTF-8)."""
        key = check_key(key, self._database().max_key_size)
        replayed = self._replayed()
        found = replayed.get(key, self._database())
        if replayed.has_delta(key):
            self._check_no_flush_under_deltas()
        return found

    def _check_no_flush_under_deltas(self) -> None:
        """A counter's value here is the database's plus the increments a live cache's log
        held when it was folded. Had that cache flushed since, the database's value would
        hold them already and they would be counted twice: a value that never existed. Its
        checkpoint, read after the database's value, tells (a flush commits both at once)."""
        for log in self._delta_logs:
            if self._checkpoint_of(log) != log.checkpoint:
                raise ConcurrentChangeError(
                    f"the live cache of {log.layout.root} flushed its increments while they "
                    "were being read; run the command again")

    def _read_failed(self, log: LogView, exc: FileNotFoundError | CorruptLogError
                     ) -> Exception:
        """What a failed read of `log` means. A live cache may flush between the snapshot's
        read of its checkpoint and the read of its log, and delete the segments its new
        checkpoint covers: a segment vanishes under the read, or (deleted before the listing)
        the records after the old checkpoint look missing. Its checkpoint, read again, tells
        that from damage (a segment is deleted only once a checkpoint covering it commits).
        Any other problem is damage however the checkpoint moved."""
        if not log.in_use:
            return exc
        if isinstance(exc, FileNotFoundError):
            return ConcurrentChangeError(f"the live cache deleted {exc.filename} while it was "
                                         "being read (it flushed); run the command again")
        missing = exc.missing
        if (missing is not None and missing[0] == log.checkpoint + 1
                and missing[1] <= self._checkpoint_of(log)):
            return ConcurrentChangeError(f"the live cache of {log.layout.root} flushed while "
                                         "its log was being read; run the command again")
        return exc

    def _replayed(self) -> Replayed:
        """Read once per snapshot: the logs replayed cannot change while it holds their locks
        (or belong to a live cache, whose view is stale anyway)."""
        if self._replayed_view is None:
            database = self._database()
            view = Replayed(database.applies_increments)
            for log in self.replayed_logs:
                try:
                    state, deltas = fold_log(log.wal, log.checkpoint, database.max_key_size)
                except (FileNotFoundError, CorruptLogError) as exc:
                    raise self._read_failed(log, exc) from None
                view.add(log.lane, state, deltas)
                if log.in_use and deltas and database.applies_increments:
                    self._delta_logs.append(log)
            self._replayed_view = view
        return self._replayed_view




def open_snapshot(path: str | os.PathLike[str], *, backend: str | None = None
                  ) -> DirectorySnapshot:
    """A read-only view of the cache directory at `path` (see the module docstring).
    `backend`: the URL of the database a directory flushes into, when that is not its own
    LMDB (required then, refused otherwise).

    Raises `InvalidDirectoryError` or `PermissionError` before opening anything;
    `UnsupportedFormatError` for a log of a newer wbcache; for a URL, what its backend
    raises (`ValueError` for a bad URL, `PostgresError`)."""
    return DirectorySnapshot(find_directory(path), backend)
