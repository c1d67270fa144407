"""The embedded database, LMDB, in `DIR/db/`: for one cache (`LmdbBackend`), or shared by every
process of a machine that opens a shared directory (`SharedLmdbBackend`, one per lane).

`LmdbDatabase` is the environment. Three named databases: `str` and `bytes` hold the entries by
key type (so "a" and b"a" stay apart without a prefix byte), `meta` holds checkpoints: the
single owner's under `checkpoint`, each lane's under `checkpoint/<cache_id>`. Opened with sync
and metasync on, so a commit returns only once it is on disk; stale reader slots of dead
processes are cleared on open. LMDB allows one open of an environment per process, so the
lanes of a process share one `LmdbDatabase` (`shared_database`, reference-counted).

A shared database adds increments as deltas inside the flush's write transaction (LMDB
serialises writers across processes, so the read and the write of a counter cannot
interleave with another process's), together with the lane's checkpoint: each lane's records
are counted exactly once, whatever order the processes flush in.

The map grows when full: LMDB's map size is fixed per open environment and a write that does not
fit fails with MapFullError. `set_mapsize` may only be called while no transaction of this
process is active, so every transaction registers with `_gate` and a resize waits for them to
finish. Another process of a shared directory that grows the map makes LMDB refuse this one's
next transaction (MapResizedError) once the data outgrows its map: it adopts the new size the
same way (`_begin`). A fork waits the same way (wbcache/forking.py): LMDB environments must
not be used after fork(), and the child can close its copy safely only if no transaction was
open.

LMDB's errors leave this module as wbcache's (`lmdb_errors`: `DatabaseError`, or
`PermissionError`), so no caller names a backend's errors; MapFullError and MapResizedError
are handled here. A data.mdb LMDB would read past its end is refused before it is opened
(`lmdb_file.check_data_file`).

About 580 lines: every use of an environment (transactions, growth, forks, a shared
directory's one open per process) is here, so the rules above can be checked in one file.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import threading
from collections.abc import Collection, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import lmdb
import msgpack

from wbcache import forking
from wbcache.backends.base import CheckpointTokens, Key
from wbcache.backends.lmdb_file import check_data_file
from wbcache.backends.lmdb_gate import ReadGate
from wbcache.codec import added
from wbcache.errors import DatabaseError
from wbcache.layout import DATA_FILE, LMDB_LOCK_FILE, check_library_files
from wbcache.wal.syscalls import SYSCALLS

_CHECKPOINT = b"checkpoint"


class _PairsInPython:
    """What py-lmdb's putmulti takes for one of the two databases: (key encoded as UTF-8,
    value) for the str keys of `puts` (`str_keys` true), or (key, value) for the bytes keys,
    in the order given, lazily; `other` counts the keys of the other kind passed over. A flush
    of 100,000 entries spent more time building its pairs than in LMDB's putmulti."""

    def __init__(self, puts: Iterable[tuple[Key, bytes]], str_keys: bool) -> None:
        self._puts = iter(puts)
        self._str_keys = bool(str_keys)
        self.other = 0

    def __iter__(self) -> _PairsInPython:
        return self

    def __next__(self) -> tuple[bytes, bytes]:
        for key, value in self._puts:
            if isinstance(key, str) is not self._str_keys:  # keys are exact str or bytes
                self.other += 1
            elif self._str_keys:
                return key.encode(), value  # type: ignore[union-attr]
            else:
                return key, value  # type: ignore[return-value]
        raise StopIteration


try:  # the same iterator in C (wbcache/backends/_pairs.c, built by setup.py)
    from wbcache.backends._pairs import pairs as _pairs
except ImportError:  # pragma: no cover - a build without a C compiler
    _pairs = _PairsInPython


_log = logging.getLogger("wbcache.lmdb")
_FORK_WAIT = 5.0  # s a fork waits for this process's open transactions to end
# LMDB's reader table, shared by every process of the machine (each takes READ_SLOTS at most).
# LMDB sizes the lock file when a process opens the environment alone: one an older wbcache
# made keeps LMDB's default, 126, until then.
MAX_READERS = 1024
# In a child: the databases whose inherited copy could not be closed (`_disown_after_fork`)
_left_open_at_fork: set[str] = set()
SHARED_READ_TTL = 0.05  # s; see SharedLmdbBackend


