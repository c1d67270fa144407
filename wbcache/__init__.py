"""wbcache: a crash-durable write-back cache.

    import wbcache
    with wbcache.open("/var/lib/myapp/cache") as cache:
        cache.put("user:1", {"name": "Ada"})   # returns once fsync'd to the log
        cache.get("user:1")                    # served from memory

Writes are appended to an fsync-batched (group-commit) msgpack log before they are
acknowledged; a background flusher writes coalesced dirty entries into LMDB and truncates the
log; recovery replays what the database lacks when the directory is opened again.

The layers import on first use (PEP 562): `import wbcache` loads only this module and the
errors; `wbcache.open` loads the cache and LMDB; PostgreSQL (psycopg) is loaded only when a
PostgreSQL backend is made; `import wbcache.wal` loads no database and no cache.
"""

from __future__ import annotations

import importlib
import logging
import os
from typing import TYPE_CHECKING, Any

from wbcache.errors import (
    CacheClosedError,
    CacheLockedError,
    CheckpointConflictError,
    ConcurrentChangeError,
    CorruptLogError,
    CorruptValueError,
    DatabaseError,
    FlushError,
    ForkedCacheError,
    InvalidDirectoryError,
    LogFailedError,
    LoopMismatchError,
    PostgresError,
    RecoveryError,
    SchemaMismatchError,
    UnsupportedFormatError,
    WbcacheError,
)

if TYPE_CHECKING:
    from wbcache.aio import AsyncBatch, AsyncCache, open_async
    from wbcache.backends.base import Backend, CheckpointTokens
    from wbcache.backends.lmdb import LmdbBackend
    from wbcache.backends.postgres import PostgresBackend
    from wbcache.cache import Batch, Cache
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

logging.getLogger(__name__).addHandler(logging.NullHandler())

# name -> module that defines it, imported on first access
_LAZY = {
    "AsyncBatch": "wbcache.aio",
    "AsyncCache": "wbcache.aio",
    "open_async": "wbcache.aio",
    "Backend": "wbcache.backends.base",
    "CheckpointTokens": "wbcache.backends.base",
    "LmdbBackend": "wbcache.backends.lmdb",
    "PostgresBackend": "wbcache.backends.postgres",
    "Batch": "wbcache.cache",
    "Cache": "wbcache.cache",
    "DatabaseCheck": "wbcache.maintenance",
    "DirectorySnapshot": "wbcache.maintenance",
    "QuarantinedFile": "wbcache.maintenance",
    "RecoverOutcome": "wbcache.maintenance",
    "open_snapshot": "wbcache.maintenance",
    "recover_directory": "wbcache.maintenance",
    "Options": "wbcache.options",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


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
    from wbcache.cache import Cache
    from wbcache.options import Options

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
    "CheckpointTokens",
    "ConcurrentChangeError",
    "CorruptLogError",
    "CorruptValueError",
    "DatabaseCheck",
    "DatabaseError",
    "DirectorySnapshot",
    "FlushError",
    "ForkedCacheError",
    "InvalidDirectoryError",
    "LmdbBackend",
    "LogFailedError",
    "LoopMismatchError",
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
