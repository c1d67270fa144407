"""A database shared by many caches: increments as deltas, per-directory checkpoints, read_ttl.

`SharedMemoryBackend` is a small in-process database with the semantics a shared server
(PostgreSQL) has: one checkpoint per attached cache directory, and increments added to what is
stored. It lets these tests pin the cache's side of the contract without a server. About
560 lines: the reads' races against other caches' writes (read_ttl, the order of answers)
share its backend views.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import msgpack
import pytest

import wbcache
from wbcache import FlushError
from wbcache.backends.base import CheckpointTokens, Key
from wbcache.memory import Entries
from wbcache.recovery import replay_into
from wbcache.wal.format import (
    encode_frame,
    encode_header,
    encode_records,
)
from wbcache.wal.records import OP_BATCH, OP_INCR, OP_PUT
from wbcache.wal.segments import segment_name


class SharedMemoryBackend:
    applies_increments = True
    default_read_ttl = 1.0
    max_key_size = 511

    def __init__(self) -> None:
        self.values: dict[Key, bytes] = {}
        self.checkpoints: dict[str, int] = {}
        self.calls: list[tuple[list[Any], list[Any], int, list[Any]]] = []
        self.fail = False
        self._lock = threading.Lock()

    def view(self) -> BackendView:
        return BackendView(self)

    def get(self, key: Key) -> bytes | None:
        return self.values.get(key)

    def count(self) -> int:
        return len(self.values)

    def items(self) -> Iterator[tuple[Key, bytes]]:
        return iter(list(self.values.items()))


class BackendView:
    """What one cache directory sees: the shared data, its own checkpoint."""

    kind = "shared-memory"
    applies_increments = True
    default_read_ttl = 1.0
    max_key_size = 511

    def __init__(self, shared: SharedMemoryBackend) -> None:
        self.shared = shared
        self.cache_id: str | None = None

    def attach(self, cache_id: str, tokens: CheckpointTokens | None = None) -> None:
        self.cache_id = cache_id

    def checkpoint(self) -> int:
        assert self.cache_id is not None
        return self.shared.checkpoints.get(self.cache_id, 0)

    def apply(self, puts: Sequence[tuple[Key, bytes]], deletes: Sequence[Key], checkpoint: int,
              increments: Sequence[tuple[Key, int]] = ()) -> None:
        shared = self.shared
        if shared.fail:
            raise ConnectionError("database away (test)")
        with shared._lock:  # one transaction
            shared.calls.append((list(puts), list(deletes), checkpoint, list(increments)))
            for key, value in puts:
                shared.values[key] = value
            for key in deletes:
                shared.values.pop(key, None)
            for key, delta in increments:
                current = shared.values.get(key)
                base = msgpack.unpackb(current) if current is not None else 0
                shared.values[key] = msgpack.packb((base if type(base) is int else 0) + delta)
            assert self.cache_id is not None
            shared.checkpoints[self.cache_id] = checkpoint

    def get(self, key: Key) -> bytes | None:
        return self.shared.get(key)

    def count(self) -> int:
        return self.shared.count()

    def items(self) -> Iterator[tuple[Key, bytes]]:
        return self.shared.items()

    def close(self) -> None:
        pass


def stored(shared: SharedMemoryBackend, key: Key) -> Any:
    value = shared.values.get(key)
    return None if value is None else msgpack.unpackb(value)


@pytest.fixture
def shared() -> SharedMemoryBackend:
    return SharedMemoryBackend()


def test_increments_reach_the_database_as_one_delta(tmp_path: Path,
                                                    shared: SharedMemoryBackend) -> None:
    with wbcache.open(tmp_path / "a", backend=shared.view(), flush_interval=3600) as cache:
        for _ in range(3):
            cache.incr("n", 2)
        cache.flush()
    puts, deletes, _, increments = shared.calls[-1]
    assert increments == [("n", 6)] and puts == [] and deletes == []


@pytest.mark.parametrize("ops, expect_put, expect_delta, expect_delete", [
    ([("put", 10), ("incr", 1)], 11, None, False),   # a put, then increments: the value
    ([("incr", 1), ("put", 10)], 10, None, False),
    ([("incr", 1), ("delete", None)], None, None, True),
    ([("delete", None), ("incr", 5)], 5, None, False),
    ([("incr", 1), ("incr", -3)], None, -2, False),
])
def test_a_key_is_a_delta_only_if_it_saw_nothing_but_increments(
        tmp_path: Path, shared: SharedMemoryBackend, ops: list[tuple[str, Any]],
        expect_put: int | None, expect_delta: int | None, expect_delete: bool) -> None:
    with wbcache.open(tmp_path / "a", backend=shared.view(), flush_interval=3600) as cache:
        for op, arg in ops:
            if op == "put":
                cache.put("k", arg)
            elif op == "incr":
                cache.incr("k", arg)
            else:
                cache.delete("k")
        cache.flush()
    puts, deletes, _, increments = shared.calls[-1]
    assert puts == ([("k", msgpack.packb(expect_put))] if expect_put is not None else [])
    assert increments == ([("k", expect_delta)] if expect_delta is not None else [])
    assert deletes == (["k"] if expect_delete else [])


def test_increments_inside_a_batch_are_deltas_too(tmp_path: Path,
                                                  shared: SharedMemoryBackend) -> None:
    with wbcache.open(tmp_path / "a", backend=shared.view(), flush_interval=3600) as cache:
        with cache.batch() as batch:
            batch.incr("n", 4)
            batch.incr("n", 1)
            batch.put("p", 1)
            batch.incr("p", 1)
        cache.flush()
    puts, _, _, increments = shared.calls[-1]
    assert increments == [("n", 5)]
    assert puts == [("p", msgpack.packb(2))]


def test_two_directories_counting_into_one_database_add_up(tmp_path: Path,
                                                           shared: SharedMemoryBackend) -> None:
    first = wbcache.open(tmp_path / "a", backend=shared.view(), flush_interval=3600)
    second = wbcache.open(tmp_path / "b", backend=shared.view(), flush_interval=3600)
    try:
        assert first.cache_id != second.cache_id
        for _ in range(7):
            first.incr("hits")
        for _ in range(5):
            second.incr("hits")
        first.flush()
        second.flush()
        assert stored(shared, "hits") == 12
        assert shared.checkpoints == {first.cache_id: 7, second.cache_id: 5}
    finally:
        first.close()
        second.close()


def test_a_failed_flush_retried_later_still_sends_one_exact_delta(
        tmp_path: Path, shared: SharedMemoryBackend) -> None:
    with wbcache.open(tmp_path / "a", backend=shared.view(), flush_interval=3600) as cache:
        cache.incr("n", 3)
        shared.fail = True
        with pytest.raises(FlushError):
            cache.flush(timeout=0.05)
        cache.incr("n", 4)  # after the failed batch was taken: sent after it, on its own
        cache.put("p", 1)
        cache.incr("p")
        shared.fail = False
        cache.flush()
    assert stored(shared, "n") == 7
    assert [call[3] for call in shared.calls[-2:]] == [[("n", 3)], [("n", 4)]]
    assert stored(shared, "p") == 2


def test_recovery_replays_increments_as_deltas_exactly_once(tmp_path: Path,
                                                            shared: SharedMemoryBackend) -> None:
    shared.values["n"] = msgpack.packb(100)  # counted by other caches
    view = shared.view()
    view.attach("dir-a")
    wal = tmp_path / "wal"
    wal.mkdir()
    records = [[1, OP_INCR, "n", 2, 2], [2, OP_INCR, "n", 3, 5], [3, OP_PUT, "p", msgpack.packb(1)],
               [4, OP_BATCH, [[OP_INCR, "p", 1, 2], [OP_INCR, "m", 9, 9]]]]
    (wal / segment_name(1)).write_bytes(
        encode_header() + b"".join(encode_frame(encode_records([msgpack.packb(r)]))
                                   for r in records))
    report = replay_into(view, str(wal))
    assert report.replayed == 4
    assert stored(shared, "n") == 105 and stored(shared, "m") == 9 and stored(shared, "p") == 2
    assert shared.checkpoints["dir-a"] == 4
    (wal / segment_name(1)).write_bytes(  # the same log again: the checkpoint covers it
        encode_header() + b"".join(encode_frame(encode_records([msgpack.packb(r)]))
                                   for r in records))
    assert replay_into(view, str(wal)).replayed == 0
    assert stored(shared, "n") == 105


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


def test_clean_entries_are_read_again_after_read_ttl(tmp_path: Path, shared: SharedMemoryBackend,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    clock = FakeClock()
    monkeypatch.setattr("wbcache.memory.time", clock)
    writer = wbcache.open(tmp_path / "a", backend=shared.view(), flush_interval=3600)
    reader = wbcache.open(tmp_path / "b", backend=shared.view(), flush_interval=3600,
                          read_ttl=5.0)
    try:
        writer.put("k", "first")
        writer.flush()
        assert reader.get("k") == "first"
        writer.put("k", "second")
        writer.flush()
        clock.now += 4.0
        assert reader.get("k") == "first"  # within read_ttl: served from memory
        assert "k" in reader
        clock.now += 2.0
        assert reader.get("k") == "second"  # expired: read again
        reader.put("k", "mine")
        clock.now += 100.0
        assert reader["k"] == "mine"  # dirty entries never expire
    finally:
        writer.close()
        reader.close()


class HoldsOneThread:
    """A backend view whose reads from the thread named "slow" wait, holding their answer,
    until `release` is set (`holding` says one does)."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.holding = threading.Event()
        self.release = threading.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def get(self, key: Key) -> bytes | None:
        value: bytes | None = self._inner.get(key)
        if threading.current_thread().name == "slow":
            self.holding.set()
            assert self.release.wait(10)
        return value


