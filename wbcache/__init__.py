"""wbcache: a crash-durable write-back cache.

    import wbcache
    with wbcache.open("/var/lib/myapp/cache") as cache:
        cache.put("user:1", {"name": "Ada"})   # returns once fsync'd to the log
        cache.get("user:1")                    # served from memory

Writes are appended to an fsync-batched (group-commit) msgpack log before they are
acknowledged; a background flusher writes coalesced dirty entries into LMDB and truncates the
log; recovery replays what the database lacks when the directory is opened again.
"""

from __future__ import annotations

import os
from typing import Any

from wbcache.aio import AsyncBatch, AsyncCache, open_async
from wbcache.backends.base import Backend
from wbcache.backends.lmdb import LmdbBackend
from wbcache.backends.postgres import PostgresBackend
from wbcache.cache import Batch, Cache
from wbcache.errors import (
    CacheClosedError,
    CacheLockedError,
    CheckpointConflictError,
    ConcurrentChangeError,
    CorruptLogError,
    DatabaseError,
    FlushError,
    ForkedCacheError,
    InvalidDirectoryError,
    LogFailedError,
    PostgresError,
    RecoveryError,
    SchemaMismatchError,
    UnsupportedFormatError,
    WbcacheError,
)
from wbcache.maintenance import (
    DatabaseCheck,
    DirectorySnapshot,
    QuarantinedFile,
    RecoverOutcome,
    open_snapshot,
    recover_directory,
)
from wbcache.options import Options

__version__ = "0.1.0"


def open(path: str | os.PathLike[str], *, backend: Backend | str | None = None,
         **options: Any) -> Cache:  # noqa: A001 (mirrors the built-in, like dbm.open)
    """Open (creating if needed) the cache directory at `path` and recover it.

    `options` are the fields of `Options` (e.g. `fsync="interval"`, `capacity=100_000`).
    `backend` replaces the embedded LMDB database: a `Backend` such as `PostgresBackend`
    (yours to close), or a URL such as "postgresql://user@host/db?table=wbcache", from which
    the cache makes a `PostgresBackend` that it closes with itself.

    Raises `CacheLockedError` if another cache has the directory open; `InvalidDirectoryError`
    if `path` is not a cache directory (nor empty, nor new) or was last opened with another
    kind of database; `CorruptLogError` if the log is damaged beyond a torn tail;
    `UnsupportedFormatError` for a log from a newer wbcache; `TypeError` or `ValueError` for a
    bad option; `PostgresError` if the PostgreSQL database cannot be reached (its checkpoint
    decides what to replay).
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, not {type(path).__name__}")
    return Cache.open(path, Options.from_kwargs(options), backend)


__all__ = [
    "AsyncBatch",
    "AsyncCache",
    "Backend",
    "Batch",
    "Cache",
    "CacheClosedError",
    "CacheLockedError",
    "CheckpointConflictError",
    "ConcurrentChangeError",
    "CorruptLogError",
    "DatabaseError",
    "DatabaseCheck",
    "DirectorySnapshot",
    "FlushError",
    "ForkedCacheError",
    "InvalidDirectoryError",
    "LmdbBackend",
    "LogFailedError",
    "Options",
    "PostgresBackend",
    "PostgresError",
    "QuarantinedFile",
    "RecoverOutcome",
    "RecoveryError",
    "SchemaMismatchError",
    "UnsupportedFormatError",
    "WbcacheError",
    "open",
    "open_async",
    "open_snapshot",
    "recover_directory",
]
