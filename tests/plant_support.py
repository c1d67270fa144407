"""Shared by the tests of planted entries (tests/test_hostile_dirs.py,
tests/test_planted_db_files.py, tests/test_planted_lane_wal.py); it holds no tests.

A plant points at a file outside the cache (think /etc/shadow): `make_outside` makes one, and
`state_of` records a tree without opening anything a plant could be, so that a test can say
the target kept its bytes and mtime and the cache directory did not change.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

SECRET = b"root:$6$not-a-real-hash:19000:0:99999:7:::\n"

# The operating commands that only read; with the three recovers, every command that takes a
# directory. "{DIR}" marks where the directory goes when it is not last.
READ_COMMANDS = (("inspect",), ("verify",), ("stats",), ("dump",), ("dump", "--pending"),
                 ("get", "{DIR}", "key-1"))
ALL_COMMANDS = (("recover",), ("recover", "--dry-run"), ("recover", "--salvage", "--yes"),
                *READ_COMMANDS)


def argv(command: tuple[str, ...], directory: Path) -> list[str]:
    if "{DIR}" in command:
        return [str(directory) if part == "{DIR}" else part for part in command]
    return [*command, str(directory)]


def make_outside(tmp_path: Path) -> Path:
    """A private directory outside the cache holding a root-only file, `secret`, its mtime
    set in the past so that any write shows."""
    where = tmp_path / "outside"
    where.mkdir(mode=0o700)
    secret = where / "secret"
    secret.write_bytes(SECRET)
    secret.chmod(0o600)
    os.utime(secret, ns=(1_000_000_000_000_000_000, 1_000_000_000_000_000_000))
    return where


def state_of(root: Path) -> dict[str, Any]:
    """Every entry under `root` (itself included): its kind, mode, owner, size and mtime, and a
    regular file's bytes or a link's target. Opens nothing else: reading a planted FIFO would
    block, and links are not followed (what they point at is checked on its own)."""
    state: dict[str, Any] = {}
    for path in [root, *sorted(root.rglob("*"))] if root.is_dir() else [root]:
        info = path.lstat()
        content: Any = None
        if stat.S_ISREG(info.st_mode):
            content = path.read_bytes()
        elif stat.S_ISLNK(info.st_mode):
            content = os.readlink(path)
        state[str(path.relative_to(root))] = (info.st_mode, info.st_uid, info.st_size,
                                              info.st_mtime_ns, content)
    return state


def feed_fifos(root: Path) -> None:
    """Open every FIFO under `root` for writing and write a page of zeros into it: a reader
    blocked in open() goes on (and then reads EOF), one blocked in read() gets bytes. For an
    autouse fixture's teardown, so that a command a failing test left blocked on a planted
    FIFO ends."""
    for fifo in root.rglob("*"):
        if stat.S_ISFIFO(fifo.lstat().st_mode):
            try:
                fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            except OSError:  # ENXIO: nobody is waiting on it
                continue
            try:
                os.write(fd, bytes(4096))
            except OSError:  # EAGAIN: the pipe is full
                pass
            finally:
                os.close(fd)
