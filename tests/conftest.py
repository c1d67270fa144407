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
from plant_support import make_outside
from ram_support import RAM_DIR

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


_CALL_FAILED = pytest.StashKey[bool]()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[Any]:
    outcome = yield
    report = outcome.get_result()
    if report.when == "call":
        item.stash[_CALL_FAILED] = report.failed


@pytest.fixture
def ram_path(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Path]:
    """A fresh empty directory in RAM where there is a tmpfs, else tmp_path (which tests
    may use for this, see ram_support.py). Removed at teardown, RAM not being reclaimed
    otherwise, unless the test failed: the evidence its campaign kept there stays."""
    if RAM_DIR is None:
        yield tmp_path
        return
    path = Path(tempfile.mkdtemp(prefix="wbcache-test-", dir=RAM_DIR))
    yield path
    if not request.node.stash.get(_CALL_FAILED, True):
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


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """What a planted link points at (tests/plant_support.py)."""
    return make_outside(tmp_path)
