"""The sequencer on its own: LSNs, one record per write, memory and the dirty set in step,
backpressure, and the reads protocol (a registered read is never kept once stale).

A `Sequencer` is built here from its parts (a real log writer in a temporary directory, an
`Entries`, and a `fetch` the test controls), without a cache or a database.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
from controlled import wait_until

from wbcache.errors import CacheClosedError
from wbcache.memory import RECENT_HITS, TOMBSTONE, Entries
from wbcache.recovery import walk_log
from wbcache.sequencer import ABSENT, NeedsRead, Sequencer, WouldBlock
from wbcache.wal import LogWriter
from wbcache.wal.records import OP_BATCH, OP_DELETE, OP_INCR, OP_PUT


class Database:
    """What `fetch` reads: a dict, with a gate the test may close to hold a read."""

    def __init__(self) -> None:
        self.values: dict[Any, bytes] = {}
        self.gate = threading.Event()
        self.gate.set()
        self.reading = threading.Event()

    def fetch(self, key: Any) -> bytes | None:
        value = self.values.get(key)
        self.reading.set()
        self.gate.wait()
        return value


@pytest.fixture
def database() -> Database:
    return Database()


def make(tmp_path: Path, database: Database, **limits: Any) -> tuple[Sequencer, Entries]:
    entries = Entries(limits.get("capacity", 1000), limits.get("read_ttl"))
    writer = LogWriter(str(tmp_path), 1, 1 << 20)
    sequencer = Sequencer(writer=writer, next_lsn=1, entries=entries, fetch=database.fetch,
                          sync_every_batch=True, max_dirty=limits.get("max_dirty", 1000),
                          flush_threshold=1000, name=str(tmp_path))
    return sequencer, entries


@pytest.fixture
def sequenced(tmp_path: Path, database: Database) -> Iterator[tuple[Sequencer, Entries]]:
    sequencer, entries = make(tmp_path, database)
    yield sequencer, entries
    database.gate.set()
    sequencer.close()
    sequencer.close_log()


def logged(tmp_path: Path) -> list[list[Any]]:
    records: list[list[Any]] = []
    walk_log(str(tmp_path), 0, records.extend).check()
    return records


def test_each_write_is_one_record_with_the_next_lsn(tmp_path: Path,
                                                    sequenced: tuple[Sequencer, Entries]) -> None:
    sequencer, entries = sequenced
    assert sequencer.put("a", msgpack.packb(1), 1) == 1
    lsn, result = sequencer.submit(lambda tx: (tx.put("b", msgpack.packb(2), 2),
                                               tx.incr("n", 5), tx.delete("a"))[1], ("n",))
    assert (lsn, result) == (2, 5)
    lsn, _ = sequencer.submit(lambda tx: tx.incr("n", 1))
    assert lsn == 3
    records = logged(tmp_path)
    assert [record[:2] for record in records] == [[1, OP_PUT], [2, OP_BATCH], [3, OP_INCR]]
    assert [item[0] for item in records[1][2]] == [OP_PUT, OP_INCR, OP_DELETE]
    assert entries.map == {"a": TOMBSTONE, "b": 2, "n": 6}
    assert sequencer.pending() == {"a": None, "b": msgpack.packb(2), "n": msgpack.packb(6)}


def test_a_plan_that_writes_nothing_logs_nothing(tmp_path: Path,
                                                 sequenced: tuple[Sequencer, Entries]) -> None:
    sequencer, _ = sequenced
    sequencer.put("a", msgpack.packb(1), 1)
    assert sequencer.submit(lambda tx: "nothing") == (1, "nothing")
    assert len(logged(tmp_path)) == 1


def test_a_plan_that_raises_writes_nothing(tmp_path: Path,
                                           sequenced: tuple[Sequencer, Entries]) -> None:
    sequencer, entries = sequenced

    def plan(tx: Any) -> None:
        tx.put("a", msgpack.packb(1), 1)
        raise KeyError("no")

    with pytest.raises(KeyError):
        sequencer.submit(plan)
    assert sequencer.last_lsn == 0 and entries.map == {} and logged(tmp_path) == []


def test_a_write_needing_a_value_memory_lacks_reads_it_first_outside_the_lock(
        sequenced: tuple[Sequencer, Entries], database: Database) -> None:
    sequencer, _ = sequenced
    database.values["n"] = msgpack.packb(40)
    with pytest.raises(NeedsRead) as info:
        sequencer.submit_nowait(lambda tx: tx.incr("n", 2), ("n",))
    assert info.value.keys == ["n"] and sequencer.last_lsn == 0
    database.gate.clear()
    database.reading.clear()
    outcome: list[Any] = []
    thread = threading.Thread(target=lambda: outcome.append(
        sequencer.submit(lambda tx: tx.incr("n", 2), ("n",))))
    thread.start()
    assert database.reading.wait(10)
    assert sequencer.lock.acquire(timeout=10)  # the read holds no lock
    sequencer.lock.release()
    database.gate.set()
    thread.join(10)
    assert outcome == [(1, 42)]


def test_a_read_overtaken_by_a_write_and_a_flush_is_not_kept(
        sequenced: tuple[Sequencer, Entries], database: Database) -> None:
    sequencer, entries = sequenced
    database.values["k"] = msgpack.packb("old")
    database.gate.clear()
    database.reading.clear()
    outcome: list[Any] = []
    thread = threading.Thread(target=lambda: outcome.append(sequencer.read("k")))
    thread.start()
    assert database.reading.wait(10)  # the read holds "old"
    sequencer.put("k", msgpack.packb("new"), "new")
    sequencer.take_dirty()
    sequencer.flushed()  # clean in memory: only the stale mark tells the read
    database.gate.set()
    thread.join(10)
    assert outcome[0] in ("old", "new") and entries.map["k"] == "new"


def test_eviction_keeps_pinned_entries_and_gives_visited_ones_a_second_chance(
        tmp_path: Path, database: Database) -> None:
    sequencer, entries = make(tmp_path, database, capacity=3)
    for key in "abc":
        sequencer.put(key, msgpack.packb(key), key)
    sequencer.take_dirty()
    sequencer.flushed()  # all clean
    entries.recent.append("a")  # a hit on "a", as `Cache.get` records it
    sequencer.put("d", msgpack.packb("d"), "d")  # over capacity: evicts one clean entry
    assert set(entries.map) == {"a", "c", "d"} and entries.evictions == 1  # "b", not "a"
    sequencer.put("e", msgpack.packb("e"), "e")
    sequencer.put("f", msgpack.packb("f"), "f")
    assert {"d", "e", "f"} <= set(entries.map)  # dirty: pinned, never evicted
    sequencer.close()
    sequencer.close_log()


def test_only_the_newest_hits_between_two_evictions_give_a_second_chance(
        tmp_path: Path, database: Database) -> None:
    """The hit buffer is bounded (`RECENT_HITS`): a burst of hits longer than it keeps the
    marks of its newest hits only, and an eviction turns those into marks."""
    sequencer, entries = make(tmp_path, database, capacity=3)
    for key in "abc":
        sequencer.put(key, msgpack.packb(key), key)
    sequencer.take_dirty()
    sequencer.flushed()
    entries.recent.append("a")  # pushed out of the buffer by the burst that follows
    for _ in range(RECENT_HITS):
        entries.recent.append("c")
    sequencer.put("d", msgpack.packb("d"), "d")
    assert set(entries.map) == {"b", "c", "d"}  # "a", the oldest, lost its hit: evicted
    assert not entries.recent and entries.visited == {"c"}  # the hand stopped before "c"
    sequencer.close()
    sequencer.close_log()


def test_backpressure_blocks_writers_and_refuses_the_nonblocking_ones(
        tmp_path: Path, database: Database) -> None:
    sequencer, _ = make(tmp_path, database, max_dirty=2)
    woken = threading.Event()
    sequencer.wake_flusher = woken.set
    sequencer.put("a", msgpack.packb(1), 1)
    sequencer.put("b", msgpack.packb(1), 1)
    with pytest.raises(WouldBlock):
        sequencer.put_nowait("c", msgpack.packb(1), 1)
    assert woken.is_set()
    done = threading.Event()
    thread = threading.Thread(target=lambda: (sequencer.put("c", msgpack.packb(1), 1),
                                              done.set()))
    thread.start()
    assert not done.wait(0.2)  # waits out backpressure
    sequencer.take_dirty()
    sequencer.flushed()
    assert done.wait(10)
    thread.join()
    sequencer.close()
    sequencer.close_log()


def test_closing_refuses_writes_and_wakes_waiting_writers(
        tmp_path: Path, database: Database) -> None:
    sequencer, _ = make(tmp_path, database, max_dirty=1)
    sequencer.put("a", msgpack.packb(1), 1)
    errors: list[BaseException] = []

    def write() -> None:
        try:
            sequencer.put("b", msgpack.packb(1), 1)
        except CacheClosedError as exc:
            errors.append(exc)

    thread = threading.Thread(target=write)
    thread.start()
    wait_until(lambda: thread.is_alive())
    assert sequencer.close() is True and sequencer.close() is False
    thread.join(10)
    assert len(errors) == 1
    with pytest.raises(CacheClosedError):
        sequencer.read("a")
    sequencer.close_log()


def test_a_lock_free_reader_racing_an_eviction_looks_again_under_the_lock(
        sequenced: tuple[Sequencer, Entries], database: Database) -> None:
    """Eviction pops a dirty entry and puts it back, under the lock; a read that misses memory
    meanwhile must look again under the lock, not trust the database."""
    sequencer, entries = sequenced
    database.values["old"] = msgpack.packb(1)  # flushed once, since deleted
    sequencer.put("new", msgpack.packb(2), 2)
    sequencer.submit(lambda tx: tx.delete("old"))
    answers: dict[str, Any] = {}

    def ask() -> None:
        answers["new"] = sequencer.read("new")
        answers["old"] = sequencer.read("old")

    with sequencer.lock:
        held_new, held_old = entries.map.pop("new"), entries.map.pop("old")
        reader = threading.Thread(target=ask)
        reader.start()
        reader.join(0.2)  # it cannot answer while the entries are out: it waits for the lock
        assert reader.is_alive()
        entries.map["new"], entries.map["old"] = held_new, held_old
    reader.join()
    assert answers == {"new": 2, "old": ABSENT}
