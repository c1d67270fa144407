"""Write-through peers: each acknowledges a write after its own commit, one commit per write.

  LMDB      one synced write transaction per put (sync and metasync on), one environment
            shared by the threads (LMDB allows one per process); writers queue on its mutex
  SQLite    WAL mode, synchronous=FULL, autocommit: one commit (one WAL fsync) per INSERT;
            one connection per thread, busy_timeout 60 s
  diskcache diskcache.Cache.set with its defaults: SQLite WAL with synchronous=NORMAL, which
            does NOT fsync per commit (a crash of the machine can lose recent sets)

Every client thread writes its own share of the key pool, encoding the value with msgpack
inside the timed call, as an application would.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lmdb
import msgpack

from bench.config import BenchConfig
from bench.harness import Op, run_threads
from bench.measurement import Measurement, Sample
from bench.workload import Scratch, Workload

SECTION = "peers"

# A store opens in a directory, for N client threads, and yields a factory of per-thread
# put(key, value) functions.
PutFactory = Callable[[int], Callable[[str, Any], None]]
Store = Callable[[Path, int], Any]


def measurements(config: BenchConfig, workload: Workload, scratch: Scratch) -> list[Measurement]:
    rows: list[Measurement] = []
    stores: list[tuple[str, str, Store, str, str]] = [
        ("lmdb", "LMDB, 1 synced txn per write", lmdb_store, "LMDB 1 synced txn/write", ""),
        ("sqlite", "SQLite WAL synchronous=FULL, 1 commit per write", sqlite_store,
         "SQLite WAL FULL 1 commit/write", ""),
    ]
    try:
        import diskcache  # noqa: F401
        stores.append(("diskcache", "diskcache.Cache.set (defaults)", diskcache_store,
                       "diskcache.set (not fsync'd)",
                       "sqlite synchronous=NORMAL: not fsync'd per write"))
        diskcache_missing = False
    except ImportError:
        diskcache_missing = True
    for name, label, store, series, note in stores:
        for clients in config.peer_clients:
            rows.append(Measurement(
                f"{name}_c{clients}", SECTION, f"{label}, {_clients(clients)}",
                _trial(config, workload, scratch, name, store, clients),
                baseline="raw_fsync", series=series, concurrency=clients, note=note))
    if diskcache_missing:
        rows.append(Measurement("diskcache_c1", SECTION, "diskcache.Cache.set", None,
                                unavailable="not installed"))
    return rows


def _clients(count: int) -> str:
    return f"{count} thread" + ("" if count == 1 else "s")


def _trial(config: BenchConfig, workload: Workload, scratch: Scratch, name: str, store: Store,
           clients: int) -> Callable[[], Sample]:
    def trial() -> Sample:
        with scratch.directory(f"{name}-{clients}") as path, store(path, clients) as put_for:
            ops: list[Op] = []
            for worker in range(clients):
                keys, values = workload.slice_for(worker, clients)
                ops.append(cycling_op(put_for(worker), keys, values))
            return run_threads(ops, config.trial_seconds, config.warmup_seconds)
    return trial


def cycling_op(put: Callable[[Any, Any], object], keys: list[Any], values: list[Any]) -> Op:
    """A zero-argument op calling put(key, value) on the next pair, cycling."""
    pairs = list(zip(keys, values, strict=True))
    index = [0]
    size = len(pairs)

    def op() -> None:
        i = index[0]
        index[0] = i + 1 if i + 1 < size else 0
        k, v = pairs[i]
        put(k, v)
    return op


@contextmanager
def lmdb_store(path: Path, clients: int) -> Iterator[PutFactory]:
    env = lmdb.open(str(path), map_size=1 << 30, sync=True, metasync=True,
                    max_spare_txns=clients)
    packb = msgpack.packb

    def put_for(worker: int) -> Callable[[str, Any], None]:
        def put(key: str, value: Any) -> None:
            with env.begin(write=True) as txn:
                txn.put(key.encode(), packb(value))
        return put
    try:
        yield put_for
    finally:
        env.close()


@contextmanager
def sqlite_store(path: Path, clients: int) -> Iterator[PutFactory]:
    db = str(path / "kv.sqlite")
    connections: list[sqlite3.Connection] = []

    def connect() -> sqlite3.Connection:
        con = sqlite3.connect(db, timeout=60, isolation_level=None, check_same_thread=False)
        con.execute("PRAGMA journal_mode=WAL")
        con.execute("PRAGMA synchronous=FULL")
        connections.append(con)
        return con

    connect().execute("CREATE TABLE IF NOT EXISTS kv (k TEXT PRIMARY KEY, v BLOB) WITHOUT ROWID")
    packb = msgpack.packb

    def put_for(worker: int) -> Callable[[str, Any], None]:
        execute = connect().execute

        def put(key: str, value: Any) -> None:
            execute("INSERT OR REPLACE INTO kv (k, v) VALUES (?, ?)", (key, packb(value)))
        return put
    try:
        yield put_for
    finally:
        for con in connections:
            con.close()


@contextmanager
def diskcache_store(path: Path, clients: int) -> Iterator[PutFactory]:
    import diskcache

    cache = diskcache.Cache(str(path))
    packb = msgpack.packb

    def put_for(worker: int) -> Callable[[str, Any], None]:
        def put(key: str, value: Any) -> None:
            cache.set(key, packb(value))
        return put
    try:
        yield put_for
    finally:
        cache.close()