class LmdbDatabase:
    """The LMDB environment at `path` (a directory, created 0700), starting with a
    `map_size`-byte map. `lock=False` (readonly only) reads without LMDB's lock file, so
    reading changes no byte on disk; safe only while no process writes the database.
    `others_create`: other processes may be making the database right now (a shared
    directory's: `check_data_file`)."""

    def __init__(self, path: str, *, map_size: int = 1 << 30, readonly: bool = False,
                 lock: bool = True, others_create: bool = False) -> None:
        if not readonly:
            if not lock:
                raise ValueError("LmdbDatabase: lock=False is only safe with readonly=True")
            os.makedirs(path, mode=0o700, exist_ok=True)
        # LMDB opens its files by path, following links and blocking on a FIFO: a planted
        # data.mdb or lock.mdb is refused first, and so is a data.mdb shorter than the
        # database its meta pages describe. Every open of the environment (the cache's, a
        # shared directory's, the CLI's read-only views) comes through here.
        check_library_files(path, {DATA_FILE: not readonly, LMDB_LOCK_FILE: lock})
        check_data_file(path, others_create=others_create)
        self.path = path
        self._readonly = readonly
        with lmdb_errors(path, "open"):
            self._env = _open_environment(path, map_size=map_size, readonly=readonly,
                                          lock=lock)
        try:
            with lmdb_errors(path, "open"):
                if not readonly:
                    self._env.reader_check()
                    # LMDB creates data.mdb and lock.mdb itself: make their directory entries
                    # durable before anything (a log deletion) depends on the database.
                    SYSCALLS.fsync_dir(path)
                while True:  # no transaction handed out yet: a grown map is adopted at once
                    try:
                        self._str = self._env.open_db(b"str", create=not readonly)
                        self._bytes = self._env.open_db(b"bytes", create=not readonly)
                        self._meta = self._env.open_db(b"meta", create=not readonly)
                        break
                    except lmdb.MapResizedError:
                        self._env.set_mapsize(0)
        except BaseException:
            self._env.close()  # LMDB allows one open per process: the next one must work
            raise
        self._gate = ReadGate()
        self.resizes = 0  # the map grown here
        self._pid = os.getpid()
        self._quiet_for_fork = False
        # a pipe from _before_fork to the child's close, for the fork in progress only
        self._closed_in_child: tuple[int, int] | None = None
        forking.track(self)

    @property
    def env(self) -> Any:
        return self._env

    @property
    def max_key_size(self) -> int:
        return int(self._env.max_key_size())

    def _db_and_raw(self, key: Key) -> tuple[Any, bytes]:
        if isinstance(key, str):
            return self._str, key.encode()
        return self._bytes, key

    @contextmanager
    def _begin(self, *, write: bool = False, db: Any = None) -> Iterator[Any]:
        """A transaction registered with `_gate` (module docstring): a read-only one is ended
        on leaving, a write one is the caller's to commit or abort (`_gate.abort`). When
        another process has grown the map past this environment's, LMDB refuses to begin
        one (MapResizedError) until the new size is adopted, with no transaction of this
        process open: then it is begun again. A thread that holds one itself (inside a scan)
        would wait for itself: it gets the MapResizedError (a flush retries later).

        py-lmdb (3.0) frees an ended read-only transaction's reader slot only once the object
        is deallocated, and on Python 3.10 a scan closed part-way leaves these frames in a
        reference cycle until a collection: so no frame keeps the transaction (`del txn`).

        Every other LMDB error, in the transaction or in beginning it, leaves as a
        `DatabaseError` (`lmdb_errors`): every read and write of the database is in one."""
        with lmdb_errors(self.path, "write" if write else "read"):
            while True:
                with self._gate.reading(slot=not write):
                    try:
                        txn = self._env.begin(write=write, db=db)
                    except lmdb.MapResizedError:
                        if self._gate.nested():
                            raise
                        txn = None
                    if txn is not None:
                        try:
                            if write:
                                yield txn
                            else:
                                with txn:
                                    yield txn
                        finally:
                            del txn
                        return
                with self._gate.resizing():
                    self._env.set_mapsize(0)  # LMDB's "adopt the size the data file has now"

    def get(self, key: Key) -> bytes | None:
        db, raw = self._db_and_raw(key)
        with self._begin(db=db) as txn:
            return txn.get(raw)  # type: ignore[no-any-return]

    def checkpoint(self, name: bytes, *, fresh: bool = False) -> int:
        """The checkpoint `name`. With `fresh`, read in a write transaction (then aborted):
        an LMDB reader takes the snapshot the lock file names, and a writer SIGKILLed after
        its meta page was written but before the lock file was updated leaves every reader
        of every process one commit behind until the next write transaction repairs it. A
        replay that started from such a stale checkpoint would add the killed writer's
        increments a second time (the shared-directory torture saw exactly that)."""
        write = fresh and not self._readonly
        with self._begin(write=write, db=self._meta) as txn:
            try:
                raw = txn.get(name)
            finally:  # nothing to keep: a write transaction is aborted, a read one ended
                if write:
                    self._gate.abort(txn)
        return _lsn(raw)

    def checkpoints(self, prefix: bytes) -> dict[str, int]:
        """Every checkpoint whose name starts with `prefix`, by the rest of its name."""
        with self._begin(db=self._meta) as txn:
            return {bytes(name[len(prefix):]).decode(): _lsn(raw)
                    for name, raw in txn.cursor() if bytes(name).startswith(prefix)}

    def count(self) -> int:
        with self._begin() as txn:
            return int(txn.stat(self._str)["entries"] + txn.stat(self._bytes)["entries"])

    def items(self) -> Iterator[tuple[Key, bytes]]:
        with self._begin() as txn:
            try:
                for key, value in txn.cursor(db=self._str):
                    yield key.decode(), value
                yield from txn.cursor(db=self._bytes)
            finally:
                del txn  # its reader slot: `_begin`

    def write(self, puts: Collection[tuple[Key, bytes]], deletes: Sequence[Key],
              increments: Sequence[tuple[Key, int]], checkpoint_name: bytes,
              checkpoint: int, *, once: bool = False) -> None:
        """One write transaction: puts, deletes, increments added to what is stored (a
        missing or non-int value counts from 0; the sum held to the int64 range), and the
        checkpoint. The map grows and the transaction is retried if it does not fit. `once`:
        nothing is written if the checkpoint stored is `checkpoint` (this write, sent again,
        committed before: `Backend.apply`)."""
        if iter(puts) is puts:  # walked once per key type, and again after a MapFullError
            puts = list(puts)
        stamp = checkpoint.to_bytes(8, "big")
        while True:
            try:
                with self._begin(write=True) as txn:
                    try:
                        if once and _lsn(txn.get(checkpoint_name, db=self._meta)) == checkpoint:
                            self._gate.abort(txn)
                            return
                        str_pairs = _pairs(puts, True)  # built as putmulti takes them
                        txn.cursor(db=self._str).putmulti(str_pairs)
                        if str_pairs.other:
                            txn.cursor(db=self._bytes).putmulti(_pairs(puts, False))
                        for key in deletes:
                            db, raw = self._db_and_raw(key)
                            txn.delete(raw, db=db)
                        for key, delta in increments:
                            db, raw = self._db_and_raw(key)
                            txn.put(raw, msgpack.packb(added(txn.get(raw, db=db), delta)),
                                    db=db)
                        txn.put(checkpoint_name, stamp, db=self._meta)
                        txn.commit()
                    except BaseException:
                        self._gate.abort(txn)  # after a failed commit too: then a no-op
                        raise
                return
            except lmdb.MapFullError:  # let through by `_begin` (`lmdb_errors`)
                with lmdb_errors(self.path, "grow"), self._gate.resizing():
                    self._env.set_mapsize(self._env.info()["map_size"] * 2)
                    self.resizes += 1

    def close(self) -> None:
        forking.untrack(self)
        self._env.close()

    def _before_fork(self) -> None:
        self._closed_in_child = None
        self._quiet_for_fork = self._gate.acquire_exclusive(_FORK_WAIT)
        if self._quiet_for_fork:
            try:
                self._closed_in_child = os.pipe()
            except OSError:  # no descriptor left: the child will leave its copy alone
                self._closed_in_child = None

    def _after_fork_in_parent(self) -> None:
        """Resume only once the child has closed its copy (or died, or _FORK_WAIT passed):
        LMDB's close clears the reader-table slots (shared memory) recorded under the pid
        that opened the environment -- ours -- so a read we began meanwhile would lose its
        slot, and a writer could reuse the pages it reads."""
        quiet, self._quiet_for_fork = self._quiet_for_fork, False
        pipe, self._closed_in_child = self._closed_in_child, None
        if not quiet:
            return
        try:
            if pipe is not None:
                read_end, write_end = pipe
                try:
                    os.close(write_end)
                    poller = select.poll()  # not select(): descriptors above 1023 happen
                    poller.register(read_end, select.POLLIN)
                    if not poller.poll(_FORK_WAIT * 1000):  # a byte, or EOF if it died
                        _log.warning("a child forked from pid %d did not close its copy of "
                                     "%s within %.0f s; reads go on", os.getpid(), self.path,
                                     _FORK_WAIT)
                finally:
                    os.close(read_end)
        finally:
            self._gate.release_exclusive()

    def _disown_after_fork(self) -> None:
        """In a child: close this copy of the environment if no transaction was open at the
        fork and the parent waits for it (then closing touches only the child's own mappings
        and descriptors, and the child may open the database again), then tell the parent
        it may read again; otherwise leave it alone for good."""
        pipe, self._closed_in_child = self._closed_in_child, None
        try:
            if self._quiet_for_fork and pipe is not None:
                read_end, write_end = pipe
                os.close(read_end)
                try:
                    self._env.close()
                finally:
                    try:
                        os.write(write_end, b"c")
                    except OSError:  # the parent stopped waiting (and closed its end)
                        pass
                    os.close(write_end)
            else:  # open for good here: an open of the same database says why (`__init__`)
                _left_open_at_fork.add(os.path.realpath(self.path))
        finally:
            self._disown()

    def _disown(self) -> None:
        if _shared.get(self.path, (None,))[0] is self:  # the child starts with none shared
            del _shared[self.path]
        forking.disown(self, _ForkedLmdbDatabase, "LmdbDatabase", self.path, self._pid)


