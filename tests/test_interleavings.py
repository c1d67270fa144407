"""Reads from the database racing writes and flushes: what a read brings into memory must never
replace a newer state of the key.

Each race is built step by step with a backend whose `get` the test holds (`read_gate`): the
read has its answer, the test then writes and flushes the key, and only then lets the read
finish. No timing is involved; the interleaving is forced.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
from controlled import ControlledBackend

import wbcache


@pytest.fixture
def backend(tmp_path: Path) -> Iterator[ControlledBackend]:
    """Request it BEFORE caches are opened on it, so they close before the database does."""
    controlled = ControlledBackend(tmp_path / "db")
    yield controlled
    controlled.gate.set()
    controlled.read_gate.set()
    controlled.close()


def cold(path: Path, backend: ControlledBackend, **options: Any) -> wbcache.Cache:
    """Open `path` over `backend`: nothing is in memory, every key read comes from the database."""
    return wbcache.open(path, backend=backend, flush_interval=3600, **options)


def stored_then_cold(path: Path, backend: ControlledBackend, values: dict[str, Any],
                     **options: Any) -> wbcache.Cache:
    with cold(path, backend) as cache:
        cache.put_many(values)
    return cold(path, backend, **options)


def in_thread(call: Callable[[], Any]) -> tuple[threading.Thread, list[Any]]:
    """Run `call` in a thread; the list receives its result or the exception it raised."""
    outcome: list[Any] = []

    def run() -> None:
        try:
            outcome.append(call())
        except BaseException as exc:  # handed to the test, which asserts on it
            outcome.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, outcome


def held_read(backend: ControlledBackend, call: Callable[[], Any]
              ) -> tuple[threading.Thread, list[Any]]:
    """Start `call` and return once its database read has its answer and is held."""
    backend.reading.clear()
    backend.read_gate.clear()
    started = in_thread(call)
    assert backend.reading.wait(10), "the call never read the database"
    return started


def release(backend: ControlledBackend, thread: threading.Thread) -> None:
    backend.read_gate.set()
    thread.join(10)
    assert not thread.is_alive()


def test_cold_incr_builds_on_a_write_flushed_during_its_read(
        backend: ControlledBackend, tmp_path: Path) -> None:
    cache = stored_then_cold(tmp_path / "c", backend, {"k": 3})
    thread, outcome = held_read(backend, lambda: cache.incr("k"))  # its read holds 3
    cache.put("k", 100)  # acknowledged ...
    cache.flush()  # ... and clean: only memory knows it is newer than the read
    release(backend, thread)
    assert outcome == [101]
    assert cache.get("k") == 101
    cache.close()
    with cold(tmp_path / "c", backend) as reopened:
        assert reopened.get("k") == 101


def test_cold_incr_of_a_missing_key_builds_on_a_write_flushed_during_its_read(
        backend: ControlledBackend, tmp_path: Path) -> None:
    cache = cold(tmp_path / "c", backend)
    thread, outcome = held_read(backend, lambda: cache.incr("k", 5))  # its read holds "absent"
    cache.put("k", 100)
    cache.flush()
    release(backend, thread)
    assert outcome == [105]
    cache.close()
    with cold(tmp_path / "c", backend) as reopened:
        assert reopened.get("k") == 105


def test_cold_incr_with_a_read_ttl_never_replaces_a_newer_clean_entry(
        backend: ControlledBackend, tmp_path: Path) -> None:
    # With a read_ttl every clean entry is stale at once: the increment must read again,
    # and that read races the write below.
    cache = stored_then_cold(tmp_path / "c", backend, {"k": 3}, read_ttl=1e-9)
    assert cache.get("k") == 3  # in memory, clean, and already stale
    thread, outcome = held_read(backend, lambda: cache.incr("k"))
    cache.put("k", 100)
    cache.flush()
    release(backend, thread)
    assert outcome == [101]
    cache.close()
    with cold(tmp_path / "c", backend) as reopened:
        assert reopened.get("k") == 101


def test_del_of_a_cold_key_deleted_and_flushed_during_its_read_raises_key_error(
        backend: ControlledBackend, tmp_path: Path) -> None:
    cache = stored_then_cold(tmp_path / "c", backend, {"k": 1})
    thread, outcome = held_read(backend, lambda: cache.__delitem__("k"))  # read: it exists
    cache.delete("k")
    cache.flush()
    release(backend, thread)
    assert len(outcome) == 1 and isinstance(outcome[0], KeyError)
    assert cache.get("k") is None
    cache.close()


def test_del_of_a_cold_missing_key_sees_a_write_flushed_during_its_read(
        backend: ControlledBackend, tmp_path: Path) -> None:
    cache = cold(tmp_path / "c", backend)
    thread, outcome = held_read(backend, lambda: cache.__delitem__("k"))  # read: absent
    cache.put("k", 1)
    cache.flush()
    release(backend, thread)
    assert outcome == [None]  # the key existed when the delete took effect
    assert "k" not in cache
    cache.close()
    with cold(tmp_path / "c", backend) as reopened:
        assert reopened.get("k") is None


def test_cold_get_never_brings_back_a_value_older_than_a_flushed_write(
        backend: ControlledBackend, tmp_path: Path) -> None:
    cache = stored_then_cold(tmp_path / "c", backend, {"k": "old"})
    thread, outcome = held_read(backend, lambda: cache.get("k"))  # its read holds "old"
    cache.put("k", "new")
    cache.flush()
    release(backend, thread)
    assert outcome[0] in ("old", "new")  # the read overlapped the write: either is right
    assert cache.get("k") == "new"  # but memory must not go back to "old"
    cache.close()


def test_cold_get_racing_a_flush_and_an_eviction_keeps_nothing_stale(
        backend: ControlledBackend, tmp_path: Path) -> None:
    cache = stored_then_cold(tmp_path / "c", backend, {"k": "old"}, capacity=2)
    thread, outcome = held_read(backend, lambda: cache.get("k"))  # its read holds "old"
    cache.put("k", "new")
    cache.flush()  # clean ...
    cache.put_many({"a": 1, "b": 2, "c": 3})
    cache.flush()  # ... and evicted: only the database knows "new" now
    assert cache.stats()["evictions"] >= 1
    release(backend, thread)
    assert outcome[0] in ("old", "new")
    assert cache.get("k") == "new"
    cache.close()


@pytest.mark.parametrize("rounds, options", [(12, {}), (4, {"capacity": 8}),
                                             (4, {"read_ttl": 0.0005})],
                         ids=["cold-at-open", "evicted", "expiring"])
def test_cold_counters_from_many_threads_with_flushes_are_exact(
        backend: ControlledBackend, tmp_path: Path, rounds: int,
        options: dict[str, Any]) -> None:
    """The issue's reproduction: slow database reads, 8 threads counting 40 cold keys while
    another flushes, the cache reopened so that keys start cold each round; also with keys
    evicted, or expiring, all the time, so that reads keep racing flushes after the first.
    Every increment is +1, so a linearizable counter returns each of 1..n exactly once."""
    backend.read_delay = 0.002
    keys = [f"counter:{i}" for i in range(40)]
    returned: dict[str, list[int]] = {key: [] for key in keys}
    for _ in range(rounds):
        cache = cold(tmp_path / "c", backend, **options)
        stop = threading.Event()

        def count(worker: int, cache: wbcache.Cache = cache) -> None:
            for n in range(len(keys)):  # every key once, each worker in its own order
                key = keys[(worker * 7 + n * 3) % len(keys)]
                returned[key].append(cache.incr(key))

        def flush(cache: wbcache.Cache = cache, stop: threading.Event = stop) -> None:
            while not stop.is_set():
                cache.flush()

        flusher = threading.Thread(target=flush)
        flusher.start()
        workers = [threading.Thread(target=count, args=(w,)) for w in range(8)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        stop.set()
        flusher.join()
        cache.close()
    with cold(tmp_path / "c", backend) as reopened:
        final = {key: reopened.get(key) for key in keys}
    wrong = {key: (final[key], len(values)) for key, values in returned.items()
             if final[key] != len(values)}
    assert not wrong, f"counters (final, acknowledged increments) that disagree: {wrong}"
    for key, values in returned.items():
        repeated = [value for value, times in Counter(values).items() if times > 1]
        assert sorted(values) == list(range(1, len(values) + 1)), (key, repeated)


def test_a_cold_get_ending_after_close_leaves_nothing_for_the_closed_cache_to_serve(
        backend: ControlledBackend, tmp_path: Path) -> None:
    # close() empties memory so that every later get is refused; a read still in flight used
    # to put its answer back, and the lock-free hit path then served it from a closed cache.
    cache = stored_then_cold(tmp_path / "c", backend, {"k": "v"})
    thread, outcome = held_read(backend, lambda: cache.get("k"))
    cache.close()
    release(backend, thread)
    assert outcome == ["v"]  # the read began before the close: its answer is still right
    with pytest.raises(wbcache.CacheClosedError):
        cache.get("k")


def close_while_held(cache: wbcache.Cache, thread: threading.Thread, held: threading.Event,
                     go: threading.Event) -> None:
    """Once the call in `thread` is held where the test stops it (`held` set), close the cache
    under it, then let it go on and wait for it to end."""
    assert held.wait(10)
    cache.close()
    go.set()
    thread.join(10)


def test_a_clear_waiting_for_the_flusher_while_close_runs_raises_cache_closed(
        tmp_path: Path) -> None:
    """clear() looked for a close before it waited for the flusher's pause; a close meanwhile
    flushed and closed the database, and clear then read it: DatabaseError, "cannot read the
    LMDB database", which reads like damage (an outside hunt). It is CacheClosedError."""
    cache = wbcache.open(tmp_path / "c", flush_interval=3600)
    cache.put("k", "v")
    named, waiting, go = threading.Event(), threading.Event(), threading.Event()
    paused = cache._flusher.paused

    @contextlib.contextmanager
    def paused_once_closed(timeout: float) -> Iterator[None]:
        if threading.current_thread() is thread:  # the clear; close's flush goes through
            waiting.set()
            assert go.wait(10)
        with paused(timeout):
            yield

    cache._flusher.paused = paused_once_closed  # type: ignore[method-assign]
    thread, outcome = in_thread(lambda: (named.wait(10), cache.clear())[1])
    named.set()  # `thread` is assigned: the clear may start
    close_while_held(cache, thread, waiting, go)
    assert len(outcome) == 1 and isinstance(outcome[0], wbcache.CacheClosedError), outcome
    with wbcache.open(tmp_path / "c") as cache:
        assert dict(cache.items()) == {"k": "v"}  # nothing cleared


