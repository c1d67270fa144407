"""The LMDB database under threads that read in a loop (many threads on cold keys): its write
transactions must still end.

py-lmdb 3.0 aborts a write transaction only once no other thread of the process is inside an
LMDB call (trans_abort waits for the environment's count of operations in flight). Threads that
read in a loop keep that count above zero almost all the time, so an abort could wait for
seconds or for good: the flusher, aborting on MapFullError before it grows the map, stood
there for over 25 s while eight threads read, holding the flush mutex, and shared directories
abort a write transaction each time they read a fresh checkpoint. `LmdbDatabase` now keeps
new transactions out while it aborts (the operations in flight end by themselves). Behind
that stood a second wait of the same kind: growing the map waits until no transaction is
open, and scans in a loop always had one open while new ones started; a waiting resizer now
keeps new transactions out too, for a while only (and never those of a thread that already
has one open), since a thread with one open may itself wait for another thread's read.
"""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from controlled import wait_until

from wbcache.backends import lmdb_gate
from wbcache.backends.lmdb import LmdbDatabase

READERS = 8  # threads reading in a loop; with 4 the starvation already shows
DEADLINE = 20.0  # seconds; the call takes milliseconds once it is not starved


@contextmanager
def reading_in_a_loop(database: LmdbDatabase, keys: list[str], *,
                      scans: bool = False) -> Iterator[list[int]]:
    """READERS threads reading `database` without a pause until the block ends: each a key of
    `keys` at a time, or (`scans`) every entry, one cursor step after another."""
    stop = threading.Event()
    counts = [0] * READERS

    def reader(number: int) -> None:
        index = number
        while not stop.is_set():
            if scans:
                for _ in database.items():
                    pass
            else:
                database.get(keys[index % len(keys)])
                index += 7
            counts[number] += 1

    threads = [threading.Thread(target=reader, args=(n,), daemon=True) for n in range(READERS)]
    for thread in threads:
        thread.start()
    try:
        yield counts
    finally:
        stop.set()
        for thread in threads:
            thread.join(DEADLINE)


def ends_within(call: Callable[[], object], seconds: float) -> bool:
    """Whether `call`, run in a thread of its own, returned (or raised) within `seconds`."""
    done = threading.Event()

    def run() -> None:
        try:
            call()
        finally:
            done.set()

    threading.Thread(target=run, daemon=True).start()
    return done.wait(seconds)


def stored(tmp_path: Path, map_size: int) -> tuple[LmdbDatabase, list[str]]:
    database = LmdbDatabase(str(tmp_path / "db"), map_size=map_size)
    keys = [f"seed{i}" for i in range(500)]
    database.write([(key, b"x" * 100) for key in keys], [], [], b"checkpoint", 1)
    return database, keys


@pytest.mark.parametrize("scans", [False, True], ids=["gets", "scans"])
def test_a_write_that_fills_the_map_grows_it_while_threads_read(tmp_path: Path,
                                                                scans: bool) -> None:
    # Aborting on MapFullError (gets in a loop held the abort off), then growing the map (scans
    # in a loop, always one open, held the resizer off while new ones kept starting).
    database, keys = stored(tmp_path, 256 * 1024)
    big = [(f"big{i}", b"y" * 1000) for i in range(400)]  # about 400 KiB: past the map
    with reading_in_a_loop(database, keys, scans=scans) as counts:
        ended = ends_within(lambda: database.write(big, [], [], b"checkpoint", 2), DEADLINE)
        reads = sum(counts)
    # Not closed if it failed: closing waits for the stuck transaction, for good.
    assert ended, f"the write did not end within {DEADLINE} s ({reads} reads meanwhile)"
    try:
        assert database.resizes >= 1  # it did abort on MapFullError and grow the map
        assert database.get("big399") == b"y" * 1000
        assert database.checkpoint(b"checkpoint") == 2
    finally:
        database.close()


def test_fresh_checkpoints_are_read_while_threads_read(tmp_path: Path) -> None:
    database, keys = stored(tmp_path, 1 << 30)
    # A fresh checkpoint is read in a write transaction, then aborted: 200 aborts, beside
    # scans in a loop (one fresh checkpoint beside gets in a loop once waited 268 s).
    with reading_in_a_loop(database, keys, scans=True):
        ended = ends_within(
            lambda: [database.checkpoint(b"checkpoint", fresh=True) for _ in range(200)],
            DEADLINE)
    assert ended, f"200 fresh checkpoints were not read within {DEADLINE} s"  # (not closed)
    try:
        assert database.checkpoint(b"checkpoint", fresh=True) == 1
    finally:
        database.close()


