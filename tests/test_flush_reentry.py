"""A signal handler runs in the main thread at whatever point the main thread was: inside a
flush, it may call `flush()` or `close()` (a SIGTERM handler that closes the cache is common).
The flusher's mutex is reentrant, so a nested flush ran a second cycle inside the first,
which then sent its batch as the nested one had changed it, at a stale checkpoint (a shared
directory's counter stored as 27 for 16 written); a nested close stopped the background
thread, which was waiting for that mutex, and waited for it for ever. Here the "handler" is
called where the hunt's signal landed: as `take_dirty` returns in the outer cycle."""

from __future__ import annotations

import linecache
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import msgpack
import pytest

import wbcache
from wbcache import FlushError
from wbcache.flusher import Flusher
from wbcache.sequencer import FlushBatch, Sequencer


def _handler_in_take_dirty(monkeypatch: pytest.MonkeyPatch,
                           handler: Callable[[], None]) -> list[BaseException | None]:
    """Run `handler` once, as the next `take_dirty` of this thread returns (as a signal
    handler runs, in the main thread); what it raised is recorded."""
    real = Sequencer.take_dirty
    outcome: list[BaseException | None] = []
    called: list[bool] = []
    thread = threading.current_thread()

    def take_dirty(self: Sequencer) -> FlushBatch:
        batch = real(self)
        if not called and threading.current_thread() is thread:
            called.append(True)
            try:
                handler()
                outcome.append(None)
            except BaseException as exc:  # what a handler's caller would see
                outcome.append(exc)
        return batch

    monkeypatch.setattr(Sequencer, "take_dirty", take_dirty)
    return outcome


def _stored(cache: wbcache.Cache, key: str) -> object:
    encoded = cache._backend.get(key)
    return None if encoded is None else msgpack.unpackb(encoded)


def test_a_flush_inside_a_flush_of_the_same_thread_is_refused_and_counts_stay_exact(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "shared"
    cache = wbcache.open(path, shared=True, flush_interval=3600)
    for _ in range(16):
        cache.incr("n")
    outcome = _handler_in_take_dirty(monkeypatch, cache.flush)
    cache.flush()
    assert isinstance(outcome[0], FlushError)
    assert "inside a flush, len(), keys() or clear() of this same thread" in str(outcome[0])
    assert _stored(cache, "n") == 16
    cache.incr("n")
    cache.flush()
    assert _stored(cache, "n") == 17
    cache.close()
    with wbcache.open(path, shared=True) as cache:
        assert cache["n"] == 17


def _waiting_for_the_mutex(flusher: Flusher) -> bool:
    """Whether the flusher's thread is blocked taking its mutex (in C: its innermost Python
    frame is the one taking it), within 10 s."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        frame = sys._current_frames().get(flusher._thread.ident or 0)
        if frame is not None and frame.f_code.co_name in ("_take_mutex", "_run") \
                and "mutex" in linecache.getline(frame.f_code.co_filename, frame.f_lineno):
            return True
        time.sleep(0.01)  # polled: the thread's state cannot be waited on
    return False


def test_a_close_inside_a_flush_of_the_same_thread_returns(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "c"
    cache = wbcache.open(path, flush_interval=3600)
    cache.put("k", 1)
    flusher = cache._flusher
    waiting: list[bool] = []

    def handler() -> None:  # the flush holds the mutex; the background thread waits for it
        flusher.wake()
        waiting.append(_waiting_for_the_mutex(flusher))
        cache.close()

    def outer_flush() -> None:
        outcomes.append(_handler_in_take_dirty(monkeypatch, handler))
        try:
            cache.flush()
        except Exception:  # the cache was closed under it: whatever it says, it must return
            pass

    outcomes: list[list[BaseException | None]] = []
    outer = threading.Thread(target=outer_flush, daemon=True)
    outer.start()
    outer.join(60)
    assert not outer.is_alive()
    assert waiting == [True]
    assert isinstance(outcomes[0][0], FlushError)  # close's own final flush: refused
    monkeypatch.undo()
    assert cache.closed
    with wbcache.open(path) as cache:
        assert cache["k"] == 1
