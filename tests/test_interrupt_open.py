"""An interrupt (KeyboardInterrupt, a signal handler's exception) at every point of an open that
replays a log (tests/interrupt_support.py): the replay may have committed all, part or none of
it. The next open in the same process must work (nothing left locked or open) and find every
acknowledged write exactly once, increments included, for a single-owner directory and a
shared one (whose database adds increments as deltas). An open interrupted as its lock was
returned held it for the rest of the process (a shared directory's next open then took a new
lane, and the writes in the old one's log were not to be seen); one interrupted as the built
cache was returned released the directory under the cache's running threads."""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from pg_support import pg_dsn_fixture, pg_schema_fixture, query, table_fixture  # noqa: F401

import wbcache
from tests.interrupt_support import code_of, every_point
from wbcache import directory, lanes
from wbcache.backends.lmdb import LmdbDatabase, SharedLmdbBackend, shared_database
from wbcache.backends.postgres import PostgresBackend
from wbcache.cache import Cache
from wbcache.recovery import apply_changes, replay_into
from wbcache.recovery.replay import Replay

INCREMENTS = 3


def _crashed_directory(path: Path, options: str) -> None:
    """A directory whose log holds writes the database lacks: written by a process that
    exits without closing (os._exit: no flush, no close). `options`: wbcache.open's, as
    Python source."""
    script = textwrap.dedent(f"""
        import os, wbcache
        cache = wbcache.open({str(path)!r}, flush_interval=3600, {options})
        cache.put("k", "v")
        for _ in range({INCREMENTS}):
            cache.incr("n")
        cache.delete("k")
        cache.put("k", "w")
        os._exit(0)
    """)
    subprocess.run([sys.executable, "-c", script], check=True, timeout=60)


def _open_and_close(path: Path, options: dict[str, Any]) -> None:
    wbcache.open(path, **options).close()


def _threads_of_a_cache(before: set[threading.Thread]) -> list[str]:
    """The background threads of a cache started since `before` and still running."""
    return [thread.name for thread in threading.enumerate()
            if thread.name in ("wbcache-flusher", "wbcache-fsync") and thread not in before]


# Not `wbcache.open`: an interrupt as it returns the cache it built loses it to its caller, as
# with any object a call returns (it is closed only when the process ends).
CODES = [code_of(function) for function in (
    Cache.open, directory.open_directory, directory._open_shared, replay_into,
    Replay.frame, Replay.finish, Replay._apply, apply_changes, LmdbDatabase.write,
    SharedLmdbBackend.apply, shared_database, lanes.claim, lanes.take, Cache._start,
    Cache._abandon)]


@pytest.mark.parametrize("kind", ["single-owner", "shared", "postgresql"])
def test_an_interrupted_replay_leaves_every_write_once_for_the_next_open(
        tmp_path: Path, kind: str, request: pytest.FixtureRequest) -> None:
    options: dict[str, Any] = {"shared": kind == "shared"}
    codes = CODES
    start_afresh: Callable[[], object] = lambda: None  # noqa: E731
    if kind == "postgresql":  # its fixtures only here: the others need no server
        dsn, table = request.getfixturevalue("pg_dsn"), request.getfixturevalue("table")
        options = {"backend": f"{dsn}?table={table}"}
        codes = CODES + [code_of(function) for function in (
            PostgresBackend.apply, PostgresBackend.attach, PostgresBackend.checkpoint,
            PostgresBackend._settle, PostgresBackend._save_known)]

        def start_afresh() -> None:  # each copy of the directory is the one that crashed
            for name in (table, f"{table}_checkpoints"):
                query(dsn, f"DELETE FROM {name}")

    template = tmp_path / "template"
    _crashed_directory(template, ", ".join(f"{name}={value!r}"
                                           for name, value in options.items()))
    points = 0
    before = set(threading.enumerate())  # another test's, in this process
    for point in every_point(codes):
        path = tmp_path / f"c{points}"
        shutil.copytree(template, path, symlinks=True)
        start_afresh()
        point.run(_open_and_close, path, options)
        assert not _threads_of_a_cache(before), point.fired_in  # none left running, unreachable
        with wbcache.open(path, **options) as cache:
            assert cache.get("n") == INCREMENTS, point.fired_in
            assert cache.get("k") == "w", point.fired_in
        shutil.rmtree(path)
        points += 1
    assert points > 20


def test_a_lock_taken_in_a_block_that_raises_is_let_go_with_scopes_nested(
        tmp_path: Path) -> None:
    """Scopes were told apart by equality: an inner one that took nothing removed the outer
    one's empty list, and the outer's exit then failed (ValueError) with its lock held."""
    from wbcache.lock import DirectoryLock, taking

    path = str(tmp_path / "LOCK")
    with pytest.raises(KeyboardInterrupt):
        with taking():
            with taking():  # e.g. a signal handler's open that took no lock
                pass
            DirectoryLock.acquire(path)  # unbound: an interrupt as it returned
            raise KeyboardInterrupt
    DirectoryLock.acquire(path).release()  # free again in this process