def _lsn(stored: bytes | None) -> int:
    """A checkpoint as stored (8 bytes, big-endian); 0 if there is none."""
    return int.from_bytes(stored, "big") if stored else 0


def _open_environment(path: str, *, map_size: int, readonly: bool, lock: bool) -> Any:
    """`lmdb.open` of the environment at `path`, as `LmdbDatabase` opens it; a second open in
    this process is a `DatabaseError` saying why (other LMDB errors: `lmdb_errors`).

    The open reads the map size from data.mdb and begins a transaction: MapResizedError there
    means another process grew the map in between (opened again, a few times), or a meta page
    claiming more pages than its map holds, which is damage (`DatabaseError`)."""
    for _ in range(_OPEN_TRIES):
        try:
            # the path's bytes: py-lmdb encodes a str as strict UTF-8, which a name that
            # is not UTF-8 (Latin-1, as os.fsdecode gives it) fails (an attacker's hunt)
            return lmdb.open(os.fsencode(path), map_size=map_size, subdir=True, max_dbs=3,
                             sync=True, metasync=True, readonly=readonly, mode=0o600,
                             lock=lock, create=not readonly, max_readers=MAX_READERS)
        except lmdb.MapResizedError as exc:
            resized = exc
        except lmdb.Error as exc:
            _refuse_second_open(path, exc)
            raise
    raise DatabaseError(f"cannot open the LMDB database {os.path.join(path, DATA_FILE)}: its "
                        f"meta page describes more than its map size ({resized}); the file is "
                        f"damaged") from resized


