"""Shared fixtures.

Tests that need a server (PostgreSQL) call `require_service`: on a machine without it they skip,
but CI sets WBCACHE_REQUIRE_SERVICES=1 (see .ci/run) and a missing server is then a failure.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import wbcache


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--soak", action="store_true", help="also run long soak tests")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--soak"):
        return
    skip = pytest.mark.skip(reason="soak test: run with --soak")
    for item in items:
        if "soak" in item.keywords:
            item.add_marker(skip)


def require_service(name: str, reason: str) -> None:
    """Skip (fail under WBCACHE_REQUIRE_SERVICES=1) a test whose server is unavailable."""
    if os.environ.get("WBCACHE_REQUIRE_SERVICES") == "1":
        pytest.fail(f"{name} is required here (WBCACHE_REQUIRE_SERVICES=1): {reason}")
    pytest.skip(f"{name} not available: {reason}")


def _tmpfs(path: str) -> bool:
    try:
        with open("/proc/self/mounts") as mounts:
            return any(line.split()[1:3] == [path, "tmpfs"] for line in mounts)
    except OSError:
        return False


@pytest.fixture
def ram_path(tmp_path: Path) -> Iterator[Path]:
    """A fresh empty directory in RAM (/dev/shm, a tmpfs) where there is one, else tmp_path.

    Only for tests whose claims are about bytes and logic, not about the disk: recovery of
    damaged logs, faults injected in this process, power loss simulated by the disk model.
    There each open of a cache costs several fsyncs that prove nothing, and on a busy disk
    they were most of the test's time. Tests of durability on the real disk (strace, LazyFS,
    SIGKILLed processes) keep tmp_path. Removed at teardown: RAM is not reclaimed otherwise.
    """
    if not _tmpfs("/dev/shm"):
        yield tmp_path
        return
    path = Path(tempfile.mkdtemp(prefix="wbcache-test-", dir="/dev/shm"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    return tmp_path / "cache"


@pytest.fixture
def open_cache(cache_dir: Path) -> Iterator[Callable[..., wbcache.Cache]]:
    """Open caches (default: at cache_dir) and close every one still open at teardown."""
    opened: list[wbcache.Cache] = []

    def _open(path: Path | None = None, **options: Any) -> wbcache.Cache:
        cache = wbcache.open(path or cache_dir, **options)
        opened.append(cache)
        return cache

    yield _open
    for cache in opened:
        cache.close()