def test_a_slow_read_never_brings_back_what_a_later_read_replaced(
        tmp_path: Path, shared: SharedMemoryBackend, monkeypatch: pytest.MonkeyPatch) -> None:
    """A read that began before another cache's write ends after a later read brought the new
    value in and that entry expired. Kept as if read at its end, the old answer was served for
    a whole read_ttl more; it is as old as the read's start."""
    clock = FakeClock()
    monkeypatch.setattr("wbcache.memory.time", clock)
    view = HoldsOneThread(shared.view())
    writer = wbcache.open(tmp_path / "a", backend=shared.view(), flush_interval=3600)
    reader = wbcache.open(tmp_path / "b", backend=view, flush_interval=3600, read_ttl=5.0)
    slow: list[Any] = []
    thread = threading.Thread(target=lambda: slow.append(reader.get("k")), name="slow")
    try:
        writer.put("k", "first")
        writer.flush()
        thread.start()
        assert view.holding.wait(10)  # its answer: "first"
        clock.now += 1.0
        writer.put("k", "second")
        writer.flush()
        assert reader.get("k") == "second"  # a later read, kept
        clock.now += 5.5  # that entry expires
        view.release.set()
        thread.join(10)
        assert slow == ["first"]  # a right answer for a read that began before "second"
        assert reader.get("k") == "second"
    finally:
        view.release.set()
        thread.join(10)
        writer.close()
        reader.close()


