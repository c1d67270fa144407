"""Operating on a cache directory from outside a cache: what `wbcache recover`, `inspect`,
`verify`, `dump`, `get` and `stats` call. The CLI imports only this, the public API and
`wbcache.recovery`; everything that needs the directory lock, the LMDB backend or the layout is
here.

Two ways in, chosen by whether the command may change the directory:

* `recover_directory` takes the directory's exclusive lock, as `wbcache.open` does, and refuses
  a directory in use (`CacheLockedError`) even for a dry run: a dry run predicts a recovery, and
  that recovery would be refused. It changes nothing, not even the LOCK file or LMDB's
  `lock.mdb`, until it has read the whole log and knows it will write (`_WriteOnDemand`), so a
  refusal for damage or an unknown format version leaves every byte as it was.
* `open_snapshot` is for the read-only commands. It takes a SHARED lock when it can, which keeps
  a cache from opening (and the log and database from changing) while it reads, and then reads
  LMDB without LMDB's own lock file, so not one byte of the directory changes. When a live cache
  owns the directory it still reads, through LMDB's reader table, and says the view may be
  stale (`DirectorySnapshot.live_owner`).

This module runs past 400 lines on purpose: it is the one place outside `Cache` that touches
the directory lock, the layout and LMDB, so the CLI never does. Its sections: the directory and
its lock; the database; recover; read-only views.

Bad input is refused before anything is read: a missing path, a file, a directory that is not
a cache directory (`InvalidDirectoryError`), a permission problem (`PermissionError`, naming the
path), a log segment of an unknown format version (`UnsupportedFormatError`). Nothing is ever
created or changed in those cases.
"""

from __future__ import annotations

import errno
import heapq
import os
import stat
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import lmdb

from wbcache.backends.base import Key
from wbcache.backends.lmdb import LmdbBackend
from wbcache.codec import decode_value
from wbcache.errors import (
    CacheClosedError,
    CacheLockedError,
    ConcurrentChangeError,
    DatabaseError,
    InvalidDirectoryError,
)
from wbcache.layout import LOCK_NAME, QUARANTINE_NAME, WAL_NAME, Layout, checked_entries
from wbcache.lock import DirectoryLock, owner_pid
from wbcache.recovery import RecoveryReport, replay_into
from wbcache.recovery.pending import (
    LoggedRecord,
    PendingSummary,
    estimate_log_records,
    pending_records,
    pending_state,
    summarize_pending,
)
from wbcache.recovery.salvage import SalvagePlan, SalvageReport, plan_salvage
from wbcache.recovery.verify import LogSurvey, check_format_versions, survey_log

DATA_FILE = "data.mdb"

Progress = Callable[[int, int], None]  # (records read so far, estimated total)

__all__ = [
    "DATA_FILE",
    "QUARANTINE_NAME",
    "DatabaseCheck",
    "DirectorySnapshot",
    "QuarantinedFile",
    "RecoverOutcome",
    "open_snapshot",
    "recover_directory",
]


# ----------------------------------------------------------------- the directory and its lock


def existing_layout(path: str | os.PathLike[str]) -> Layout:
    """The layout of the existing cache directory at `path`, or an error naming the problem:
    `InvalidDirectoryError` (missing, not a directory, not a cache directory, or hostile: not
    yours, writable by others, a planted link, FIFO or device where the layout has a file or a
    directory; see `wbcache.layout`) or `PermissionError` (with the path that could not be
    read). Creates nothing.

    A directory another user owns is refused here too, though these commands only read:
    nothing is read from (or written through) a path the user does not own, as its owner could
    point its entries anywhere. An administrator reads it as its owner (sudo -u)."""
    raw = os.fspath(path)
    if not raw:
        raise InvalidDirectoryError("the directory path is empty")
    layout = Layout(os.path.abspath(raw))
    root = layout.root
    try:
        mode = os.stat(root).st_mode
    except FileNotFoundError:
        raise InvalidDirectoryError(f"{root} does not exist") from None
    except NotADirectoryError:
        raise InvalidDirectoryError(f"{root} does not exist (a parent is a file)") from None
    if not stat.S_ISDIR(mode):
        raise InvalidDirectoryError(f"{root} is not a directory")
    # the owner and mode of the directory, wal/, db/ and quarantine/, the kind of every file
    names = checked_entries(layout, private_dirs=(QUARANTINE_NAME,))
    if not (WAL_NAME in names and LOCK_NAME in names):
        raise InvalidDirectoryError(
            f"{root} is not a wbcache directory (it has no LOCK file and wal/ directory)")
    kind = layout.backend_kind()
    if kind not in (None, LmdbBackend.kind):
        # Its log belongs to that database: replaying it into db/ would lose it there.
        raise InvalidDirectoryError(
            f"{root} flushes into a {kind} database; these commands read and recover only "
            f"directories of the embedded LMDB. Open it with its backend "
            f"(wbcache.open(path, backend=...)), which recovers it into that database.")
    return layout


