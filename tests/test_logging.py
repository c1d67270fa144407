"""What an operator sees in the logs (logger "wbcache" and its children): a recovery at open,
a database outage (the first failure, summaries while it lasts, its end), a failed log."""

from __future__ import annotations

import ast
import errno
import logging
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from controlled import ControlledBackend, wait_until

import wbcache
from wbcache import LogFailedError
from wbcache.wal.syscalls import SYSCALLS


@pytest.fixture
def backend(tmp_path: Path) -> Iterator[ControlledBackend]:
    controlled = ControlledBackend(tmp_path / "db")
    yield controlled
    controlled.failing = False
    controlled.close()


def messages(caplog: pytest.LogCaptureFixture, level: int) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.levelno == level
            and record.name.startswith("wbcache")]


def test_the_package_logger_has_a_null_handler_and_prints_nothing_by_itself() -> None:
    handlers = logging.getLogger("wbcache").handlers
    assert any(isinstance(handler, logging.NullHandler) for handler in handlers)


def test_a_recovery_at_open_is_logged_at_info(tmp_path: Path,
                                              caplog: pytest.LogCaptureFixture) -> None:
    directory = tmp_path / "cache"
    # A writer that dies without closing: 25 acknowledged writes only in the log.
    script = (f"import os, wbcache; c = wbcache.open({str(directory)!r}, flush_interval=3600)"
              f"; [c.put(f'k{{i}}', i) for i in range(25)]; os._exit(0)")
    subprocess.run([sys.executable, "-c", script], check=True)
    with caplog.at_level(logging.INFO, logger="wbcache"):
        wbcache.open(directory).close()
    lines = messages(caplog, logging.INFO)
    assert any("recovered" in line and "replayed 25 log records" in line for line in lines), \
        lines