class GatedReads:
    """A backend view whose reads from the threads named in `names` wait before they ask the
    database until `ask[name]` is set (`waiting[name]` says one does), and with their answer
    until `answer[name]` is set (`holding[name]`)."""

    def __init__(self, inner: Any, names: Sequence[str]) -> None:
        self._inner = inner
        self.waiting = {name: threading.Event() for name in names}
        self.ask = {name: threading.Event() for name in names}
        self.holding = {name: threading.Event() for name in names}
        self.answer = {name: threading.Event() for name in names}

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def get(self, key: Key) -> bytes | None:
        name = threading.current_thread().name
        if name in self.ask:
            self.waiting[name].set()
            assert self.ask[name].wait(10)
        value: bytes | None = self._inner.get(key)
        if name in self.answer:
            self.holding[name].set()
            assert self.answer[name].wait(10)
        return value

    def release_all(self) -> None:
        for event in (*self.ask.values(), *self.answer.values()):
            event.set()


def test_an_older_answer_never_replaces_a_newer_one_a_reader_was_shown(
        tmp_path: Path, shared: SharedMemoryBackend, monkeypatch: pytest.MonkeyPatch) -> None:
    """Reads were ordered by when they were registered, not by when they asked the database:
    a read registered first but asking last (waiting for a connection) brought in 6 and
    showed it; one registered later, which had asked before the write and held its answer
    5, then put 5 over 6 in memory once that entry expired, and readers were shown 5 after
    6 (an outside hunt, two caches on PostgreSQL and on a shared LMDB directory)."""
    clock = FakeClock()
    monkeypatch.setattr("wbcache.memory.time", clock)
    view = GatedReads(shared.view(), ["late", "early"])
    view.answer["late"].set()  # "late" waits only to ask, "early" only with its answer
    view.ask["early"].set()
    writer = wbcache.open(tmp_path / "a", backend=shared.view(), flush_interval=3600)
    reader = wbcache.open(tmp_path / "b", backend=view, flush_interval=3600, read_ttl=1.0)
    shown: dict[str, Any] = {}
    late = threading.Thread(target=lambda: shown.update(late=reader.get("k")), name="late")
    early = threading.Thread(target=lambda: shown.update(early=reader.get("k")), name="early")
    try:
        writer.put("k", 5)
        writer.flush()
        late.start()
        assert view.waiting["late"].wait(10)  # registered, not yet asked
        clock.now += 0.5
        early.start()
        assert view.holding["early"].wait(10)  # registered later, asked first: 5
        writer.put("k", 6)
        writer.flush()
        view.ask["late"].set()
        late.join(10)
        assert shown == {"late": 6}  # kept in memory, as old as its registration
        clock.now += 0.55  # that entry expires; the held answer would be young enough
        view.answer["early"].set()
        early.join(10)
        assert shown == {"late": 6, "early": 5}  # a right answer for a read that overlapped
        assert reader.get("k") == 6  # never 5 again
    finally:
        view.release_all()
        late.join(10)
        early.join(10)
        writer.close()
        reader.close()


