"""The one way into a cache directory: layout, lock, identity, database, recovery.

`open_directory` is what `wbcache.open` does before a `Cache` exists:
  1. `claim` the path (check it, create the root if missing: nothing else yet, so two first
     opens racing meet at the lock), then take the directory's exclusive lock;
  2. `complete` the layout under the lock (wal/, db/, cache_id), record which kind of
     database the directory flushes into, and which table of a database many directories
     share (and refuse another kind or table);
  3. open the database (the embedded one, or the one given or named by URL) and attach the
     directory's identity to it (a shared database keeps a checkpoint per directory);
  4. recover: replay what the log holds beyond the database's checkpoint.
Every step that fails undoes the ones before it: the lock is released and a database this
function opened is closed.

A shared directory (`Options.shared`, wbcache/lanes.py) is opened the same way, but what is
locked and recovered is a lane: the first free one, or a new one; then every orphan lane is
adopted before the open returns.

The operator commands (`wbcache.maintenance`) come in through the second half of this module,
on the same layout, locks and backend registry: `find_directory` recognises an existing
directory and its kind (single-owner or shared; which database) without creating or changing
anything, `open_database` opens its database through the registry, for reading or for
recovery, attached to the directory's (or a lane's) identity as step 3 does, and `key_order`
and `count_after_recovery` say what the data looks like once the log is replayed.

One module (over 500 lines) because both halves apply the same rules (the layout's checks,
the locks, which database and table a directory may be given): kept side by side, an open
and a command cannot come to disagree about a directory.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, cast

from wbcache import lanes
from wbcache.backends import (
    EMBEDDED,
    Backend,
    CheckpointTokens,
    Key,
    backend_class,
    backend_from_url,
    embedded_backend,
    url_target,
)
from wbcache.errors import (
    CacheLockedError,
    DatabaseError,
    InvalidDirectoryError,
    SchemaMismatchError,
)
from wbcache.layout import (
    DATA_FILE,
    LOCK_NAME,
    QUARANTINE_NAME,
    SHARED_NAME,
    WAL_NAME,
    Layout,
    check_backend,
    check_linked_dirs,
    checked_entries,
    checked_lane_entries,
    claim,
    complete,
    record_backend,
    unclaim,
)
from wbcache.lock import DirectoryLock
from wbcache.options import Options
from wbcache.recovery import RecoveryReport, replay_into
from wbcache.recovery.scan import walk_log
from wbcache.wal.owned import check_parents
from wbcache.wal.records import DEFAULT_MAX_KEY_SIZE
from wbcache.wal.segments import list_segments

log = logging.getLogger("wbcache.recovery")


@dataclass
class OpenedDirectory:
    """A locked, recovered cache directory and its database, ready for a `Cache`."""

    layout: Layout  # the directory's, or for a shared directory its lane's (log and lock)
    lock: DirectoryLock
    backend: Backend
    owns_backend: bool  # made here (embedded, or from a URL): closed with the cache
    recovery: RecoveryReport
    root: str  # the cache directory as the user named it (a shared one's, not its lane's)

    @property
    def shared(self) -> bool:
        return self.root != self.layout.root

    def close(self) -> None:
        """Undo the open: close a database made here, release the lock."""
        try:
            if self.owns_backend:
                self.backend.close()
        finally:
            self.lock.release()


def _path_text(path: str | os.PathLike[str]) -> str:
    """`os.fspath(path)`, which must be a str: a PathLike giving bytes failed deep in the
    open with "Can't mix strings and bytes in path components" (an outside hunt)."""
    if isinstance(path, bytes):
        raise TypeError("path must be a str or an os.PathLike, not bytes (os.fsdecode turns "
                        "bytes into a str)")
    text = os.fspath(path)
    if not isinstance(text, str):
        raise TypeError(f"path must be a str or an os.PathLike giving a str, not one giving "
                        f"{type(text).__name__} (os.fsdecode turns bytes into a str)")
    return text


def open_directory(path: str | os.PathLike[str], options: Options,
                   backend: Backend | str | None = None) -> OpenedDirectory:
    """Steps 1 to 4 of the module docstring. `backend`: a `Backend` (the caller's to close),
    a URL (a backend made and owned here), or None for the embedded database."""
    path = _path_text(path)
    if not path:  # "" would be the working directory
        raise ValueError("the directory path is empty")
    # Duck-typed, as the protocol is used: isinstance(x, Backend) reads attributes statically
    # from Python 3.12 on, and refuses a wrapper that forwards them through __getattr__.
    if backend is not None and not isinstance(backend, str) and not all(
            callable(getattr(backend, name, None)) for name in ("attach", "apply", "get")):
        raise TypeError(f"backend must be a Backend (such as PostgresBackend) or a "
                        f"postgresql:// URL, not {type(backend).__name__}")
    if backend is None:  # LMDB's limit is known: refused before any file is made
        _check_key_limit(options, DEFAULT_MAX_KEY_SIZE)
    if options.shared:
        return _open_shared(path, options, backend)
    # A URL's backend is made only once the directory is checked, locked and found to flush
    # into what the URL names: making it connects, and may create tables.
    url = backend if isinstance(backend, str) else None
    target = url_target(url) if url is not None else None  # a bad URL: before anything
    database = None if isinstance(backend, str) else backend
    owns_backend = database is None  # made here (from the URL, or the embedded one)
    lanes.refuse_lane(os.fspath(path))  # before anything is made in it
    new = not os.path.lexists(path)
    layout = claim(path)
    dir_lock = _lock_single_owner(layout)
    try:
        lanes.refuse_mismatch(layout.root, shared=False)
        if url is not None and target is not None:
            recorded_kind, recorded_table = _recorded(layout)
            kind, table = target  # the table as typed: compared if its schema is there
            if recorded_kind is not None and (recorded_kind != kind or (
                    recorded_table is not None and table is not None and "." in table
                    and table != recorded_table and _log_holds_writes(layout))):
                check_backend(layout.root, (recorded_kind, recorded_table), kind, table)
            # Tables are made only for the recorded table named with its schema (a database
            # moved to a new server) or a first open: a table as typed without its schema is
            # compared once resolved, and an open refused then must have made nothing.
            known = recorded_table is None or table == recorded_table
            database = backend_from_url(url, **({} if known else {"create_tables": False}))
        complete(layout)
        if database is None:
            database = embedded_backend(layout.db, map_size=options.map_size)
        database.attach(layout.cache_id(), layout.tokens())
        _record_database(layout, database)
        _check_key_limit(options, database.max_key_size)
        report = replay_into(database, layout.wal)
        log_recovery(layout.root, report)
        dir_lock.record_owner()
        return OpenedDirectory(layout, dir_lock, database, owns_backend, report, layout.root)
    except BaseException:
        if owns_backend and database is not None:
            database.close()
        if new:
            unclaim(layout)
        dir_lock.release()
        raise


def _record_database(layout: Layout, database: Backend) -> None:
    """Lock held, `database` attached: record in DIR/backend what the directory flushes into
    (its kind, and the table for a database many directories share: `table_of`), or refuse
    a database its log does not belong to (`check_backend`). The record changes only for:
    - a directory recorded without a table (by a wbcache before tables were): it gets this
      one, unless the table holds no checkpoint for it although its log no longer starts at
      LSN 1 (segments are deleted only once flushed: it flushed into another table);
    - a directory whose log holds no write (after `wbcache recover`): it moves to this
      table, as nothing of it can be lost."""
    kind, table = database.kind, table_of(database)
    recorded_kind, recorded_table = _recorded(layout)
    if recorded_kind is not None:
        if table is None or recorded_table == table:
            check_backend(layout.root, (recorded_kind, recorded_table), kind, table)
            if layout.backend_kind() is not None:
                return  # else: an old LMDB directory, its kind recorded now
        elif recorded_kind == kind and recorded_table is not None and not _log_holds_writes(
                layout):
            log.info("%s moves from table %s to %s: its log holds no write", layout.root,
                     recorded_table, table)
        else:
            check_backend(layout.root, (recorded_kind, recorded_table), kind, table)
            # recorded without a table: the guard the commands apply
            check_flushed_here(layout, layout.wal, database.checkpoint())
    record_backend(layout, kind, table)


def check_flushed_here(layout: Layout, wal_dir: str, checkpoint: int) -> None:
    """Refuse a database holding no checkpoint for the directory (`checkpoint`, 0) although
    its log (`wal_dir`) no longer starts at LSN 1: segments are deleted only once flushed, so
    the directory has flushed into another table (or database) than this one. Caught before
    a recovery writes into the wrong table or the gap is taken for damage and salvaged
    away."""
    if checkpoint:
        return
    segments = list_segments(wal_dir)
    if segments and segments[0].first_lsn > 1:
        raise InvalidDirectoryError(
            f"{layout.root} has flushed into its database before (its log starts at LSN "
            f"{segments[0].first_lsn}), but the table the URL names holds no checkpoint for "
            f"it (cache_id {layout.cache_id()}): is the URL's table= the one the cache opens "
            f"it with?")


def _recorded(layout: Layout) -> tuple[str | None, str | None]:
    """`Layout.recorded_backend`, where a directory made before DIR/backend was, whose
    db/ holds an LMDB database, flushes into that (as `find_directory` reads it)."""
    kind, table = layout.recorded_backend()
    if kind is None and os.path.lexists(os.path.join(layout.db, DATA_FILE)):
        return EMBEDDED, None
    return kind, table


def _log_holds_writes(layout: Layout) -> bool:
    """Whether the directory's log holds a write (or damage, which may hide some)."""
    end = walk_log(layout.wal, 0, lambda frame: None)
    return end.last_lsn != 0 or end.problem is not None


def log_recovery(root: str, report: RecoveryReport) -> None:
    """One INFO line for a recovery that did something (replayed records or dropped a torn
    tail); DEBUG for a clean directory."""
    if report.replayed or report.torn_bytes:
        torn = (f"; dropped a torn tail of {report.torn_bytes} bytes in "
                f"{report.torn_segment}" if report.torn_bytes else "")
        log.info("recovered %s: replayed %d log records (%d keys) into the database, "
                 "checkpoint %d -> %d, in %.2f s%s", root, report.replayed, report.keys,
                 report.checkpoint_before, report.checkpoint_after, report.seconds, torn)
    else:
        log.debug("opened %s: nothing to recover (checkpoint %d)", root,
                  report.checkpoint_after)


def _open_shared(path: str | os.PathLike[str], options: Options,
                 backend: Backend | str | None) -> OpenedDirectory:
    if backend is not None:
        raise ValueError("shared=True uses the directory's own LMDB database, shared by the "
                         "processes of this machine; for caches on many machines, give each "
                         "its own directory and a PostgreSQL backend instead")
    lanes.refuse_lane(os.fspath(path))
    root = claim(path).root
    if lanes.is_shared(root):
        lanes.refuse_mismatch(root, shared=True)
        lanes.sync_mark(root)
    else:
        _make_shared(root)  # checks and marks, under DIR/LOCK
    lane = lanes.claim(root)
    database: Backend | None = None
    try:
        check_linked_dirs(Layout(root), shared=True)  # a copy's db/ linked to the original's
        database = _shared_database(root, options.map_size)
        database.attach(lane.layout.cache_id())
        _check_key_limit(options, database.max_key_size)
        report = replay_into(database, lane.layout.wal)
        log_recovery(f"{root} (lane {lane.name})", report)
        adopt_orphans(root, options, mine=lane.layout.root)
        lane.lock.record_owner()  # last: a refused open leaves the lane's LOCK as found
        return OpenedDirectory(lane.layout, lane.lock, database, True, report, root)
    except BaseException:
        if database is not None:
            database.close()
        lane.release()
        raise


def _check_key_limit(options: Options, limit: int) -> None:
    if options.max_key_size > limit:
        raise ValueError(f"option max_key_size ({options.max_key_size}) exceeds the "
                         f"database's limit of {limit} bytes")


def _lock_single_owner(layout: Layout) -> DirectoryLock:
    """The directory's lock, taken exclusively for a single-owner open (the pid goes into it
    once recovery has succeeded: a refused open leaves it alone). Held by another: refused
    as "in use" (`CacheLockedError`), unless the holder is a first shared open marking the
    directory (`_make_shared`, which holds it shared): then as a shared directory, as a
    retry would be. Held shared, or let go since: tried once more, as another single-owner
    open may just have failed or finished; held shared again, refused without naming the pid
    LOCK holds (a past owner's: readers and probes write none)."""
    for attempt in (1, 2):
        try:
            return DirectoryLock.acquire(layout.lock, record_owner=False)
        except CacheLockedError:
            probe = DirectoryLock.acquire_shared(layout.lock)
            if probe is None:  # held exclusively: a single-owner cache, or its first open
                raise
            try:  # held shared (or by no one): no single-owner open can make wal/ meanwhile
                made_single = os.path.isdir(layout.wal)
                made_shared = os.path.isdir(lanes.lanes_dir(layout.root))
            finally:
                probe.release()
            # lanes/ beside wal/ is single-owner: left by a shared first open interrupted
            # before its mark, wal/ made since (a shared first open refuses a wal/)
            if not made_single and (made_shared or attempt == 2):
                raise lanes.shared_directory(layout.root) from None
            if attempt == 2:  # held shared twice: the pid LOCK holds is not the holder's
                raise CacheLockedError(
                    f"{layout.root} is in use by another process: a wbcache command reading "
                    f"it, or a cache opening it; try again once it is done") from None
    raise AssertionError("unreachable")


def _make_shared(root: str) -> None:
    """Mark the new directory `root` shared, under a shared lock on `DIR/LOCK`. A single-owner
    open holds that lock exclusively from before its own check for the mark until it has made
    `wal/`: so of two first opens of one directory, one shared and one not, exactly one
    succeeds, while shared first opens do not exclude each other."""
    lock = DirectoryLock.acquire_shared(Layout(root).lock, create=True)
    if lock is None:
        if lanes.is_shared(root):  # marked meanwhile; the exclusive holder was refused
            return
        raise InvalidDirectoryError(
            f"{root} is a single-owner cache directory, open in another cache: open it "
            f"without shared=True (one process at a time), or use a new directory for a "
            f"shared cache")
    try:
        lanes.refuse_mismatch(root, shared=True)
        lanes.mark_shared(root)  # the mark says LMDB: a shared directory has no DIR/backend
    finally:
        lock.release()


def adopt_orphans(root: str, options: Options, *, mine: str | None = None,
                  say: Callable[..., None] | None = None) -> int:
    """Replay the log of every lane of the shared directory `root` that no process holds
    into its database (each with its own checkpoint); return the records replayed. `say`:
    as `lanes.adopt_orphans`."""

    def adopt(lane: lanes.Lane) -> int:
        view = _shared_database(root, options.map_size)
        try:
            view.attach(lane.layout.cache_id())
            return replay_into(view, lane.layout.wal).replayed
        finally:
            view.close()

    return lanes.adopt_orphans(root, adopt, mine=mine, say=say)


def _shared_database(root: str, map_size: int) -> Backend:
    """A view of the LMDB database of the shared directory `root`, for one lane (attach it)."""
    from wbcache.backends.lmdb import SharedLmdbBackend

    # cast: it declares default_read_ttl a float, which the protocol's `float | None` (a
    # mutable attribute, so invariant to mypy) does not admit; it is a Backend all the same
    return cast(Backend, SharedLmdbBackend(Layout(root).db, map_size=map_size))


# ---------------------------------------------------------------- existing directories
#
# The operator commands (`wbcache.maintenance`) work on a directory that already exists, never
# create one, and change nothing until a recovery knows it will write.



@dataclass(frozen=True)
class FoundDirectory:
    """An existing cache directory, checked (`wbcache.layout`), nothing created or changed."""

    layout: Layout  # the root's: a single-owner directory's LOCK, wal/, db/ and cache_id
    shared: bool  # a lane per process (wbcache/lanes.py) instead of one LOCK and wal/
    kind: str  # the kind of database it flushes into: "lmdb" (the embedded one) or a URL's
    table: str | None = None  # the table of that database its data goes to, if recorded

    @property
    def root(self) -> str:
        return self.layout.root

    @property
    def embedded(self) -> bool:
        """Whether it flushes into its own LMDB database, `DIR/db/`."""
        return self.kind == EMBEDDED

    def lanes(self) -> list[Layout]:
        """Each lane of a shared directory, in order, checked as the directory was (none for a
        single-owner directory). A lane's `db` is unused: the database is the directory's."""
        if not self.shared:
            return []
        found = []
        for lane_root in lanes.lane_roots(self.root):
            layout = Layout(lane_root)
            checked_lane_entries(layout)
            found.append(layout)
        return found


def find_directory(path: str | os.PathLike[str]) -> FoundDirectory:
    """The existing cache directory at `path` and its kind, or an error naming the problem:
    `InvalidDirectoryError` (missing, not a directory, not a cache directory, one that flushes
    into a kind of database this wbcache does not know, or hostile: not yours, writable by
    others, a planted link, FIFO or device where the layout has a file or a directory; see
    `wbcache.layout`) or `PermissionError` (naming the path that could not be read).

    A directory another user owns is refused too, even to read: nothing is read from (or
    written through) a path the user does not own, as its owner could point its entries
    anywhere. An administrator reads it as its owner (sudo -u)."""
    raw = _path_text(path)
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
    lanes.refuse_lane(root)
    names = checked_entries(layout, private_dirs=(QUARANTINE_NAME,))
    check_parents(root)  # after the directory's own checks: their refusal says more
    if SHARED_NAME in names:
        lanes.check_marked(root)
        return FoundDirectory(layout, True, EMBEDDED)  # the mark says LMDB
    if not (WAL_NAME in names and LOCK_NAME in names):
        raise InvalidDirectoryError(
            f"{root} is not a wbcache directory (it has no LOCK file and wal/ directory, nor "
            f"a SHARED mark)")
    recorded, table = layout.recorded_backend()
    kind = recorded or EMBEDDED  # none recorded: made before DIR/backend was
    try:
        backend_class(kind)
    except KeyError:
        raise InvalidDirectoryError(
            f"{root} flushes into a {kind} database, which this wbcache cannot open: open it "
            f"with its backend (wbcache.open(path, backend=...)), which recovers it into that "
            f"database") from None
    return FoundDirectory(layout, False, kind, table)


def table_of(database: Backend) -> str | None:
    """The table of its database that `database` keeps a directory's data in, for a backend
    whose database many directories share (`PostgresBackend.table`): recorded in
    DIR/backend with the kind, so that a log is never replayed into another table."""
    table = getattr(database, "table", None)
    return table if isinstance(table, str) else None


def _not_made(data_file: str) -> bool:
    """Whether no database was made durable at `data_file`: missing, or an empty file (a
    first open cut short: `lmdb_file.check_data_file`). lstat: a link planted as data.mdb,
    even a dangling one, is refused by the backend's check, not read as no database."""
    try:
        info = os.lstat(data_file)
    except FileNotFoundError:
        return True
    return stat.S_ISREG(info.st_mode) and info.st_size == 0


class NoDatabase:
    """The database of a directory whose `db/` holds none yet (no cache flushed, or a crash
    right after the first open made the layout): empty, checkpoint 0. Read-only; reading it
    creates nothing, where opening LMDB would create its files."""

    kind = EMBEDDED
    default_read_ttl: float | None = None
    max_key_size = DEFAULT_MAX_KEY_SIZE  # LMDB's

    def __init__(self, *, applies_increments: bool) -> None:
        self.applies_increments = applies_increments  # as the database, once made, will

    def attach(self, cache_id: str, tokens: CheckpointTokens | None = None) -> None:
        pass

    def get(self, key: Key) -> bytes | None:
        return None

    def apply(self, puts: Any, deletes: Any, checkpoint: int, increments: Any = ()) -> None:
        raise DatabaseError("NoDatabase is read-only: open the database for writing instead")

    def checkpoint(self) -> int:
        return 0

    def count(self) -> int:
        return 0

    def items(self) -> Iterator[tuple[Key, bytes]]:
        return iter(())

    def close(self) -> None:
        pass


def open_database(found: FoundDirectory, url: str | None, *, lane: Layout | None = None,
                  write: bool = False, still: bool = False,
                  map_size: int = Options.map_size) -> Backend:
    """The database of `found`, made through the registry and attached, as step 3 of
    `open_directory` does, to the directory's identity (for a shared directory: to `lane`'s,
    if given; without a lane the view only reads data). The caller closes it.

    `url`: the database of a directory that flushes into another kind than the embedded one
    (required then, refused otherwise: its URL is never stored in the directory).
    `write`: for a recovery about to write; the embedded database is opened read-write (and
    made if missing). Otherwise for reading, which changes nothing: a database not made yet
    reads as empty (`NoDatabase`), and a single-owner directory's LMDB is read without LMDB's
    lock file when `still` (the caller holds the directory's lock, so no one writes it). A
    shared directory's database is read as its caches read it, with LMDB's lock file: any
    process may open a lane and write meanwhile.

    Raises `InvalidDirectoryError` (a URL of another kind), `PermissionError`,
    `DatabaseError`; for a URL, whatever its backend raises (`ValueError` for a bad URL,
    `PostgresError`, ...)."""
    if (url is None) != found.embedded:
        raise ValueError(f"{found.root} flushes into a {found.kind} database: "
                         + ("give its URL" if url is None else "it takes no URL"))
    if url is not None:
        return _from_url(found, url)
    if not write and _not_made(os.path.join(found.layout.db, DATA_FILE)):
        return NoDatabase(applies_increments=found.shared)
    # LMDB's own errors leave the backend as DatabaseError or PermissionError (its lmdb_errors)
    if found.shared:
        database = _shared_database(found.root, map_size)
        if lane is not None:
            database.attach(lane.cache_id())
        return database
    if write:
        return embedded_backend(found.layout.db, map_size=map_size)
    reader: Backend = backend_class(EMBEDDED)(found.layout.db, readonly=True, lock=not still)
    return reader


def _from_url(found: FoundDirectory, url: str) -> Backend:
    # Tables are never made here: a command that reads must change nothing, and `recover`
    # replays only into the tables the cache itself made (a missing one is a mistyped table=).
    try:
        database = backend_from_url(url, create_tables=False)
    except SchemaMismatchError as exc:
        raise InvalidDirectoryError(f"{found.root} cannot use that database: {exc}") from None
    try:
        if database.kind != found.kind:
            raise InvalidDirectoryError(f"{found.root} flushes into a {found.kind} database, "
                                        f"and the URL given names a {database.kind} one")
        check_backend(found.root, (found.kind, found.table), database.kind,
                      table_of(database))
        database.attach(found.layout.cache_id(), found.layout.tokens())
    except BaseException:
        database.close()
        raise
    return database


# ---------------------------------------------------------------- the data after recovery


def key_order(key: Key) -> tuple[int, Key]:
    """The one order keys are listed in (`Cache.keys`, `wbcache dump`): str keys sorted, then
    bytes keys sorted. The embedded database keeps its keys in this order (UTF-8 bytes sort
    as their code points do)."""
    return (0, key) if type(key) is str else (1, key)


def count_after_recovery(database: Backend,
                         pending: Iterable[Mapping[Key, bytes | None]]) -> int:
    """How many keys a cache holds once each of `pending` (key -> encoded value, None:
    deleted; applied in order, as the lanes of a shared directory are) is in `database`:
    what `len(cache)` is. Only whether a key ends up present matters here, not its value."""
    present: dict[Key, bool] = {}
    for state in pending:
        for key, value in state.items():
            present[key] = value is not None
    count = database.count()
    for key, there in present.items():
        count += there - (database.get(key) is not None)
    return count
