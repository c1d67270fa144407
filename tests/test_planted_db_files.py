"""LMDB's own files in db/ (data.mdb, lock.mdb) are never opened through a planted entry.

LMDB opens them by path: it follows a link (and would overwrite the file it names: it
initialises lock.mdb), and blocks forever on a FIFO. So before any open of the environment
(`wbcache.open`, a shared open, every CLI command, `LmdbBackend` itself) each must be absent
or a regular file of the user's (`layout.check_library_files`), as LOCK, cache_id and backend
must. A plant is refused with an `InvalidDirectoryError` naming it (exit 2 and one line from
the CLI), and the file it points at keeps its bytes and mtime.
"""

from __future__ import annotations

import os
import pickle
import select
import signal
import stat
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any, TypeVar, cast

import pytest
from cli_support import DRIVERS, assert_one_line_error, run, three_segment_log
from plant_support import ALL_COMMANDS, argv, feed_fifos, state_of

import wbcache
from wbcache.errors import InvalidDirectoryError

_T = TypeVar("_T")
KIND_WORDS = {"symlink": "symbolic link", "dangling symlink": "symbolic link", "fifo": "FIFO",
              "device": "device", "hard link": "hard link"}


@pytest.fixture(autouse=True)
def release_blocked_readers(tmp_path: Path) -> Iterator[None]:
    yield
    feed_fifos(tmp_path)


def plant(path: Path, kind: str, outside: Path) -> None:
    """Put a `kind` entry at `path` in place of the file there."""
    if path.is_symlink() or path.exists():
        path.unlink()
    if kind == "symlink":
        path.symlink_to(outside / "secret")
    elif kind == "dangling symlink":
        path.symlink_to(outside / "created-through-a-link")
    elif kind == "fifo":
        os.mkfifo(path, 0o600)
    elif kind == "device":  # /dev/null's numbers: opening it is harmless even if it happened
        os.mknod(path, stat.S_IFCHR | 0o600, os.makedev(1, 3))
    elif kind == "hard link":
        os.link(outside / "secret", path)
    else:
        raise AssertionError(kind)


