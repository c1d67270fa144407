"""A signal handler runs in the main thread at whatever point the main thread was: inside a
flush, it may call `flush()` or `close()` (a SIGTERM handler that closes the cache is common).
The flusher's mutex is reentrant, so a nested flush ran a second cycle inside the first,
which then sent its batch as the nested one had changed it, at a stale checkpoint (a shared
directory's counter stored as 27 for 16 written); a nested close stopped the background
thread, which was waiting for that mutex, and waited for it for ever. Here the "handler" is
called where the hunt's signal landed: as `take_dirty` returns in the outer cycle. Inside a
write, a real SIGTERM's handler that closes the cache is refused (last test)."""

from __future__ import annotations

import linecache
import subprocess
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


HANDLER_CLOSES_INSIDE_A_WRITE = """
import signal, sys
import wbcache
from wbcache.memory import Entries
from wbcache.wal.writer import LogWriter

cache = wbcache.open(sys.argv[1], fsync=sys.argv[2])
outcome = []

def on_term(signum, frame):
    try:
        cache.close()
        outcome.append("closed")
    except wbcache.WbcacheError as exc:
        outcome.append(f"refused: {exc}")
        raise

signal.signal(signal.SIGTERM, on_term)
if sys.argv[3] == "lock":
    write = Entries.write
    def write_then_signal(self, key, held):  # the cache's lock held: a put in the middle
        write(self, key, held)
        if key == "k50":
            signal.raise_signal(signal.SIGTERM)  # the handler runs before this put ends
    Entries.write = write_then_signal
else:  # the put leads its group commit (a value too large for the map): lock let go
    append = LogWriter.append
    appended = []
    def append_then_signal(self, *args, **kwargs):
        done = append(self, *args, **kwargs)
        appended.append(True)
        if len(appended) == 51:
            signal.raise_signal(signal.SIGTERM)
        return done
    LogWriter.append = append_then_signal

acked = 0
try:
    for i in range(100):
        cache.put(f"k{i}", i if sys.argv[3] == "lock" else [i, b"x" * 300_000])
        acked = i + 1
except wbcache.WbcacheError:
    pass
print(acked, outcome[0] if outcome else "no handler", flush=True)
"""


@pytest.mark.parametrize(("fsync", "where"), [("always", "lock"), ("interval", "lock"),
                                               ("interval", "leader")])
def test_a_signal_handler_s_close_inside_a_write_of_the_same_thread_is_refused(
        tmp_path: Path, fsync: str, where: str) -> None:
    """A SIGTERM handler that closes the cache, run while the main thread was in the middle
    of a put (the sequencer's lock held, not reentrant): the close waited for that lock, held
    beneath it, for ever (an outside hunt, 8 hangs in 12 runs); or, the put leading its
    group commit (the lock let go for the write), for that write (a review). It is refused
    now, with an error saying what to do instead, and nothing acknowledged is lost."""
    child = subprocess.run([sys.executable, "-c", HANDLER_CLOSES_INSIDE_A_WRITE,
                            str(tmp_path / "c"), fsync, where],
                           capture_output=True, text=True, timeout=60)
    assert child.returncode == 0, child.stderr
    acked, _, outcome = child.stdout.strip().partition(" ")
    assert outcome.startswith("refused: close() of cache") and "signal handler" in outcome
    assert int(acked) == 50  # the put of k50 was interrupted by the handler's error
    with wbcache.open(tmp_path / "c") as cache:
        values = [cache[f"k{i}"] for i in range(int(acked))]
    assert values == [i if where == "lock" else [i, b"x" * 300_000] for i in range(50)]
