"""The one error hierarchy of wbcache.

Every error the library raises on purpose is a `WbcacheError`, except bad arguments, which raise
the built-in `TypeError` or `ValueError` before anything is written (docs/design.md,
guarantee 4). This module imports nothing from the package, so every layer (wal, recovery,
cache, cli) can use it.
"""

from __future__ import annotations

import os


class WbcacheError(Exception):
    """Base class of every wbcache error."""


class CacheLockedError(WbcacheError):
    """The cache directory is already open by another `Cache`, in this or another process."""


class CacheClosedError(WbcacheError):
    """The cache was closed; open it again to use it."""


class LoopMismatchError(WbcacheError):
    """An `AsyncCache` was awaited from an event loop other than the one that opened it; nothing
    was written. Use its `.cache` (a thread-safe `Cache`) from other threads or loops."""


class ForkedCacheError(WbcacheError):
    """This process inherited the cache through fork(): only the process that opened it may use
    it. Open the directory again in this process once the parent has closed it."""


class LogFailedError(WbcacheError):
    """A write or fsync of the log failed; the cache refuses writes until it is reopened.

    After a failed fsync the kernel may have dropped the dirty pages, so retrying the fsync could
    report success for data that is gone. The write that saw this error may or may not be durable;
    every write acknowledged before it is.
    """


class InvalidDirectoryError(WbcacheError):
    """The path is not a usable cache directory (a file, or a directory of something else)."""


class DatabaseError(WbcacheError):
    """The embedded database could not be opened or read (the message names it)."""


class ConcurrentChangeError(WbcacheError):
    """A live cache changed the directory while a read-only tool was reading it; run the tool
    again (or stop the cache first)."""


class CorruptValueError(WbcacheError):
    """A value read from the database does not decode: the database holds bytes wbcache did
    not write (another program, or damage). The message names the key."""


class FlushError(WbcacheError):
    """The database did not accept a flush within the timeout; the log still holds every write."""


class RecoveryError(WbcacheError):
    """Recovery could not bring the directory to a consistent state."""


class CorruptLogError(RecoveryError):
    """A log segment is damaged somewhere other than a torn tail; nothing was deleted.

    `path` is the damaged segment and `offset` the byte offset of the first bad record.
    `wbcache recover --salvage` replays up to the damage and moves the segment aside.
    `missing`: for records missing before the segment, their first and last LSNs.
    """

    def __init__(self, path: str | os.PathLike[str], offset: int, reason: str,
                 missing: tuple[int, int] | None = None) -> None:
        self.path = os.fspath(path)
        self.offset = offset
        self.reason = reason
        self.missing = missing
        super().__init__(f"corrupt log segment {self.path} at byte offset {offset}: {reason}")


class UnsupportedFormatError(RecoveryError):
    """A log segment was written in a format version this wbcache cannot read."""

    def __init__(self, path: str | os.PathLike[str], version: int, supported: int) -> None:
        self.path = os.fspath(path)
        self.version = version
        super().__init__(
            f"log segment {self.path} has format version {version}; "
            f"this wbcache reads versions 1 to {supported}"
        )


class PostgresError(WbcacheError):
    """A PostgreSQL operation failed: the server away, refusing, silent past the timeout, or an
    error it reported. The message names the server, the table and the operation; `__cause__`
    is the psycopg error. A failed flush is retried by the flusher while the log keeps the data.

    `ambiguous` is True when the connection broke after a COMMIT was sent, so the transaction
    may or may not have committed (the backend finds out before its next write)."""

    def __init__(self, message: str, *, ambiguous: bool = False) -> None:
        super().__init__(message)
        self.ambiguous = ambiguous


class CheckpointConflictError(PostgresError):
    """The database holds a checkpoint for this cache_id at or beyond the one being written:
    another directory with the same cache_id (a copy of this one?) flushes into the same table.
    Nothing was written; applying it would count increments twice."""


class SchemaMismatchError(PostgresError):
    """The table exists but does not have the columns a wbcache table has."""