def _holder(layout: Layout) -> str:
    pid = owner_pid(layout.lock)
    return f"a live cache (pid {pid})" if pid is not None else "another process"


# ----------------------------------------------------------------- the database


class _EmptyDatabase:
    """The database of a directory whose `db/` holds none yet (a crash right after creation)."""

    max_key_size = 511

    def get(self, key: Key) -> bytes | None:
        return None

    def checkpoint(self) -> int:
        return 0

    def count(self) -> int:
        return 0

    def items(self) -> Iterator[tuple[Key, bytes]]:
        return iter(())

    def apply(self, puts: Sequence[tuple[Key, bytes]], deletes: Sequence[Key],
              checkpoint: int) -> None:
        raise AssertionError("the empty database is read-only")

    def close(self) -> None:
        pass


def _open_database(layout: Layout, *, live: bool) -> LmdbBackend | _EmptyDatabase:
    """The database for reading. `live`: a cache owns it, so read through LMDB's lock file."""
    if not os.path.exists(os.path.join(layout.db, DATA_FILE)):
        return _EmptyDatabase()
    try:
        if live:
            return LmdbBackend(layout.db, readonly=True)
        # reading without LMDB's lock file writes nothing; no one writes while we hold the lock
        return LmdbBackend(layout.db, readonly=True, lock=False)
    except lmdb.Error as exc:
        raise _database_error(layout, exc) from None


def _database_error(layout: Layout, exc: lmdb.Error) -> Exception:
    text = str(exc)
    if isinstance(exc, lmdb.ReadonlyError) or "Permission denied" in text:
        return PermissionError(errno.EACCES, "Permission denied", layout.db)
    return DatabaseError(f"cannot read the database in {layout.db}: {text}")


class _WriteOnDemand:
    """The backend `recover_directory` hands to recovery: reads come from a lock-free snapshot,
    and LMDB is opened for writing only at the first `apply`, after the log has been read in
    full. So a recovery refused for damage has written nothing at all."""

    applies_increments = False  # LMDB: increments arrive as puts of their results

    def __init__(self, layout: Layout, held: DirectoryLock) -> None:
        self._layout = layout
        self._held = held
        self._reader: LmdbBackend | _EmptyDatabase | None = _open_database(layout, live=False)
        self._writer: LmdbBackend | None = None

    @property
    def _current(self) -> LmdbBackend | _EmptyDatabase:
        current = self._writer or self._reader
        assert current is not None
        return current

    @property
    def max_key_size(self) -> int:
        return self._current.max_key_size

    def get(self, key: Key) -> bytes | None:
        return self._current.get(key)

    def checkpoint(self) -> int:
        return self._current.checkpoint()

    def count(self) -> int:
        return self._current.count()

    def items(self) -> Iterator[tuple[Key, bytes]]:
        return self._current.items()

    def apply(self, puts: Sequence[tuple[Key, bytes]], deletes: Sequence[Key], checkpoint: int,
              increments: Sequence[tuple[Key, int]] = ()) -> None:
        if self._writer is None:
            self._held.record_owner()
            if self._reader is not None:
                self._reader.close()  # py-lmdb refuses a second open of one environment
                self._reader = None
            try:
                self._writer = LmdbBackend(self._layout.db)
            except lmdb.Error as exc:
                raise _database_error(self._layout, exc) from None
        self._writer.apply(puts, deletes, checkpoint, increments)

    def close(self) -> None:
        for backend in (self._reader, self._writer):
            if backend is not None:
                backend.close()
        self._reader = self._writer = None


# ----------------------------------------------------------------- recover


@dataclass
class RecoverOutcome:
    """What `recover_directory` did (or, in a dry run, would do)."""

    path: str
    report: RecoveryReport
    salvage: bool  # whether --salvage was asked for
    set_aside: SalvageReport | None  # None when nothing was (or would be) set aside


