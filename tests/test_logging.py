"""What an operator sees in the logs (logger "wbcache" and its children): a recovery at open,
a database outage (the first failure, summaries while it lasts, its end), a failed log."""

from __future__ import annotations

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
    finally:
        del SYSCALLS.fdatasync
    errors = messages(caplog, logging.ERROR)
    assert len(errors) == 1 and "the log failed" in errors[0] and "refused" in errors[0]
    try:
        cache.close()
    except LogFailedError:
        pass
