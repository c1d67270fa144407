"""An open that fails part-way leaves nothing behind: no descriptor, no running thread, the
directory free, every acknowledged write still there for the next open."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

import wbcache
from wbcache.flusher import Flusher, IntervalSyncer


def descriptors() -> set[str]:
    """What this process's descriptors lead to (the listing's own descriptor left out)."""
    found = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            found.add(f"{fd} -> {os.readlink(f'/proc/self/fd/{fd}')}")
        except FileNotFoundError:
            pass
    return found


def wbcache_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("wbcache")]


@pytest.mark.parametrize("fsync, failing", [("always", Flusher), ("interval", Flusher),
                                            ("interval", IntervalSyncer)])
def test_a_thread_that_cannot_start_leaves_no_descriptor_and_no_thread(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fsync: str, failing: type) -> None:
    """The threads start last in `Cache.__init__`, after the log's writer opened its segment and
    its wal/ directory: a thread the interpreter cannot start (RuntimeError, as under a thread
    limit) left both descriptors open for good, and, when the fsync thread failed, the flusher
    running on. Now the open raises, closes them, stops the flusher, and frees the directory."""
    path = tmp_path / "c"
    options = {"fsync": fsync}
    with wbcache.open(path, **options) as cache:
        cache.put("kept", 1)
    before_fds, before_threads = descriptors(), wbcache_threads()

    def cannot_start(self: object) -> None:
        raise RuntimeError("can't start new thread")

    with monkeypatch.context() as patch:
        patch.setattr(failing, "start", cannot_start)
        with pytest.raises(RuntimeError, match="can't start new thread"):
            wbcache.open(path, **options)

    assert descriptors() - before_fds == set()
    assert wbcache_threads() == before_threads
    with wbcache.open(path, **options) as cache:  # the directory is free again
        assert cache["kept"] == 1