_OPEN_TRIES = 5  # opens met by another process's growth of the map before it counts as damage


def _refuse_second_open(path: str, exc: Exception) -> None:
    """Raise `DatabaseError` if `exc` is LMDB refusing a second open in this process."""
    if "already open in this process" not in str(exc):
        return
    if os.path.realpath(path) in _left_open_at_fork:
        raise DatabaseError(
            f"this process was forked while its parent had a transaction on the "
            f"database {path} open (for over {_FORK_WAIT:.0f} s: a long scan or "
            f"flush), so the copy it inherited could not be closed safely, and LMDB "
            f"allows one open per process: open the directory in a process forked "
            f"when no such transaction was open, or a fresh one (spawn)") from None
    raise DatabaseError(
        f"the database {path} is already open in this process (LMDB allows one open "
        f"per process): close the cache that holds it first") from None


@contextmanager
def lmdb_errors(path: str, doing: str) -> Iterator[None]:
    """LMDB's errors inside, while `doing` ("open", "read", "write", "grow") the database in
    the directory `path`, as wbcache's, so that no caller names a backend's errors: a
    permission problem as `PermissionError` naming the directory, anything else (a damaged
    page: MDB_CORRUPTED, MDB_PAGE_NOTFOUND; an I/O error; a full reader table) as
    `DatabaseError` naming data.mdb and saying what LMDB said, raised from LMDB's error.
    The flusher retries a failed flush whatever it raised, the log keeping every write.

    MapFullError and MapResizedError go through untouched: they are this module's to handle
    (`LmdbDatabase.write` grows the map, `_begin` adopts another process's size)."""
    try:
        yield
    except (lmdb.MapFullError, lmdb.MapResizedError):
        raise
    except lmdb.Error as exc:
        text = str(exc)
        if isinstance(exc, lmdb.ReadonlyError) or "Permission denied" in text:
            raise PermissionError(errno.EACCES, "Permission denied", path) from exc
        raise DatabaseError(f"cannot {doing} the LMDB database {os.path.join(path, DATA_FILE)}:"
                            f" {text}") from exc