def recover_directory(path: str | os.PathLike[str], *, dry_run: bool = False,
                      salvage: bool = False, progress: Progress | None = None,
                      confirm: Callable[[SalvageReport], None] | None = None) -> RecoverOutcome:
    """Replay into the database every log record it lacks, then delete the log, exactly as
    opening the cache would, holding the directory's lock.

    `dry_run`: read everything, report, change nothing. `salvage`: on damage, replay up to it
    and move the damaged segment and all after it into DIR/quarantine/<time>/ (see
    `wbcache.recovery.salvage`); `confirm(report)` is called before anything is changed when
    something would be set aside, and may raise to cancel. `progress(done, estimate)` is called
    as records are read.

    Raises `InvalidDirectoryError`, `PermissionError`, `CacheLockedError` (a live owner),
    `CorruptLogError` (damage, without `salvage`; nothing changed), `UnsupportedFormatError`
    (nothing changed, even with `salvage`).
    """
    layout = existing_layout(path)
    if not dry_run:
        _check_writable(layout, salvage=salvage)
    try:
        held = DirectoryLock.acquire(layout.lock, record_owner=False, writable=not dry_run)
    except CacheLockedError:
        raise CacheLockedError(f"{layout.root} is in use by {_holder(layout)}; stop it first "
                               f"(opening the cache recovers the directory anyway)") from None
    try:
        check_format_versions(layout.wal)
        backend = _WriteOnDemand(layout, held)
        try:
            on_records = _progress_for(layout.wal, progress)
            if not salvage:
                report = replay_into(backend, layout.wal, dry_run=dry_run,
                                     progress=on_records)
                return RecoverOutcome(layout.root, report, False, None)
            plan = plan_salvage(backend, layout.wal, progress=on_records)
            return _finish_salvage(layout, plan, backend, dry_run=dry_run, confirm=confirm)
        finally:
            backend.close()
    finally:
        held.release()


def _finish_salvage(layout: Layout, plan: SalvagePlan, backend: _WriteOnDemand, *,
                    dry_run: bool, confirm: Callable[[SalvageReport], None] | None
                    ) -> RecoverOutcome:
    if dry_run:
        planned = plan.salvage_report() if plan.damaged else None
        return RecoverOutcome(layout.root, plan.report(dry_run=True), True, planned)
    if plan.damaged and confirm is not None:
        confirm(plan.salvage_report())
    done = plan.carry_out(backend, os.path.join(layout.root, QUARANTINE_NAME))
    return RecoverOutcome(layout.root, plan.report(dry_run=False), True,
                          done if plan.damaged else None)


def _check_writable(layout: Layout, *, salvage: bool) -> None:
    """Refuse up front, changing nothing, when recovery could not finish for lack of permission
    (as root, `os.access` grants everything, and so would the kernel)."""
    needed = [layout.lock, layout.wal, layout.db]
    needed += [os.path.join(layout.db, name) for name in (DATA_FILE, "lock.mdb")
               if os.path.exists(os.path.join(layout.db, name))]
    if salvage:
        needed.append(layout.root)
    for path in needed:
        if os.path.exists(path) and not os.access(path, os.W_OK):
            raise PermissionError(errno.EACCES, "Permission denied (recover needs write access)",
                                  path)


def _progress_for(wal_dir: str, progress: Progress | None) -> Callable[[int], None] | None:
    if progress is None:
        return None
    estimate = estimate_log_records(wal_dir)
    progress(0, estimate)
    return lambda done: progress(done, max(estimate, done))


# ----------------------------------------------------------------- read-only views


@dataclass(frozen=True)
class QuarantinedFile:
    path: str  # relative to DIR/quarantine
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


