"""An interrupt (KeyboardInterrupt, a signal handler's exception) at any bytecode of the paths a
hunt found unsafe: memory's eviction, the flusher's pause, the LMDB gate, a value's decoding.
Each loses nothing and leaves no lock held (tests/interrupt_support.py puts the interrupt at
every point of one run, in turn)."""

from __future__ import annotations

import functools
import threading
from pathlib import Path

import msgpack
import pytest

import wbcache
from tests.interrupt_support import code_of, every_point
from wbcache.backends.lmdb_gate import ReadGate
from wbcache.codec import decode_value
from wbcache.errors import CorruptValueError
from wbcache.flusher import Flusher
from wbcache.memory import Entries
from wbcache.sequencer import Sequencer


def test_an_interrupt_anywhere_in_an_eviction_never_drops_a_pinned_entry() -> None:
    """A pinned (dirty) entry met by the CLOCK hand was popped, then put back: interrupted in
    between, it was gone from memory while still unflushed."""
    pinned_keys, visited_key = {0, 1, 4}, 3

    def pinned(key: int) -> bool:
        return key in pinned_keys

    points = 0
    for point in every_point([code_of(Entries.evict), code_of(pinned)]):
        entries = Entries(capacity=2, read_ttl=60.0)
        for key in range(6):
            entries.map[key] = f"v{key}"
            entries.clean_since[key] = 0.0  # type: ignore[index]
        entries.visited.add(visited_key)
        evicted: list[int] = []
        point.run(entries.evict, pinned, evicted.append)
        for key in pinned_keys:
            assert entries.map.get(key) == f"v{key}", point.fired_in
        for key in range(6):
            assert key in entries.map or key in evicted, point.fired_in
        points += 1
    assert points > 30  # the walk reached well into the loop
    assert sorted(entries.map) == [0, 1, 4]  # the run that was not interrupted evicted


def test_an_interrupted_eviction_loses_no_acknowledged_increment(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch
                                                                 ) -> None:
    """The hunt's case: interrupted as the hand looked at a dirty counter, the counter was gone
    from memory; the next incr read the database's older total and built on it (8 acknowledged,
    then 6), and so did the log, so the loss survived a reopen."""
    path = tmp_path / "c"
    cache = wbcache.open(path, capacity=2, flush_interval=3600)
    for _ in range(5):
        cache.incr("ctr")
    cache.flush()  # the database: 5
    assert [cache.incr("ctr") for _ in range(3)] == [6, 7, 8]  # dirty in memory
    real = Sequencer._pinned
    interrupted = []

    def pinned(self: Sequencer, key: object) -> bool:
        if key == "ctr" and not interrupted:
            interrupted.append(key)
            raise KeyboardInterrupt  # where a signal's exception may be raised: its entry
        return real(self, key)

    monkeypatch.setattr(Sequencer, "_pinned", pinned)
    with pytest.raises(KeyboardInterrupt):
        for key in "abc":
            cache.put(key, 1)  # over capacity: the hand meets the counter
    assert interrupted
    assert cache.get("ctr") == 8
    assert cache.incr("ctr") == 9
    cache.close()
    with wbcache.open(path) as cache:
        assert cache["ctr"] == 9


def _returns(call: object, seconds: float = 30) -> bool:
    """Whether `call()`, in another thread, returns within `seconds`."""
    other = threading.Thread(target=call, daemon=True)  # type: ignore[arg-type]
    other.start()
    other.join(seconds)
    return not other.is_alive()


def _mutex_free(flusher: Flusher) -> bool:
    if not flusher._mutex.acquire(timeout=5):
        return False
    flusher._mutex.release()
    return True


@pytest.mark.parametrize("call", ["flush", "len"])
def test_an_interrupt_anywhere_in_a_pause_of_the_flusher_leaves_it_free(
        tmp_path: Path, call: str) -> None:
    """Interrupted as the mutex was taken (before the flag saying so) or in the bookkeeping
    after, `paused` left the flusher's mutex held for good: every later flush, len() and close
    waited on it (close for ever)."""
    cache = wbcache.open(tmp_path / "c", flush_interval=3600)
    flusher = cache._flusher
    codes = [code_of(Flusher.paused), code_of(Flusher.flush),
             *(code_of(method) for method in (threading.Condition.__enter__,
                                              threading.Condition.__exit__,
                                              threading.Condition.notify_all))]
    points = 0
    for point in every_point(codes):
        cache.put("k", points)
        point.run(cache.flush if call == "flush" else cache.__len__)
        assert _mutex_free(flusher), point.fired_in
        assert flusher._waiting == 0, point.fired_in
        points += 1
    assert points > 5
    closer = threading.Thread(target=cache.close)
    closer.start()
    closer.join(30)
    assert not closer.is_alive()


def _reads(cache: wbcache.Cache, key: str, expected: object) -> None:
    assert cache.get(key) == expected