class _ForkedLmdbDatabase(LmdbDatabase, forking.Disowned):
    """An `LmdbDatabase` inherited through fork(): every use raises `ForkedCacheError`."""


class LmdbBackend:
    """The database of one cache directory: LMDB at `path`, this cache its only writer."""

    kind = "lmdb"  # recorded in DIR/backend
    # One owner: the cache's own result of an increment is the value to store.
    applies_increments = False
    default_read_ttl: float | None = None  # only its own cache writes it: never stale

    def __init__(self, path: str, *, map_size: int = 1 << 30, readonly: bool = False,
                 lock: bool = True) -> None:
        """See `LmdbDatabase` for `readonly` and `lock`."""
        self._database = LmdbDatabase(path, map_size=map_size, readonly=readonly, lock=lock)

    @property
    def database(self) -> LmdbDatabase:
        return self._database

    @property
    def max_key_size(self) -> int:
        return self._database.max_key_size

    @property
    def resizes(self) -> int:
        return self._database.resizes

    def attach(self, cache_id: str, tokens: CheckpointTokens | None = None) -> None:
        """One cache per database: nothing to attach."""

    def get(self, key: Key) -> bytes | None:
        return self._database.get(key)

    def checkpoint(self) -> int:
        return self._database.checkpoint(_CHECKPOINT)

    def count(self) -> int:
        return self._database.count()

    def items(self) -> Iterator[tuple[Key, bytes]]:
        return self._database.items()

    def apply(self, puts: Collection[tuple[Key, bytes]], deletes: Sequence[Key],
              checkpoint: int, increments: Sequence[tuple[Key, int]] = ()) -> None:
        if increments:
            raise ValueError("LmdbBackend takes increments as puts of their results")
        self._database.write(puts, deletes, (), _CHECKPOINT, checkpoint)

    def close(self) -> None:
        self._database.close()


