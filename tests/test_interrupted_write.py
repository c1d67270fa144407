"""A write interrupted once its LSN is taken (a KeyboardInterrupt between two bytecodes).

Its record may or may not be queued, and memory may hold part of it. Before, the cache went
on: the next write took the next LSN (a hole in the log: after a kill -9 the next open
refused the log, every acknowledged write behind `wbcache recover --salvage`), and a flush
wrote the half of a batch memory held, then deleted the log that held it whole. Now the
sequencer is torn: writes and flushes are refused until the cache is reopened, which replays
the log (wbcache/sequencer.py, the module docstring)."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from controlled import wait_until

import wbcache
from wbcache import FlushError, LogFailedError

# A writer that acknowledges 20 puts, has the 21st interrupted as its record is handed to the
# log, tries one more (printing what happened), and is SIGKILLed: what the log holds then is
# what the next open reads.
INTERRUPTED_THEN_KILLED = """
import os, signal, sys
import wbcache

cache = wbcache.open(sys.argv[1], fsync=sys.argv[2], flush_interval=3600)
for i in range(20):
    cache.put(f"k{i}", i)
committer = cache.sequencer.committer
append = committer.append

def interrupted(lsn, record):
    committer.append = append
    raise KeyboardInterrupt

committer.append = interrupted
try:
    cache.put("interrupted", 1)
except KeyboardInterrupt:
    pass
try:
    cache.put("after", 2)
    print("acknowledged", flush=True)
except wbcache.LogFailedError:
    print("refused", flush=True)
cache.sync()  # returns: the interrupted LSN never reaches the log, and is not waited for
os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.parametrize("fsync", ["always", "interval"])
def test_a_write_interrupted_as_it_is_logged_leaves_no_hole_in_the_log(
        tmp_path: Path, fsync: str) -> None:
    path = tmp_path / "cache"
    result = subprocess.run([sys.executable, "-c", INTERRUPTED_THEN_KILLED, str(path), fsync],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == -signal.SIGKILL, result.stderr
    assert result.stdout == "refused\n"
    with wbcache.open(path) as reopened:  # no CorruptLogError: every acknowledged write
        assert {f"k{i}": reopened.get(f"k{i}") for i in range(20)} == {
            f"k{i}": i for i in range(20)}
        assert reopened.get("after") is None


def test_a_batch_interrupted_as_memory_takes_it_in_is_never_flushed_in_half(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "cache"
    cache = wbcache.open(path, flush_interval=3600)
    cache.put_many({f"k{i}": 0 for i in range(8)})
    sequencer = cache.sequencer
    remember = sequencer._remember
    calls = 0

    def interrupted_at_the_fourth(*args: Any) -> None:
        nonlocal calls
        calls += 1
        if calls == 4:
            raise KeyboardInterrupt
        remember(*args)

    sequencer._remember = interrupted_at_the_fourth  # type: ignore[method-assign]
    with caplog.at_level(logging.ERROR, logger="wbcache"):
        with pytest.raises(KeyboardInterrupt):
            cache.put_many({f"k{i}": 1 for i in range(8)})
        with pytest.raises(LogFailedError, match="interrupted"):
            cache.put("after", 2)
        with pytest.raises(FlushError, match="interrupted"):
            cache.flush()  # nothing is flushed from memory holding half the batch
        cache.sync()  # every write queued is fsync'd (the interrupted one may not be there)
        with pytest.raises(FlushError, match="interrupted"):
            cache.close()  # closed all the same: the log kept for the next open
        wait_until(lambda: [record for record in caplog.records
                            if "was interrupted" in record.getMessage()],
                   what="the error line")
    with wbcache.open(path) as reopened:  # the log replayed: the batch whole
        assert [reopened.get(f"k{i}") for i in range(8)] == [1] * 8


def test_a_writer_waiting_for_room_is_refused_when_a_write_is_interrupted(
        tmp_path: Path) -> None:
    """Backpressure is relieved only by a flush, which a torn sequencer no longer makes."""
    import threading

    cache = wbcache.open(tmp_path / "cache", flush_interval=3600, max_dirty=2)
    flusher_mutex = cache._flusher._mutex
    flusher_mutex.acquire()  # no flush relieves the backpressure meanwhile
    outcome: list[BaseException] = []
    try:
        cache.put("a", 1)
        cache.put("b", 2)  # max_dirty reached: the next writer waits for room

        def blocked() -> None:
            try:
                cache.put("c", 3)
            except BaseException as exc:
                outcome.append(exc)

        waiter = threading.Thread(target=blocked)
        waiter.start()
        wait_until(lambda: cache.sequencer._space._waiters, what="the writer waiting")  # type: ignore[attr-defined]
        with cache.sequencer.lock:
            cache.sequencer._tear(KeyboardInterrupt(), 3)
        waiter.join(10)
        assert not waiter.is_alive()
        assert len(outcome) == 1 and isinstance(outcome[0], LogFailedError)
    finally:
        flusher_mutex.release()
        with pytest.raises(FlushError):
            cache.close()
    assert os.listdir(tmp_path / "cache" / "wal")  # the log kept for the next open