@pytest.mark.parametrize("last", ["get", "incr"])
def test_an_older_answer_shown_last_does_not_make_another_as_old_look_newest(
        tmp_path: Path, shared: SharedMemoryBackend, monkeypatch: pytest.MonkeyPatch,
        last: str) -> None:
    """Three reads: r2 registered first but asked last (6, shown, kept); r3 and r1 asked
    before the write (5). r3, stale, was shown 5 after 6, and its answer, the last shown,
    made r1's 5 look like the newest answer: r1 was kept, fresh, and served 5 after 6 had
    been shown, or an incr built on 5 returned 6 (a review). Two answers shown since a read
    asked that differ make it stale."""
    clock = FakeClock()
    monkeypatch.setattr("wbcache.memory.time", clock)
    view = GatedReads(shared.view(), ["r1", "r2", "r3"])
    writer = wbcache.open(tmp_path / "a", backend=shared.view(), flush_interval=3600)
    reader = wbcache.open(tmp_path / "b", backend=view, flush_interval=3600, read_ttl=1.0)
    shown: dict[str, Any] = {}

    def start(name: str, call: Callable[[], Any]) -> threading.Thread:
        thread = threading.Thread(target=lambda: shown.update({name: call()}), name=name)
        thread.start()
        assert view.waiting[name].wait(10)
        return thread

    threads = []
    try:
        writer.put("k", 5)
        writer.flush()
        threads.append(start("r2", lambda: reader.get("k")))  # registered, waits to ask
        clock.now += 0.5
        for name, call in (("r3", lambda: reader.get("k")),
                           ("r1", (lambda: reader.incr("k")) if last == "incr"
                            else lambda: reader.get("k"))):
            threads.append(start(name, call))
            view.ask[name].set()
            assert view.holding[name].wait(10)  # 5
        writer.put("k", 6)
        writer.flush()
        view.ask["r2"].set()
        view.answer["r2"].set()
        threads[0].join(10)
        assert shown == {"r2": 6}
        clock.now += 0.55  # r2's entry expires; r1's answer would be young
        view.answer["r3"].set()
        threads[1].join(10)
        view.answer["r1"].set()
        threads[2].join(10)
        assert shown["r3"] == 5  # a right answer for a read that overlapped the write
        if last == "incr":
            assert shown["r1"] == 7  # built on 6, not on 5
        assert reader.get("k") == (7 if last == "incr" else 6)
    finally:
        view.release_all()
        for thread in threads:
            thread.join(10)
        writer.close()
        reader.close()


def test_a_write_s_read_is_not_made_again_for_a_newer_answer_that_is_the_same(
        tmp_path: Path, shared: SharedMemoryBackend) -> None:
    """A read shown after a write's read asked made the write's answer stale, whatever it
    was: an `incr` of a key readers poll, absent from the database, read it again for each
    of their reads (a review: 59,142 reads for one incr, 4 readers). Only another answer
    makes it stale."""
    view = HoldsOneThread(shared.view())
    asked: list[str] = []
    inner_get = view.get

    def counting_get(key: Key) -> bytes | None:
        asked.append(threading.current_thread().name)
        return inner_get(key)

    view.get = counting_get  # type: ignore[method-assign]
    cache = wbcache.open(tmp_path / "b", backend=view, flush_interval=3600, read_ttl=60.0)
    counted: list[int] = []
    writer = threading.Thread(target=lambda: counted.append(cache.incr("k")), name="slow")
    try:
        writer.start()
        assert view.holding.wait(10)  # the write's read has its answer: none
        assert cache.get("k") is None  # a read asked after it, shown first: the same answer
        view.release.set()
        writer.join(10)
        assert counted == [1] and asked == ["slow", "MainThread"]  # read once each
    finally:
        view.release.set()
        writer.join(10)
        cache.close()