def test_a_popitem_scanning_the_database_while_close_runs_raises_cache_closed(
        tmp_path: Path) -> None:
    """popitem() of a cache whose memory holds no key scans the database, outside any lock;
    a close meanwhile closes the database under it: CacheClosedError, not DatabaseError."""
    with wbcache.open(tmp_path / "c") as cache:
        cache.put("k", "v")
    cache = wbcache.open(tmp_path / "c", flush_interval=3600)  # "k" in the database only
    scanning, go = threading.Event(), threading.Event()
    items = cache._backend.items

    def items_once_closed() -> Any:
        scanning.set()
        assert go.wait(10)
        return items()

    cache._backend.items = items_once_closed  # type: ignore[method-assign]
    thread, outcome = in_thread(cache.popitem)
    close_while_held(cache, thread, scanning, go)
    assert len(outcome) == 1 and isinstance(outcome[0], wbcache.CacheClosedError), outcome
    with wbcache.open(tmp_path / "c") as cache:
        assert dict(cache.items()) == {"k": "v"}


def test_a_batch_whose_known_key_is_evicted_during_another_keys_read_reads_each_once(
        backend: ControlledBackend, tmp_path: Path) -> None:
    """A write needing two keys: "b" in memory, "a" read from the database. Evicted while
    "a" was read, "b" was read next, and the read of "a" dropped: then "a" again, "b"
    dropped... the batch read the database for good (an outside hunt: PostgreSQL, where
    read_ttl and counters flushed as deltas make memory forget a key at any moment). Every
    read made is now kept until the write is logged."""
    cache = stored_then_cold(tmp_path / "c", backend, {"a": 1, "b": 1}, capacity=2)
    try:
        assert cache.get("b") == 1  # in memory, clean
        reads_before = backend.reads

        def batch() -> None:
            with cache.batch() as b:
                b.incr("a")
                b.incr("b")
        thread, outcome = held_read(backend, batch)  # reading "a"
        cache.put_many({"x": 1, "y": 2, "z": 3})
        cache.flush()
        assert not cache.sequencer.in_memory("b")  # evicted
        backend.read_gate.set()
        thread.join(10)
        assert not thread.is_alive(), f"the batch still reads: {backend.reads} reads"
        assert outcome == [None]
        assert backend.reads - reads_before == 2  # "a", then "b"
        assert (cache.get("a"), cache.get("b")) == (2, 2)
    finally:
        cache.close()  # a batch still reading then raises CacheClosedError, and ends


