"""The one way into a cache directory: layout, lock, identity, database, recovery.

`open_directory` is what `wbcache.open` does before a `Cache` exists:
  1. `claim` the path (check it, create the root if missing: nothing else yet, so two first
     opens racing meet at the lock), then take the directory's exclusive lock;
  2. `complete` the layout under the lock (wal/, db/, cache_id), record which kind of
     database the directory flushes into (and refuse another kind);
  3. open the database (the embedded one, or the one given or named by URL) and attach the
     directory's identity to it (a shared database keeps a checkpoint per directory);
  4. recover: replay what the log holds beyond the database's checkpoint.
Every step that fails undoes the ones before it: the lock is released and a database this
function opened is closed.

A shared directory (`Options.shared`, wbcache/lanes.py) is opened the same way, but what is
locked and recovered is a lane: the first free one, or a new one; then every orphan lane is
adopted before the open returns.

The operator commands (`wbcache.maintenance`) open a directory through the same layout, lock
and backend registry, read-only or for recovery.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from wbcache import lanes
from wbcache.backends import Backend, backend_from_url, embedded_backend
from wbcache.layout import Layout, claim, complete, record_backend
from wbcache.lock import DirectoryLock
from wbcache.options import Options
from wbcache.recovery import RecoveryReport, replay_into

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


def open_directory(path: str | os.PathLike[str], options: Options,
                   backend: Backend | str | None = None) -> OpenedDirectory:
    """Steps 1 to 4 of the module docstring. `backend`: a `Backend` (the caller's to close),
    a URL (a backend made and owned here), or None for the embedded database."""
    if options.shared:
        return _open_shared(path, options, backend)
    given: Backend | None
    if isinstance(backend, str):
        given, owns_backend = backend_from_url(backend), True
    else:
        given, owns_backend = backend, backend is None
    try:
        layout = claim(path)
        dir_lock = DirectoryLock.acquire(layout.lock)
    except BaseException:
        if owns_backend and given is not None:
            given.close()
        raise
    database: Backend | None = given
    try:
        lanes.refuse_mismatch(layout.root, shared=False)
        complete(layout)
        if database is None:
            database = embedded_backend(layout.db, map_size=options.map_size)
        record_backend(layout, database.kind)
        database.attach(layout.cache_id())
        if options.max_key_size > database.max_key_size:
            raise ValueError(f"option max_key_size ({options.max_key_size}) exceeds the "
                             f"database's limit of {database.max_key_size} bytes")
        report = replay_into(database, layout.wal)
        log_recovery(layout.root, report)
        return OpenedDirectory(layout, dir_lock, database, owns_backend, report, layout.root)
    except BaseException:
        if owns_backend and database is not None:
            database.close()
        dir_lock.release()
        raise


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
    from wbcache.backends.lmdb import SharedLmdbBackend

    root = claim(path).root
    lanes.refuse_mismatch(root, shared=True)
    lanes.mark_shared(root)  # the mark says LMDB: a shared directory has no DIR/backend
    lane = lanes.claim(root)
    database: SharedLmdbBackend | None = None
    try:
        database = SharedLmdbBackend(Layout(root).db, map_size=options.map_size)
        database.attach(lane.layout.cache_id())
        if options.max_key_size > database.max_key_size:
            raise ValueError(f"option max_key_size ({options.max_key_size}) exceeds the "
                             f"database's limit of {database.max_key_size} bytes")
        report = replay_into(database, lane.layout.wal)
        log_recovery(f"{root} (lane {lane.name})", report)
        adopt_orphans(root, options, mine=lane.layout.root)
        return OpenedDirectory(lane.layout, lane.lock, database, True, report, root)
    except BaseException:
        if database is not None:
            database.close()
        lane.release()
        raise


def adopt_orphans(root: str, options: Options, *, mine: str | None = None) -> int:
    """Replay the log of every lane of the shared directory `root` that no process holds
    into its database (each with its own checkpoint); return the records replayed."""
    from wbcache.backends.lmdb import SharedLmdbBackend

    def adopt(lane: lanes.Lane) -> int:
        view = SharedLmdbBackend(Layout(root).db, map_size=options.map_size)
        try:
            view.attach(lane.layout.cache_id())
            return replay_into(view, lane.layout.wal).replayed
        finally:
            view.close()

    return lanes.adopt_orphans(root, adopt, mine=mine)
