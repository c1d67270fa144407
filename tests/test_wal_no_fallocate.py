"""File systems without fallocate(2) (ext2, ext3, FUSE, NFS before 4.2) under fsync="interval":
the mapped segment's windows are reserved by writing their zeros (wal/syscalls.py, `_reserve`).

Extending the file alone, as before, left a hole. A local file system that allocates a page
when it is first written then met a full disk at the put that copied into the hole: a SIGBUS,
the process killed. tmpfs allocates the same way, so with fallocate reported unsupported it
stands in for ext2/ext3 here: a cache on a 1.5 MiB tmpfs puts until the disk is full and must
end with `LogFailedError` (every acknowledged put there after a reopen), not a signal. Mounting
needs root, as in CI; elsewhere that test skips, and `.ci/run` makes the skip fail.
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import require_service

import wbcache
from wbcache.wal import syscalls

REPO = Path(__file__).resolve().parent.parent
MiB = 1024 * 1024
VALUE_SIZE = 10_000


def unsupported(fd: int, mode: int, offset: int, length: int) -> int:
    """fallocate(2) as ext2/ext3, FUSE and older NFS answer it."""
    ctypes.set_errno(errno.EOPNOTSUPP)
    return -1


@pytest.fixture
def on_tmpfs() -> Iterator[Path]:
    """A scratch directory on the tmpfs at /dev/shm. Its blocks count what was written: a
    file system that compresses or deduplicates zeros (ZFS, btrfs with compression) would
    store the window's written zeros as a hole as well, so the count there proves nothing."""
    mounts = Path("/proc/mounts").read_text() if Path("/proc/mounts").exists() else ""
    if not any(line.split()[1:3] == ["/dev/shm", "tmpfs"] for line in mounts.splitlines()):
        require_service("a tmpfs at /dev/shm", "it counts written zeros as allocated blocks")
    path = Path(tempfile.mkdtemp(prefix="wbcache-test-", dir="/dev/shm"))
    yield path
    shutil.rmtree(path)


def test_without_fallocate_a_reserved_window_is_allocated_zeros(
        on_tmpfs: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(syscalls, "_fallocate", unsupported)
    fd = os.open(on_tmpfs / "segment", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.write(fd, b"header")
        syscalls.SYSCALLS.reserve(fd, 6, MiB)
        status = os.fstat(fd)
        assert status.st_size == MiB
        assert status.st_blocks * 512 >= MiB  # blocks allocated, not a hole
        assert os.pread(fd, MiB, 0) == b"header" + bytes(MiB - 6)  # what was there is kept
        assert os.lseek(fd, 0, os.SEEK_CUR) == 6  # the descriptor's offset is not moved
    finally:
        os.close(fd)


# Puts 10 kB values with fallocate reported unsupported until a put fails; prints the count
# acknowledged (each line once its put has returned), then how it ended.
FILLER = textwrap.dedent(f"""
    import ctypes, errno, sys
    from wbcache.wal import syscalls

    def unsupported(fd, mode, offset, length):
        ctypes.set_errno(errno.EOPNOTSUPP)
        return -1

    syscalls._fallocate = unsupported
    import wbcache
    from wbcache.errors import LogFailedError

    cache = wbcache.open(sys.argv[1], fsync="interval", fsync_interval=3600,
                         flush_interval=3600, flush_timeout=1)
    acknowledged = 0
    try:
        while True:
            cache.put(f"k{{acknowledged}}", bytes([acknowledged % 251]) * {VALUE_SIZE})
            acknowledged += 1
            print(acknowledged, flush=True)
    except LogFailedError as exc:
        print("failed:", exc, flush=True)
    try:
        cache.close()  # its flush: the database, on the same full disk, refuses it
    except wbcache.FlushError as exc:
        print("close:", exc, flush=True)
""")


@pytest.fixture
def tiny_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 1.5 MiB tmpfs: room for the log's first 1 MiB window and not for the second."""
    mount = tmp_path / "tiny"
    mount.mkdir()
    if os.geteuid() != 0:
        require_service("root", "mounting a small tmpfs needs it")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1536k,mode=0700", "tmpfs",
                           str(mount)], capture_output=True, text=True)
    if done.returncode != 0:
        require_service("mount -t tmpfs", done.stderr.strip())
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_a_full_disk_without_fallocate_fails_the_log_instead_of_killing_the_process(
        tiny_tmpfs: Path, tmp_path: Path) -> None:
    cache_dir = tiny_tmpfs / "cache"
    done = subprocess.run([sys.executable, "-c", FILLER, str(cache_dir)], capture_output=True,
                          text=True, timeout=60, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])  # -7 was SIGBUS
    lines = [line for line in done.stdout.split("\n") if not line.startswith("close:")]
    assert lines[-2].startswith("failed:") and "No space left" in lines[-2], lines[-3:]
    acknowledged = int(lines[-3])
    assert acknowledged >= MiB // (VALUE_SIZE + 100)  # the first window's worth, at least
    copy = tmp_path / "copy"
    shutil.copytree(cache_dir, copy)  # the full tmpfs has no room for the reopen's replay
    with wbcache.open(copy) as cache:
        assert [cache.get(f"k{i}") == bytes([i % 251]) * VALUE_SIZE
                for i in range(acknowledged)] == [True] * acknowledged
        assert cache.get(f"k{acknowledged}") is None