class KeyGatedBackend(ControlledBackend):
    """Holds the reads of the keys named with `hold` (their answer read first) until `let_go`."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.gates: dict[str, threading.Event] = {}
        self.inside: dict[str, threading.Event] = {}

    def get(self, key: Any) -> bytes | None:
        value = self.inner.get(key)
        if key in self.gates:
            self.inside[key].set()
            self.gates[key].wait(10)
        return value  # type: ignore[no-any-return]

    def hold(self, key: str) -> None:
        self.gates[key], self.inside[key] = threading.Event(), threading.Event()

    def let_go(self, key: str) -> None:
        self.gates.pop(key).set()


def test_a_read_a_write_keeps_never_puts_its_older_answer_over_a_newer_read(
        tmp_path: Path) -> None:
    """A batch keeps its read of "a" (1) while it reads "b". Meanwhile another cache writes
    a = 50 and a get here reads it into memory; that entry then expires (read_ttl). The batch
    must not build on its older answer, and so put a = 2 over the 50 this cache has shown (a
    review of the read-keeping fix): the newer read made the kept one stale."""
    backend = KeyGatedBackend(tmp_path / "db")
    try:
        with cold(tmp_path / "c", backend) as cache:
            cache.put_many({"a": 1, "b": 1})
        cache = cold(tmp_path / "c", backend, capacity=2, read_ttl=3600)
        assert cache.get("b") == 1
        backend.hold("a")

        def batch() -> None:
            with cache.batch() as b:
                b.incr("a")
                b.incr("b")
        thread, outcome = in_thread(batch)
        assert backend.inside["a"].wait(10)  # its read of "a" has 1
        backend.hold("b")
        cache.put_many({"x": 1, "y": 2, "z": 3})
        cache.flush()  # "b" evicted
        backend.let_go("a")
        assert backend.inside["b"].wait(10)  # reading "b", the read of "a" kept
        backend.inner.apply([("a", msgpack.packb(50))], [], backend.inner.checkpoint())
        assert cache.get("a") == 50  # another cache's write, read into memory
        cache.sequencer._entries.clean_since["a"] = -math.inf  # and expired (read_ttl)
        backend.let_go("b")
        thread.join(10)
        assert outcome == [None]
        assert cache.get("a") == 51 and cache.get("b") == 2
        cache.close()
        assert msgpack.unpackb(backend.inner.get("a")) == 51
    finally:
        backend.close()
