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

The operator commands (`wbcache.maintenance`) open a directory through the same layout, lock
and backend registry, read-only or for recovery.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from wbcache.backends import Backend, backend_from_url, embedded_backend
from wbcache.layout import Layout, claim, complete, record_backend
from wbcache.lock import DirectoryLock
from wbcache.options import Options
from wbcache.recovery import RecoveryReport, replay_into

log = logging.getLogger("wbcache.recovery")


@dataclass
class OpenedDirectory:
    """A locked, recovered cache directory and its database, ready for a `Cache`."""

    layout: Layout
    lock: DirectoryLock
    backend: Backend
    owns_backend: bool  # made here (embedded, or from a URL): closed with the cache
    recovery: RecoveryReport

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
        return OpenedDirectory(layout, dir_lock, database, owns_backend, report)
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