def off_main(call: Callable[[], _T], seconds: float = 30.0) -> _T:
    """`call()` in a forked child, its result (or its InvalidDirectoryError) returned (raised)
    here; fail if it has not ended after `seconds` (the child is killed). LMDB can block on a
    planted FIFO inside a call that holds the GIL, where no alarm or thread of this process
    could end it."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            os.close(read_end)
            try:
                outcome: tuple[Any, ...] = ("returned", call())
            except BaseException as exc:  # whatever it is, the parent reports it
                outcome = ("raised", type(exc).__name__, str(exc))
            with os.fdopen(write_end, "wb") as out:
                pickle.dump(outcome, out)
        finally:
            os._exit(0)
    os.close(write_end)
    try:
        poller = select.poll()
        poller.register(read_end, select.POLLIN)
        if not poller.poll(seconds * 1000):
            os.kill(pid, signal.SIGKILL)
            pytest.fail(f"blocked for over {seconds} s: a planted FIFO was opened")
        with os.fdopen(read_end, "rb", closefd=False) as results:
            outcome = pickle.load(results)
    finally:
        os.close(read_end)
        os.waitpid(pid, 0)
    if outcome[0] == "returned":
        return cast(_T, outcome[1])
    if outcome[1] == InvalidDirectoryError.__name__:
        raise InvalidDirectoryError(outcome[2])
    raise AssertionError(f"{outcome[1]}: {outcome[2]}")


def refused(call: Any, *fragments: str) -> str:
    """Run `call` (`off_main`), which must raise InvalidDirectoryError holding `fragments`
    without blocking; return the message."""
    with pytest.raises(InvalidDirectoryError) as caught:
        off_main(call)
    message = str(caught.value)
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    assert "not-a-real-hash" not in message  # the target's content never reaches a message
    return message


def closed_cache(path: Path, *, shared: bool = False) -> Path:
    with wbcache.open(path, shared=shared) as cache:
        cache.put("a", 1)
    return path


# ------------------------------------------------------------------ the library


@pytest.mark.parametrize("name", ["data.mdb", "lock.mdb"])
@pytest.mark.parametrize("kind", ["symlink", "dangling symlink", "fifo", "device", "hard link"])
def test_open_refuses_a_planted_database_file_and_its_target_is_untouched(
        tmp_path: Path, outside: Path, name: str, kind: str) -> None:
    path = closed_cache(tmp_path / "cache")
    plant(path / "db" / name, kind, outside)

    before = state_of(outside)
    refused(lambda: wbcache.open(path), str(path / "db" / name), KIND_WORDS[kind],
            "remove it")
    assert state_of(outside) == before
    assert not (outside / "created-through-a-link").exists()


@pytest.mark.parametrize("name", ["data.mdb", "lock.mdb"])
def test_a_shared_open_refuses_a_planted_database_file(tmp_path: Path, outside: Path,
                                                       name: str) -> None:
    path = closed_cache(tmp_path / "shared", shared=True)
    plant(path / "db" / name, "symlink", outside)

    before = state_of(outside)
    refused(lambda: wbcache.open(path, shared=True), str(path / "db" / name),
            "symbolic link")
    assert state_of(outside) == before


def test_a_read_only_lmdb_backend_refuses_a_fifo_instead_of_blocking(tmp_path: Path,
                                                                      outside: Path) -> None:
    path = closed_cache(tmp_path / "cache")
    plant(path / "db" / "data.mdb", "fifo", outside)

    refused(lambda: wbcache.LmdbBackend(str(path / "db"), readonly=True, lock=False),
            str(path / "db" / "data.mdb"), "FIFO")


def test_missing_database_files_are_still_created(tmp_path: Path) -> None:
    # Absent is fine: LMDB makes them, in a db/ only the user can write in.
    path = closed_cache(tmp_path / "cache")
    for name in ("data.mdb", "lock.mdb"):
        (path / "db" / name).unlink()

    with wbcache.open(path) as cache:
        cache.put("b", 2)
    assert all((path / "db" / name).is_file() for name in ("data.mdb", "lock.mdb"))


# ------------------------------------------------------------------ the operating commands


@pytest.mark.parametrize("driver", DRIVERS)
@pytest.mark.parametrize(("name", "kind"), [("data.mdb", "symlink"), ("data.mdb", "fifo"),
                                            ("data.mdb", "dangling symlink"),
                                            ("lock.mdb", "symlink")])
def test_every_command_refuses_a_planted_database_file_in_one_line(
        tmp_path: Path, outside: Path, driver: str, name: str, kind: str) -> None:
    path = tmp_path / "cache"
    three_segment_log(path)  # records to replay: recover would write
    plant(path / "db" / name, kind, outside)

    before = state_of(outside), state_of(path)
    results = [off_main(partial(run, driver, *argv(command, path))) for command in ALL_COMMANDS]
    for command, result in zip(ALL_COMMANDS, results, strict=True):
        assert_one_line_error(result, 2, str(path / "db" / name), KIND_WORDS[kind])
        assert "not-a-real-hash" not in result.stdout + result.stderr, command
    assert (state_of(outside), state_of(path)) == before


@pytest.mark.parametrize("driver", DRIVERS)
def test_read_only_commands_on_a_shared_directory_refuse_a_planted_lock_mdb(
        tmp_path: Path, outside: Path, driver: str) -> None:
    # A shared directory's database is read as its caches read it, writing lock.mdb's
    # reader table: through a planted link that would overwrite the file it names.
    path = closed_cache(tmp_path / "shared", shared=True)
    plant(path / "db" / "lock.mdb", "symlink", outside)

    before = state_of(outside)
    for command in (("inspect",), ("dump",), ("get", "{DIR}", "a")):
        result = run(driver, *argv(command, path))
        assert_one_line_error(result, 2, str(path / "db" / "lock.mdb"), "symbolic link")
    assert state_of(outside) == before