class DirectorySnapshot:
    """A read-only view of a cache directory. Use `open_snapshot`; close it (or use `with`)."""

    def __init__(self, layout: Layout) -> None:
        self.layout = layout
        self.path = layout.root
        self._db: LmdbBackend | _EmptyDatabase | None = None
        self._held = DirectoryLock.acquire_shared(layout.lock)
        self.live_owner = self._held is None
        self.owner_pid = owner_pid(layout.lock) if self.live_owner else None
        try:
            check_format_versions(layout.wal)
            self._db = _open_database(layout, live=self.live_owner)
        except BaseException:
            self.close()
            raise
        self._pending: dict[Key, bytes | None] | None = None

    def __enter__(self) -> DirectorySnapshot:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None
        if self._held is not None:
            self._held.release()
            self._held = None

    # the database

    def checkpoint(self) -> int:
        return self._database().checkpoint()

    def database_entries(self) -> int:
        return self._database().count()

    def database_file_bytes(self) -> int:
        try:
            return os.path.getsize(os.path.join(self.layout.db, DATA_FILE))
        except FileNotFoundError:
            return 0

    def check_database(self) -> DatabaseCheck:
        """Read every entry and decode every value; problems are collected, not raised."""
        check = DatabaseCheck()
        try:
            for key, value in self._database().items():
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
        except (lmdb.Error, UnicodeDecodeError) as exc:
            check.problems.append(f"database unreadable after {check.entries} entries: {exc}")
        try:
            count = self._database().count()
        except lmdb.Error as exc:
            check.problems.append(f"database statistics unreadable: {exc}")
        else:
            if count != check.entries and not check.problems and not self.live_owner:
                check.problems.append(f"database says it holds {count} entries; "
                                      f"reading found {check.entries}")
        return check

    # the log

    def survey(self, progress: Callable[[int], None] | None = None) -> LogSurvey:
        """Every segment and every problem (`wbcache.recovery.verify.survey_log`)."""
        return survey_log(self.layout.wal, self.checkpoint(), progress=progress)

    def pending_records(self) -> Iterator[LoggedRecord]:
        """The records a recovery would replay, oldest first. Raises `CorruptLogError`."""
        try:
            yield from pending_records(self.layout.wal, self.checkpoint())
        except FileNotFoundError as exc:
            raise self._changed_under_us(exc) from None

    def pending_summary(self) -> PendingSummary:
        """Counts over the records a recovery would replay (one pass). Raises `CorruptLogError`."""
        try:
            return summarize_pending(self.layout.wal, self.checkpoint())
        except FileNotFoundError as exc:
            raise self._changed_under_us(exc) from None

    def entries_after_recovery(self, pending: dict[Key, bytes | None]) -> int:
        """How many keys the cache holds once `pending` (a pending state) is applied."""
        database = self._database()
        count = database.count()
        for key, value in pending.items():
            stored = database.get(key) is not None
            count += (value is not None and not stored) - (value is None and stored)
        return count

    def _pending_state(self) -> dict[Key, bytes | None]:
        """Read once per snapshot: the directory cannot change while the snapshot holds its
        lock, and with a live owner the view is stale anyway."""
        if self._pending is None:
            try:
                self._pending = pending_state(self.layout.wal, self.checkpoint())
            except FileNotFoundError as exc:
                raise self._changed_under_us(exc) from None
        return self._pending

    def _changed_under_us(self, exc: FileNotFoundError) -> Exception:
        if not self.live_owner:
            return exc
        return ConcurrentChangeError(f"the live cache deleted {exc.filename} while it was being "
                                     "read (it flushed); run the command again")

    # the data as the cache would see it after recovery

    def items(self) -> Iterator[tuple[Key, bytes]]:
        """Every (key, encoded value) after recovery: str keys by their UTF-8 bytes, then bytes
        keys. Raises `CorruptLogError` before yielding anything when the log is damaged."""
        pending = self._pending_state()
        from_log = sorted(((key, value) for key, value in pending.items() if value is not None),
                          key=lambda item: _key_order(item[0]))
        from_db = ((key, value) for key, value in self._database().items()
                   if key not in pending)
        return heapq.merge(from_db, from_log, key=lambda item: _key_order(item[0]))

    def get(self, key: Key) -> tuple[bytes | None, str | None]:
        """(encoded value, "log" or "database") of `key` after recovery; (None, None) when it is
        absent. Raises `CorruptLogError` when the log is damaged."""
        pending = self._pending_state()
        if key in pending:
            value = pending[key]
            return (value, "log") if value is not None else (None, None)
        value = self._database().get(key)
        return (value, "database") if value is not None else (None, None)

    def cache_id(self) -> str | None:
        """The directory's identity (DIR/cache_id), or None for a directory made before it."""
        try:
            return self.layout.cache_id()
        except FileNotFoundError:
            return None

    def quarantine(self) -> list[QuarantinedFile]:
        """Files set aside by earlier salvages, under DIR/quarantine/."""
        root = os.path.join(self.path, QUARANTINE_NAME)
        found = []
        for directory, _, names in os.walk(root):
            for name in sorted(names):
                full = os.path.join(directory, name)
                found.append(QuarantinedFile(os.path.relpath(full, root), os.path.getsize(full)))
        return sorted(found, key=lambda item: item.path)

    def _database(self) -> LmdbBackend | _EmptyDatabase:
        if self._db is None:
            raise CacheClosedError(f"snapshot of {self.path} is closed")
        return self._db


def open_snapshot(path: str | os.PathLike[str]) -> DirectorySnapshot:
    """A read-only view of the cache directory at `path` (see the module docstring).

    Raises `InvalidDirectoryError` or `PermissionError` before opening anything."""
    return DirectorySnapshot(existing_layout(path))


def _key_order(key: Key) -> tuple[bool, bytes]:
    """The order LMDB keeps: every str key (by its UTF-8 bytes) before every bytes key."""
    return (True, key) if type(key) is bytes else (False, key.encode())  # type: ignore[union-attr]

