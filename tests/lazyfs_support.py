"""What the LazyFS test files share: the binary (found, or the tests skip with the reason;
under WBCACHE_REQUIRE_SERVICES=1, as in CI, they fail), and the processes a run left behind.

The fixture is named `*_fixture` so that a test module imports it (which registers it under
its `name`) without its test parameters shadowing an imported name (as pg_support.py does).
"""

from __future__ import annotations

import os

import pytest
from conftest import require_service

from wbcache.fault_injection.lazyfs_config import LazyfsUnavailable, locate_lazyfs


@pytest.fixture(scope="module", name="lazyfs_binary")
def lazyfs_binary_fixture() -> str:
    try:
        return locate_lazyfs(None)
    except LazyfsUnavailable as exc:
        require_service("LazyFS", str(exc))
        raise  # unreachable: require_service skips or fails


def processes_naming(text: str) -> list[int]:
    """Pids of live processes whose command line contains `text` (this run's scratch path)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as cmdline:
                if text.encode() in cmdline.read():
                    found.append(int(entry))
        except OSError:  # gone meanwhile
            continue
    return found