def test_a_database_outage_is_logged_once_summarised_and_its_end_reported(
        backend: ControlledBackend, tmp_path: Path, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("wbcache.flusher.OUTAGE_REPORT_EVERY", 0.2)
    with caplog.at_level(logging.INFO, logger="wbcache"):
        with wbcache.open(tmp_path / "cache", backend=backend, flush_interval=0.05) as cache:
            backend.failing = True
            cache.put("k", 1)
            wait_until(lambda: len(messages(caplog, logging.WARNING)) >= 2, what="a summary")
            attempts = cache.stats()["flush_errors"]
            backend.failing = False
            wait_until(lambda: any("succeeded again" in line
                                   for line in messages(caplog, logging.INFO)))
    warnings = messages(caplog, logging.WARNING)
    assert "flush into the lmdb database failed" in warnings[0]
    assert "retrying" in warnings[0]
    assert "failing for" in warnings[1]
    assert len(warnings) < attempts  # rate-limited: far fewer lines than failed attempts


def test_a_failed_log_is_logged_at_error(tmp_path: Path,
                                         caplog: pytest.LogCaptureFixture) -> None:
    cache = wbcache.open(tmp_path / "cache")

    def failing_fdatasync(fd: int) -> None:
        raise OSError(errno.EIO, "injected fsync failure")

    SYSCALLS.fdatasync = failing_fdatasync  # type: ignore[method-assign]
    try:
        with caplog.at_level(logging.ERROR, logger="wbcache"):
            with pytest.raises(LogFailedError):
                cache.put("k", 1)
            # logged from a thread of its own, outside the cache's lock (the test below)
            wait_until(lambda: messages(caplog, logging.ERROR), what="the error line")
    finally:
        del SYSCALLS.fdatasync
    errors = messages(caplog, logging.ERROR)
    assert len(errors) == 1 and "the log failed" in errors[0] and "refused" in errors[0]
    try:
        cache.close()
    except LogFailedError:
        pass


# A handler that reads the cache, run when the log fails: before the fix it ran under the
# sequencer's lock, and the read of a key only the database holds waited on that lock forever.
HANDLER_READS_THE_CACHE = """
import errno, logging, sys
import wbcache
from wbcache.wal.syscalls import SYSCALLS

path, hook = sys.argv[1], sys.argv[2]
with wbcache.open(path) as cache:
    cache.put("cold", 7)
cache = wbcache.open(path)  # reopened: "cold" is in the database only
seen = []

class ReadsTheCache(logging.Handler):
    def emit(self, record):
        seen.append((record.getMessage(), cache.get("cold")))

logging.getLogger("wbcache").addHandler(ReadsTheCache())
def eio(*args):
    raise OSError(errno.EIO, "injected")
setattr(SYSCALLS, hook, eio)
try:
    cache.put("k", 1)
except wbcache.LogFailedError:
    pass
for thread in __import__("threading").enumerate():
    if thread.name == "wbcache-log":
        thread.join()
print(seen)
"""


@pytest.mark.parametrize("hook", ["fdatasync", "write_sync"])
def test_a_handler_may_read_the_cache_when_the_log_fails(tmp_path: Path, hook: str) -> None:
    result = subprocess.run([sys.executable, "-c", HANDLER_READS_THE_CACHE,
                             str(tmp_path / "cache"), hook],
                            capture_output=True, text=True, timeout=20)
    assert result.returncode == 0, result.stderr
    (message, value), = ast.literal_eval(result.stdout)
    assert "the log failed" in message and value == 7


# A handler that counts the flusher's warnings in the cache itself. Before the fix the
# flusher logged them in its own thread, holding its mutex: with the dirty set full, the
# handler's `incr` waited for room that only that thread's next flush could make, and every
# writer, flush() and close() hung for good, even once the database was back.
HANDLER_WRITES_THE_CACHE = """
import logging, sys, threading
from pathlib import Path
sys.path.insert(0, sys.argv[2])
from controlled import ControlledBackend, wait_until
import wbcache

root = Path(sys.argv[1])
backend = ControlledBackend(root / "db")
cache = wbcache.open(root / "cache", backend=backend, flush_interval=3600, max_dirty=4,
                     flush_threshold=4, flush_timeout=10)
counted = threading.Event()

class CountsWarnings(logging.Handler):
    def emit(self, record):
        if record.levelno >= logging.WARNING:
            cache.incr("warnings")
            counted.set()

logging.getLogger("wbcache").addHandler(CountsWarnings())
backend.failing = True
for i in range(4):  # the dirty set full: the flusher is woken, fails, warns
    cache.put(f"k{i}", i)
wait_until(lambda: cache.stats()["flush_errors"], what="a failed flush")
backend.failing = False
cache.flush(timeout=10)
assert counted.wait(10), "the handler's write never landed"
cache.close()
with wbcache.open(root / "cache", backend=backend) as reopened:
    print(sorted(reopened.items()))
"""


def test_a_handler_may_write_to_the_cache_when_a_flush_fails(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-c", HANDLER_WRITES_THE_CACHE, str(tmp_path),
                             str(Path(__file__).parent)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    items = dict(ast.literal_eval(result.stdout))
    assert {key: items[key] for key in ("k0", "k1", "k2", "k3")} == {
        "k0": 0, "k1": 1, "k2": 2, "k3": 3}
    assert items["warnings"] >= 1


# The flusher's warning is said in the flusher's thread, a daemon: the thread that logs it took
# that flag from it, and an exit right after the failure lost the line (a filter that takes a
# moment; a handler's own lock holds the exit up, as logging.shutdown takes it). The process
# ends normally as soon as a flush has failed.
LINE_AT_EXIT = """
import logging, sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[2])
from controlled import ControlledBackend, wait_until
import wbcache

root = Path(sys.argv[1])
backend = ControlledBackend(root / "db")
cache = wbcache.open(root / "cache", backend=backend, flush_interval=0.01)

class ToAFile(logging.Handler):
    def emit(self, record):
        with open(root / "lines", "a") as file:
            file.write(record.getMessage() + "\\n")

def slowly(record):  # a filter that takes a moment (one that looks something up, say)
    time.sleep(0.3)
    return True

logging.getLogger("wbcache").addHandler(ToAFile(logging.WARNING))
logging.getLogger("wbcache.flusher").addFilter(slowly)
backend.failing = True
cache.put("k", 1)
wait_until(lambda: cache.stats()["flush_errors"], what="a failed flush")
"""


def test_a_line_said_by_the_flusher_is_logged_though_the_process_exits_at_once(
        tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-c", LINE_AT_EXIT, str(tmp_path),
                             str(Path(__file__).parent)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    lines = (tmp_path / "lines").read_text() if (tmp_path / "lines").exists() else ""
    assert "flush into the lmdb database failed" in lines