def _gate_free(gate: ReadGate) -> bool:
    """Whether another thread can enter the gate (its lock is not held)."""
    return _returns(gate.nested, 5)


def test_an_interrupt_anywhere_in_a_gated_read_leaves_the_gate_free(tmp_path: Path) -> None:
    """A cold read goes through the LMDB gate; interrupted as the gate's condition was entered
    (a Python `__enter__`, so between its lock's acquire and its return) the lock stayed held
    by the reader: the flusher's next write waited on it for good, and so did close."""
    cache = wbcache.open(tmp_path / "c", capacity=2, flush_interval=3600)
    cache.put_many({f"cold{i}": i for i in range(50)})
    cache.flush()
    gate = cache._backend._database._gate  # type: ignore[attr-defined]
    codes = [code_of(ReadGate.reading), code_of(ReadGate._wait_to_read),
             *(code_of(method) for method in (threading.Condition.__enter__,
                                              threading.Condition.__exit__,
                                              threading.Condition.notify_all))]
    points = 0
    for point in every_point(codes):
        number = 10 + points % 30  # not in memory (capacity 2): a read of the database
        assert f"cold{number}" not in cache._entries.map
        point.run(_reads, cache, f"cold{number}", number)
        assert _gate_free(gate), point.fired_in
        assert gate._readers == 0 and not gate._open, point.fired_in
        points += 1
    assert points > 5
    cache.put("after", 1)
    closer = threading.Thread(target=cache.close)
    closer.start()
    closer.join(30)
    assert not closer.is_alive()


def test_a_handlers_exception_while_a_value_decodes_is_not_called_corruption(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A SIGALRM handler's TimeoutError raised as msgpack returned was reported as "the
    database holds bytes wbcache did not write", the real cause dropped."""
    encoded = msgpack.packb({"a": 1})

    def timed_out(*args: object, **kwargs: object) -> object:
        raise TimeoutError("deadline exceeded")

    monkeypatch.setattr(msgpack, "unpackb", timed_out)
    with pytest.raises(TimeoutError, match="deadline exceeded"):
        decode_value(encoded, "doc")
    monkeypatch.undo()
    assert decode_value(encoded, "doc") == {"a": 1}
    for bad in (b"\xc1", b"\x92\x01", b"\x81\x91\x01\x01", b"\xa2\xff\xfe"):
        with pytest.raises(CorruptValueError):
            decode_value(bad, "doc")


# threading's own Event and Condition, entered and left through Python functions: where an
# interrupt left their lock held (the code under test must not use them from a caller's thread)
THREADING = [code_of(method) for method in (
    threading.Condition.__enter__, threading.Condition.__exit__, threading.Condition.notify_all,
    threading.Event.set, threading.Event.wait, threading.Event.clear)]


@pytest.mark.parametrize("fsync", ["always", "interval"])
def test_an_interrupt_anywhere_in_a_close_leaves_it_to_be_finished(tmp_path: Path,
                                                                   fsync: str) -> None:
    """close() stops the flusher (and the fsync thread) by setting their events: threading's
    Event, interrupted as its Condition was entered, kept its lock for good, and the next
    close() waited for ever on it; the directory could not be reopened in the process."""
    from wbcache.flusher import IntervalSyncer, _join
    from wbcache.wal.commit import Event

    codes = [code_of(function) for function in (
        wbcache.Cache.close, wbcache.Cache._close_steps_left, Flusher.stop, Flusher.flush,
        IntervalSyncer.stop, _join, Event.set, Event.wait)] + THREADING
    points = 0
    for point in every_point(codes):
        path = tmp_path / f"c{points}"
        cache = wbcache.open(path, fsync=fsync, flush_interval=3600)
        cache.put("k", points)
        point.run(cache.close)
        assert _returns(cache.close), point.fired_in
        with wbcache.open(path) as cache:
            assert cache["k"] == points, point.fired_in
        points += 1
    assert points > 10


def test_an_interrupt_anywhere_in_a_write_waking_the_flusher_leaves_it_wakeable(
        tmp_path: Path) -> None:
    """A write at the dirty limit wakes the flusher (backpressure): interrupted inside
    threading's Event.set, the event's lock stayed held, and the next such write blocked on it
    holding the sequencer's lock: every write, cold read and close hung behind it."""
    from wbcache.wal.commit import Event

    codes = [code_of(function) for function in (Flusher.wake, Event.set)] + THREADING
    cache = wbcache.open(tmp_path / "c", max_dirty=2, flush_interval=3600)
    points = 0
    for point in every_point(codes):
        cache.flush()
        cache.put("a", points)
        cache.put("b", points)
        point.run(cache.put, "c", points)  # at the limit: wakes the flusher, waits for it
        assert _returns(functools.partial(cache.put, "d", points)), point.fired_in  # wakes
        assert cache.get("a") == points
        points += 1
    assert points > 3
    assert _returns(cache.close)
