"""`LmdbBackend`: the embedded default database, in `DIR/db/`.

Three named databases: `str` and `bytes` hold the entries by key type (so "a" and b"a" stay
apart without a prefix byte), `meta` holds the checkpoint LSN. Opened with sync on, so a commit
returns only once it is on disk; stale reader slots of dead processes are cleared on open.

The map grows when full: LMDB's map size is fixed per open environment and a write that does not
fit fails with MapFullError. `set_mapsize` may only be called while no transaction of this
process is active, so every transaction registers with `_gate` and a resize waits for them to
finish. A fork waits the same way (wbcache/forking.py): LMDB environments must not be used
after fork(), and the child can close its copy safely only if no transaction was open.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import lmdb

from wbcache import forking
from wbcache.backends.base import Key
from wbcache.errors import DatabaseError
from wbcache.wal.syscalls import SYSCALLS

_CHECKPOINT = b"checkpoint"
_FORK_WAIT = 5.0  # s a fork waits for this process's open transactions to end


class _ReadGate:
    """Many transactions or one resizer (or a fork about to happen)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._resizing = False

    @contextmanager
    def reading(self) -> Iterator[None]:
        with self._cond:
            while self._resizing:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if not self._readers:
                    self._cond.notify_all()

    @contextmanager
    def resizing(self) -> Iterator[None]:
        self.acquire_exclusive(None)
        try:
            yield
        finally:
            self.release_exclusive()

    def acquire_exclusive(self, timeout: float | None) -> bool:
        """Wait until no transaction is open and keep new ones out; False after `timeout`."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._resizing or self._readers:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._cond.wait(remaining)
            self._resizing = True
            return True

    def release_exclusive(self) -> None:
        with self._cond:
            self._resizing = False
            self._cond.notify_all()


class LmdbBackend:
    """LMDB at `path` (a directory, created 0700), starting with a `map_size`-byte map."""

    kind = "lmdb"  # recorded in DIR/backend
    # One owner: the cache's own result of an increment is the value to store.
    applies_increments = False
    default_read_ttl = None  # only its own cache writes it: clean entries never go stale

    def __init__(self, path: str, *, map_size: int = 1 << 30, readonly: bool = False,
                 lock: bool = True) -> None:
        """`lock=False` (readonly only) reads without LMDB's lock file, so reading changes no
        byte on disk; safe only while no process writes the database (the caller holds the
        cache directory's lock)."""
        if not readonly:
            if not lock:
                raise ValueError("LmdbBackend: lock=False is only safe with readonly=True")
            os.makedirs(path, mode=0o700, exist_ok=True)
        self._path = path
        try:
            self._env = lmdb.open(path, map_size=map_size, subdir=True, max_dbs=3, sync=True,
                                  metasync=True, readonly=readonly, mode=0o600, lock=lock,
                                  create=not readonly)
        except lmdb.Error as exc:
            if "already open in this process" not in str(exc):
                raise
            raise DatabaseError(
                f"the database {path} is already open in this process (LMDB allows one open "
                f"per process): close the cache that holds it first") from None
        if not readonly:
            self._env.reader_check()
            # LMDB creates data.mdb and lock.mdb itself: make their directory entries durable
            # before anything (a log deletion) depends on the database.
            SYSCALLS.fsync_dir(path)
        self._str = self._env.open_db(b"str", create=not readonly)
        self._bytes = self._env.open_db(b"bytes", create=not readonly)
        self._meta = self._env.open_db(b"meta", create=not readonly)
        self._gate = _ReadGate()
        self.resizes = 0
        self._pid = os.getpid()
        self._quiet_for_fork = False
        forking.track(self)

    @property
    def max_key_size(self) -> int:
        return int(self._env.max_key_size())

    def _db_and_raw(self, key: Key) -> tuple[Any, bytes]:
        if isinstance(key, str):
            return self._str, key.encode()
        return self._bytes, key

    def attach(self, cache_id: str) -> None:
        """One cache per database: nothing to attach."""

    def get(self, key: Key) -> bytes | None:
        db, raw = self._db_and_raw(key)
        with self._gate.reading(), self._env.begin(db=db) as txn:
            return txn.get(raw)  # type: ignore[no-any-return]

    def checkpoint(self) -> int:
        with self._gate.reading(), self._env.begin(db=self._meta) as txn:
            raw = txn.get(_CHECKPOINT)
        return int.from_bytes(raw, "big") if raw else 0

    def count(self) -> int:
        with self._gate.reading(), self._env.begin() as txn:
            return int(txn.stat(self._str)["entries"] + txn.stat(self._bytes)["entries"])

    def items(self) -> Iterator[tuple[Key, bytes]]:
        with self._gate.reading(), self._env.begin() as txn:
            for key, value in txn.cursor(db=self._str):
                yield key.decode(), value
            yield from txn.cursor(db=self._bytes)

    def apply(self, puts: Collection[tuple[Key, bytes]], deletes: Sequence[Key],
              checkpoint: int, increments: Sequence[tuple[Key, int]] = ()) -> None:
        if increments:
            raise ValueError("LmdbBackend takes increments as puts of their results")
        # One pass (a flush of 100,000 entries spends more time here than in LMDB otherwise).
        str_puts: list[tuple[bytes, bytes]] = []
        bytes_puts: list[tuple[bytes, bytes]] = []
        add_str, add_bytes = str_puts.append, bytes_puts.append
        for key, value in puts:
            if isinstance(key, str):  # keys are exact str or bytes (codec.check_key)
                add_str((key.encode(), value))
            else:
                add_bytes((key, value))
        while True:
            try:
                with self._gate.reading():
                    self._write(str_puts, bytes_puts, deletes, checkpoint)
                return
            except lmdb.MapFullError:
                self._grow()

    def _write(self, str_puts: list[tuple[bytes, bytes]], bytes_puts: list[tuple[bytes, bytes]],
               deletes: Sequence[Key], checkpoint: int) -> None:
        with self._env.begin(write=True) as txn:
            if str_puts:
                txn.cursor(db=self._str).putmulti(str_puts)
            if bytes_puts:
                txn.cursor(db=self._bytes).putmulti(bytes_puts)
            for key in deletes:
                db, raw = self._db_and_raw(key)
                txn.delete(raw, db=db)
            txn.put(_CHECKPOINT, checkpoint.to_bytes(8, "big"), db=self._meta)

    def _grow(self) -> None:
        with self._gate.resizing():
            self._env.set_mapsize(self._env.info()["map_size"] * 2)
            self.resizes += 1

    def close(self) -> None:
        forking.untrack(self)
        self._env.close()

    def _before_fork(self) -> None:
        self._quiet_for_fork = self._gate.acquire_exclusive(_FORK_WAIT)

    def _after_fork_in_parent(self) -> None:
        if self._quiet_for_fork:
            self._quiet_for_fork = False
            self._gate.release_exclusive()

    def _disown_after_fork(self) -> None:
        """In a child: close this copy of the environment if no transaction was open at the
        fork (then closing touches only the child's own mappings and descriptors, and the
        child may open the database again); otherwise leave it alone for good."""
        if self._quiet_for_fork:
            self._env.close()
        forking.disown(self, _ForkedLmdbBackend, "LmdbBackend", self._path, self._pid)


class _ForkedLmdbBackend(LmdbBackend, forking.Disowned):
    """An `LmdbBackend` inherited through fork(): every use raises `ForkedCacheError`."""