# ------------------------------------------------------------------ shared directories

_shared: dict[str, tuple[LmdbDatabase, int]] = {}  # realpath -> (database, lanes using it)
_shared_lock = threading.Lock()


def _new_shared_lock_in_child() -> None:
    """A fork may land while another thread holds `_shared_lock` (opening or closing a shared
    cache, an adoption): the child's copy would stay held, and its `reopen` wait for good.
    The child's databases are disowned, and their entries dropped, as the fork hook runs."""
    global _shared_lock
    _shared_lock = threading.Lock()


os.register_at_fork(after_in_child=_new_shared_lock_in_child)
LANE_CHECKPOINT_PREFIX = b"checkpoint/"


def shared_database(path: str, *, map_size: int) -> LmdbDatabase:
    """The process's one `LmdbDatabase` at `path`, opened on first use; `release_shared`
    once per call."""
    real = os.path.realpath(path)
    with _shared_lock:
        database, users = _shared.get(real, (None, 0))
        if database is None:
            database = LmdbDatabase(path, map_size=map_size, others_create=True)
            database.path = real
        _shared[real] = (database, users + 1)
        return database


def release_shared(database: LmdbDatabase) -> None:
    """Closed with the last user, under `_shared_lock`: an open racing it would otherwise
    find no entry and open the environment a second time, which LMDB refuses."""
    with _shared_lock:
        found, users = _shared.get(database.path, (None, 0))
        if found is not database:
            return
        if users > 1:
            _shared[database.path] = (database, users - 1)
            return
        database.close()  # then forgotten: a release run again after an interrupt finds it
        del _shared[database.path]


class SharedLmdbBackend:
    """One lane's view of the LMDB database of a shared directory: every process of the
    machine flushes into it; this lane's checkpoint is its own (`attach`), its increments are
    deltas added in the database.

    Reads: another process's write becomes visible here once it has flushed and a clean entry
    of this cache is older than `read_ttl`, default `SHARED_READ_TTL` (0.05 s): an LMDB read
    costs microseconds, so a short TTL keeps other processes' writes visible within
    `flush_interval` + 0.05 s at a small price per read."""

    kind = "lmdb"
    applies_increments = True
    default_read_ttl: float | None = SHARED_READ_TTL

    def __init__(self, path: str, *, map_size: int = 1 << 30) -> None:
        self._database = shared_database(path, map_size=map_size)
        self._name: bytes | None = None
        self._closed = False

    @property
    def database(self) -> LmdbDatabase:
        return self._database

    @property
    def max_key_size(self) -> int:
        return self._database.max_key_size

    @property
    def resizes(self) -> int:
        return self._database.resizes

    def attach(self, cache_id: str, tokens: CheckpointTokens | None = None) -> None:
        """A lane's checkpoint; copies of a shared directory share no database (`tokens`
        are not needed)."""
        self._name = LANE_CHECKPOINT_PREFIX + cache_id.encode()

    def _checkpoint_name(self) -> bytes:
        if self._name is None:
            raise ValueError("this SharedLmdbBackend has no lane yet: attach(cache_id) first")
        return self._name

    def get(self, key: Key) -> bytes | None:
        return self._database.get(key)

    def checkpoint(self) -> int:
        # fresh: recovery and adoption replay from it, and increments are deltas here
        return self._database.checkpoint(self._checkpoint_name(), fresh=True)

    def count(self) -> int:
        return self._database.count()

    def items(self) -> Iterator[tuple[Key, bytes]]:
        return self._database.items()

    def apply(self, puts: Collection[tuple[Key, bytes]], deletes: Sequence[Key],
              checkpoint: int, increments: Sequence[tuple[Key, int]] = ()) -> None:
        """Adds nothing if this lane's checkpoint is `checkpoint` already (`Backend.apply`):
        the lane is this cache's alone while it is open."""
        self._database.write(puts, deletes, increments, self._checkpoint_name(), checkpoint,
                             once=True)

    def close(self) -> None:
        if not self._closed:
            release_shared(self._database)
            self._closed = True  # once released: a close run again after an interrupt ends it