def test_an_expired_entry_is_never_served_while_a_new_answer_is_stored() -> None:
    """`keep_clean` gave the entry its new age before its new value: a hit (no lock) in
    between was served the old value, however old, as fresh (an outside hunt)."""
    entries = Entries(capacity=10, read_ttl=1.0)
    assert entries.keep_clean("k", "old", entries.now() - 60.0)  # long expired
    seen: list[tuple[Any, bool]] = []

    class Watched(OrderedDict):  # type: ignore[type-arg]
        def __setitem__(self, key: Any, value: Any) -> None:
            seen.append((self.get(key), entries.fresh(key)))  # what a hit sees just before
            super().__setitem__(key, value)

    entries.map = Watched(entries.map)
    seen.clear()  # the copy's own stores
    assert entries.keep_clean("k", "new", entries.now())
    assert seen == [("old", False)]
    assert entries.fresh("k") and entries.map["k"] == "new"


def test_a_backend_default_read_ttl_applies_unless_an_option_is_given(
        tmp_path: Path, shared: SharedMemoryBackend) -> None:
    with wbcache.open(tmp_path / "a", backend=shared.view()) as cache:
        assert cache.read_ttl == 1.0
    with wbcache.open(tmp_path / "b", backend=shared.view(), read_ttl=0.25) as cache:
        assert cache.read_ttl == 0.25
    with wbcache.open(tmp_path / "c") as cache:
        assert cache.read_ttl is None  # LMDB: one owner, entries never go stale


def test_the_cache_id_is_made_once_and_kept(tmp_path: Path) -> None:
    with wbcache.open(tmp_path / "a") as cache:
        first = cache.cache_id
    with wbcache.open(tmp_path / "a") as cache:
        assert cache.cache_id == first
    assert (tmp_path / "a" / "cache_id").read_text().strip() == first
    assert (tmp_path / "a" / "cache_id").stat().st_mode & 0o077 == 0


def test_a_directory_remembers_its_kind_of_database_and_refuses_another(
        tmp_path: Path, shared: SharedMemoryBackend) -> None:
    view = shared.view()
    view.kind = "shared-memory"  # type: ignore[attr-defined]
    with wbcache.open(tmp_path / "a", backend=view, flush_interval=3600) as cache:
        cache.put("only-in-the-log", 1)
        # not flushed: replaying this log into LMDB would lose it for the shared database
        with pytest.raises(wbcache.InvalidDirectoryError):
            wbcache.recover_directory(tmp_path / "a")
    assert (tmp_path / "a" / "backend").read_text().strip() == "shared-memory"
    with pytest.raises(wbcache.InvalidDirectoryError, match="shared-memory"):
        wbcache.open(tmp_path / "a")  # LMDB
    assert stored(shared, "only-in-the-log") == 1  # close flushed it where it belongs


def test_an_open_racing_the_last_close_of_a_shared_database_waits_for_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The last release closed the environment after letting go of the lock: an open in
    # between found no entry, opened the environment a second time, and LMDB refused it
    # ("already open in this process"); 1 to 7 opens in 1,000 of two threads' loops.
    from wbcache.backends.lmdb import LmdbDatabase, release_shared, shared_database
    path = str(tmp_path / "db")
    database = shared_database(path, map_size=1 << 20)
    closing, go_on = threading.Event(), threading.Event()
    close = LmdbDatabase.close

    def paused_close(self: LmdbDatabase) -> None:
        closing.set()
        go_on.wait(10)
        close(self)

    monkeypatch.setattr(LmdbDatabase, "close", paused_close)
    releaser = threading.Thread(target=release_shared, args=(database,))
    releaser.start()
    assert closing.wait(10)
    from wbcache.backends import lmdb as lmdb_backend
    assert lmdb_backend._shared_lock.locked()  # the close is under the lock an open takes
    opened: list[Any] = []

    def open_again() -> None:
        try:
            opened.append(shared_database(path, map_size=1 << 20))
        except Exception as exc:  # reported by the asserts below
            opened.append(exc)

    opener = threading.Thread(target=open_again)
    opener.start()
    opener.join(0.5)  # the window in which the race opened: the close is still paused
    go_on.set()
    releaser.join(10)
    opener.join(10)
    assert len(opened) == 1 and isinstance(opened[0], LmdbDatabase), opened
    assert opened[0] is not database
    release_shared(opened[0])