def test_a_thread_with_a_transaction_open_may_open_another_while_a_resizer_waits(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The resizer keeps new transactions out, but not those of a thread that already has one
    # open: that thread would wait for the resizer, which waits for it (here for as long as
    # the limit, made long so that waiting at all would show).
    monkeypatch.setattr(lmdb_gate, "PREFER_RESIZER", DEADLINE)
    database, keys = stored(tmp_path, 1 << 30)
    gate = database._gate  # noqa: SLF001 (the test drives the gate itself)
    resized = threading.Event()
    nested: list[bytes | None] = []

    def open_two() -> None:
        with gate.reading():
            resizer = threading.Thread(target=lambda: (gate.acquire_exclusive(None),
                                                       gate.release_exclusive(),
                                                       resized.set()), daemon=True)
            resizer.start()
            wait_until(lambda: gate._wanted == 1, what="the resizer waiting")  # noqa: SLF001
            nested.append(database.get(keys[0]))

    opener = threading.Thread(target=open_two, daemon=True)
    opener.start()
    opener.join(DEADLINE / 2)
    assert nested == [b"x" * 100], "the nested transaction waited for the resizer"
    assert resized.wait(DEADLINE)
    database.close()


def test_a_reader_another_thread_waits_for_is_held_off_for_a_while_only(
        tmp_path: Path) -> None:
    # A thread with a transaction open (scanning a snapshot, say) waits for another thread's
    # read while a resizer waits for the scan to end: the read must not wait for the resizer
    # for good, or the three wait for one another.
    database, keys = stored(tmp_path, 1 << 30)
    gate = database._gate  # noqa: SLF001 (the test drives the gate itself)
    read: list[bytes | None] = []
    with gate.reading():  # the scan
        resizer = threading.Thread(target=lambda: (gate.acquire_exclusive(None),
                                                   gate.release_exclusive()), daemon=True)
        resizer.start()
        wait_until(lambda: gate._wanted == 1, what="the resizer waiting")  # noqa: SLF001
        reader = threading.Thread(target=lambda: read.append(database.get(keys[0])),
                                  daemon=True)
        reader.start()
        reader.join(DEADLINE)  # the scan waits for the read
        assert read == [b"x" * 100], "the read waited for the resizer, which waits for the scan"
    resizer.join(DEADLINE)
    assert not resizer.is_alive()
    database.close()


def test_a_waiting_resizer_goes_before_transactions_that_start_after_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The rule behind the scans above, step by step: with one transaction open and a resizer
    # waiting for it, a transaction another thread starts now waits for the resizer (the
    # limit on that wait made long, so that a slow machine cannot reorder the two).
    monkeypatch.setattr(lmdb_gate, "PREFER_RESIZER", DEADLINE)
    database, keys = stored(tmp_path, 1 << 30)
    try:
        gate = database._gate  # noqa: SLF001 (the test drives the gate itself)
        order: list[str] = []

        def resize() -> None:
            gate.acquire_exclusive(None)
            order.append("resized")
            gate.release_exclusive()

        def read() -> None:
            database.get(keys[0])
            order.append("read")

        resizer = threading.Thread(target=resize, daemon=True)
        reader = threading.Thread(target=read, daemon=True)
        with gate.reading():  # the transaction open
            resizer.start()
            wait_until(lambda: gate._wanted == 1, what="the resizer waiting")  # noqa: SLF001
            reader.start()
            wait_until(lambda: order or _waiting_in(reader), what="the reader at the gate")
        resizer.join(DEADLINE)
        reader.join(DEADLINE)
        assert order == ["resized", "read"]
    finally:
        database.close()


def _waiting_in(thread: threading.Thread) -> bool:
    """Whether `thread` waits on a condition (its innermost frame is `Condition.wait`)."""
    frame = sys._current_frames().get(thread.ident or -1)
    return frame is not None and frame.f_code.co_name == "wait"


def test_more_threads_reading_at_once_than_lmdb_has_reader_slots_wait_for_one(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Every read-only transaction holds a slot of LMDB's reader table: 126 by default, for
    # every process of the machine. A read past it raised lmdb.ReadersFullError (a pool of
    # 130 threads reading cold keys saw hundreds). A lock file of that size (an older
    # wbcache's) is what this test opens; a thread past the process's slots now waits.
    from wbcache.backends import lmdb as lmdb_backend
    monkeypatch.setattr(lmdb_backend, "MAX_READERS", 126, raising=False)
    database, _ = stored(tmp_path, 1 << 20)
    threads = lmdb_gate.READ_SLOTS + 40
    lock = threading.Lock()
    trying, holding, done = [0], [0], [0]
    failed: list[BaseException] = []
    release = threading.Event()

    def reader() -> None:
        try:
            with lock:
                trying[0] += 1
            scan = database.items()
            next(scan)  # its transaction is open, its slot taken
            with lock:
                holding[0] += 1
            release.wait(DEADLINE)
            scan.close()
            with lock:
                done[0] += 1
        except Exception as exc:  # reported by the asserts below
            failed.append(exc)

    workers = [threading.Thread(target=reader) for _ in range(threads)]
    for worker in workers:
        worker.start()
    try:
        slots = lmdb_gate.READ_SLOTS
        wait_until(lambda: trying[0] == threads and holding[0] + len(failed) >= slots)
        assert holding[0] == lmdb_gate.READ_SLOTS and failed == []
    finally:
        release.set()
        for worker in workers:
            worker.join(DEADLINE)
    database.close()
    assert failed == [] and done[0] == threads


def test_a_new_database_has_reader_slots_for_several_processes_at_their_limit(
        tmp_path: Path) -> None:
    from wbcache.backends.lmdb import MAX_READERS
    database, _ = stored(tmp_path, 1 << 20)
    try:
        assert database.env.max_readers() == MAX_READERS >= 8 * lmdb_gate.READ_SLOTS
    finally:
        database.close()


def test_a_freed_reader_slot_goes_to_a_thread_waiting_for_one(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lmdb_gate, "READ_SLOTS", 2)
    database, keys = stored(tmp_path, 1 << 20)
    scans = [database.items(), database.items()]
    for scan in scans:
        next(scan)  # both slots taken, by this thread
    got = threading.Event()
    reader = threading.Thread(target=lambda: (database.get(keys[0]), got.set()))
    reader.start()
    try:
        assert not got.wait(0.2)  # it waits for a slot
        scans[0].close()  # one slot freed: the waiting thread is woken for it
        assert got.wait(DEADLINE)
    finally:
        for scan in scans:
            scan.close()
        reader.join(DEADLINE)
    database.close()


def test_a_thread_holding_a_transaction_takes_another_without_waiting_for_a_slot(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Waiting would be waiting for itself: every slot may be its own.
    monkeypatch.setattr(lmdb_gate, "READ_SLOTS", 1)
    database, keys = stored(tmp_path, 1 << 20)

    def nested() -> bytes | None:
        for _ in database.items():  # the one slot
            return database.get(keys[0])
        return None
    assert ends_within(nested, DEADLINE)
    database.close()


def test_a_thread_inside_a_scan_meeting_a_map_grown_elsewhere_gets_the_error_not_a_hang(
        tmp_path: Path) -> None:
    # Adopting the new size needs no transaction of this process open; its own scan is one,
    # so it would wait for itself (and every thread after it would queue behind it).
    import lmdb
    path = tmp_path / "db"
    database = LmdbDatabase(str(path), map_size=64 * 1024)
    database.write([("a", b"1"), ("b", b"2")], [], [], b"checkpoint", 1)
    grow = (f"from wbcache.backends.lmdb import LmdbDatabase\n"
            f"db = LmdbDatabase({str(path)!r}, map_size=64 * 1024)\n"
            f"db.write([(f'big{{i}}', b'x' * 2000) for i in range(400)], [], [], b'c2', 1)\n"
            f"db.close()\n")
    raised: list[BaseException] = []

    def scan_then_get() -> None:
        scan = database.items()
        next(scan)
        subprocess.run([sys.executable, "-c", grow], check=True, timeout=60)
        try:
            database.get("big399")  # inside its own scan
        except lmdb.MapResizedError as exc:
            raised.append(exc)
        finally:
            scan.close()
    assert ends_within(scan_then_get, DEADLINE + 60) and len(raised) == 1
    assert database.get("big399") == b"x" * 2000  # adopted once the scan is over
    database.close()
