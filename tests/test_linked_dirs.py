"""A wal/ or db/ that is a symbolic link belongs to one cache directory (wbcache/layout.py).

README allows the log (or the database) on another disk through a link. A copy of such a
directory made with `cp -a` keeps the link, and each copy takes only its own LOCK: opening
the copy replayed the original's acknowledged, unflushed writes into the COPY's database and
deleted them from the one log both use; the original then refused to open ("records missing"),
or, with both open at once, lost its writes to a segment the copy had deleted. The linked
directory now names the directory that uses it (`OWNER`), and another directory linking to it
is refused while that one still links there; a directory moved takes its link over.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from cli_support import DRIVERS, assert_one_line_error, run
from plant_support import state_of

import wbcache
from wbcache.errors import InvalidDirectoryError
from wbcache.layout import Layout, check_linked_dirs
from wbcache.maintenance import recover_directory

WRITER = """
import os, signal, sys, wbcache
cache = wbcache.open(sys.argv[1], flush_interval=3600)
for n in range(100):
    cache.put(f"x{n}", n)  # acknowledged: fsync'd, none flushed
print("acknowledged", flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def linked_cache(tmp_path: Path, name: str) -> tuple[Path, Path]:
    """(a cache directory whose `name` (wal or db) is a link, the directory it links to);
    opened once and closed."""
    original, target = tmp_path / "original", tmp_path / f"elsewhere-{name}"
    original.mkdir(mode=0o700)
    target.mkdir(mode=0o700)
    (original / name).symlink_to(target)
    with wbcache.open(original) as cache:
        cache.put("base", 0)
    return original, target


def copy_keeping_links(source: Path, copy: Path) -> None:
    shutil.copytree(source, copy, symlinks=True)  # what `cp -a` does with the link
    copy.chmod(0o700)


def killed_writer(path: Path) -> None:
    done = subprocess.run([sys.executable, "-c", WRITER, str(path)], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == -signal.SIGKILL and "acknowledged" in done.stdout, done.stderr


@pytest.mark.parametrize("name", ["wal", "db"])
def test_a_copy_sharing_the_original_link_is_refused_and_the_original_loses_nothing(
        tmp_path: Path, name: str) -> None:
    original, target = linked_cache(tmp_path, name)
    copy = tmp_path / "copy"
    copy_keeping_links(original, copy)
    killed_writer(original)  # 100 acknowledged writes, only in the log
    before = state_of(target)

    with pytest.raises(InvalidDirectoryError) as refused:
        wbcache.open(copy)
    assert str(original) in str(refused.value) and "cannot share" in str(refused.value)
    assert state_of(target) == before  # the copy replayed and deleted nothing
    with wbcache.open(original) as cache:
        assert [cache.get(f"x{n}") for n in range(100)] == list(range(100))


def test_a_copy_is_refused_while_the_original_is_open(tmp_path: Path) -> None:
    original, _ = linked_cache(tmp_path, "wal")
    copy = tmp_path / "copy"
    copy_keeping_links(original, copy)
    with wbcache.open(original) as cache:
        cache.put("k", 1)
        with pytest.raises(InvalidDirectoryError, match="cannot share"):
            wbcache.open(copy)
        cache.put("k", 2)
    with wbcache.open(original) as cache:
        assert cache.get("k") == 2


@pytest.mark.parametrize("driver", DRIVERS)
def test_recover_of_the_copy_is_refused_with_one_line_and_changes_nothing(
        tmp_path: Path, driver: str) -> None:
    original, target = linked_cache(tmp_path, "wal")
    copy = tmp_path / "copy"
    copy_keeping_links(original, copy)
    killed_writer(original)
    before = state_of(target), state_of(copy)

    with pytest.raises(InvalidDirectoryError, match="cannot share"):
        recover_directory(copy)
    for options in ((), ("--dry-run",), ("--salvage", "--yes")):
        result = run(driver, "recover", *options, str(copy))
        assert_one_line_error(result, 2, "cannot share one log", str(original))
    for command in ("inspect", "verify", "dump"):  # read-only: not the original's as its own
        assert_one_line_error(run(driver, command, str(copy)), 2, "cannot share one log")
    assert (state_of(target), state_of(copy)) == before
    with wbcache.open(original) as cache:
        assert cache.get("x99") == 99


def owner_path(target: Path) -> str:
    return os.fsdecode(bytes.fromhex((target / "OWNER").read_text().split()[2]))


def test_a_directory_moved_within_its_file_system_keeps_its_link(tmp_path: Path) -> None:
    original, target = linked_cache(tmp_path, "wal")
    killed_writer(original)
    moved = tmp_path / "moved"
    os.rename(original, moved)  # the same directory (its inode): not a copy

    with wbcache.open(moved) as cache:
        assert cache.get("x42") == 42
    assert owner_path(target) == str(moved)
    copy = tmp_path / "copy-of-moved"
    copy_keeping_links(moved, copy)
    with pytest.raises(InvalidDirectoryError, match=str(moved)):
        wbcache.open(copy)


def test_the_same_directory_by_another_path_is_not_a_copy(tmp_path: Path) -> None:
    original, _ = linked_cache(tmp_path, "wal")
    other_path = tmp_path / "another-path"
    other_path.symlink_to(tmp_path)  # a bind mount or a volume mounted elsewhere, in effect
    with wbcache.open(other_path / "original") as cache:
        assert cache.get("base") == 0
    with wbcache.open(original) as cache:
        assert cache.get("base") == 0


def test_a_copy_whose_original_moved_away_is_refused_and_the_original_keeps_its_writes(
        tmp_path: Path) -> None:
    # A review's case: cp -a a b; mv a a2. b found a's path gone and took the log over,
    # replaying a's writes into b's database and deleting them; a2 then refused to open.
    original, target = linked_cache(tmp_path, "wal")
    copy = tmp_path / "copy"
    copy_keeping_links(original, copy)
    killed_writer(original)
    moved = tmp_path / "moved"
    os.rename(original, moved)
    before = state_of(target)

    with pytest.raises(InvalidDirectoryError, match="remove .*OWNER"):
        wbcache.open(copy)
    assert state_of(target) == before
    with wbcache.open(moved) as cache:
        assert [cache.get(f"x{n}") for n in range(100)] == list(range(100))


def test_a_directory_restored_elsewhere_opens_once_told_so(tmp_path: Path) -> None:
    original, target = linked_cache(tmp_path, "wal")
    killed_writer(original)
    restored = tmp_path / "restored"
    copy_keeping_links(original, restored)  # a new directory: a backup put back
    shutil.rmtree(original)

    with pytest.raises(InvalidDirectoryError, match="remove .*OWNER"):
        wbcache.open(restored)
    (target / "OWNER").unlink()  # what the refusal says to do
    with wbcache.open(restored) as cache:
        assert cache.get("x99") == 99


def test_a_path_that_is_not_ascii_reopens(tmp_path: Path) -> None:
    # OWNER held the path as UTF-8, and was then refused as "not ASCII text" by every open.
    root = tmp_path / "café"
    root.mkdir()
    original, _ = linked_cache(root, "wal")
    with wbcache.open(original) as cache:
        assert cache.get("base") == 0


def test_the_copy_opens_once_given_a_log_of_its_own(tmp_path: Path) -> None:
    # What the refusal tells the user to do.
    original, target = linked_cache(tmp_path, "wal")
    copy = tmp_path / "copy"
    copy_keeping_links(original, copy)
    killed_writer(original)
    (copy / "wal").unlink()
    shutil.copytree(target, copy / "wal")

    with wbcache.open(copy) as cache:
        assert cache.get("x7") == 7
    with wbcache.open(original) as cache:
        assert cache.get("x7") == 7


def test_a_directory_whose_device_number_changed_is_still_itself(tmp_path: Path) -> None:
    # NFS, btrfs subvolumes, overlayfs or device-mapper may renumber the device at a remount:
    # the directory recorded by path is then this one, and was refused as a copy of itself.
    original, target = linked_cache(tmp_path, "wal")
    device, inode, path = (target / "OWNER").read_text().split()
    (target / "OWNER").write_text(f"{int(device) + 1} {inode} {path}\n")
    with wbcache.open(original) as cache:
        assert cache.get("base") == 0
    assert (target / "OWNER").read_text().split()[0] == device  # brought up to date


def test_a_copy_put_at_the_original_path_is_refused(tmp_path: Path) -> None:
    # A review: mv c c.old; cp -a c.old c while c.old is open. The device-renumbering rule
    # (the path recorded leads here) took the copy for the original and let it delete the
    # live cache's segment.
    original, target = linked_cache(tmp_path, "wal")
    aside = tmp_path / "original.old"
    with wbcache.open(original, flush_interval=3600) as cache:
        cache.put("k", 1)
        os.rename(original, aside)  # moved while open: OWNER still names the old path
        copy_keeping_links(aside, original)  # a new directory at the path OWNER names
        with pytest.raises(InvalidDirectoryError, match="cannot share"):
            wbcache.open(original)
    with wbcache.open(aside) as cache:
        assert cache.get("k") == 1


# ------------------------------------------------------------------ shared directories

SHARED_WRITER = WRITER.replace("open(sys.argv[1], ", "open(sys.argv[1], shared=True, ")


def test_a_copy_of_a_shared_directory_sharing_its_linked_db_is_refused(tmp_path: Path) -> None:
    # A copy of a shared directory keeps its lanes, and so their identities: opening it
    # replayed the copy's lanes into the original's database under the original's
    # checkpoints (dropping what they took for flushed) and deleted the logs.
    original, target = tmp_path / "original", tmp_path / "elsewhere-db"
    original.mkdir(mode=0o700)
    target.mkdir(mode=0o700)
    (original / "db").symlink_to(target)
    with wbcache.open(original, shared=True) as cache:
        cache.put("base", 0)
    copy = tmp_path / "copy"
    copy_keeping_links(original, copy)
    done = subprocess.run([sys.executable, "-c", SHARED_WRITER, str(original)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == -signal.SIGKILL and "acknowledged" in done.stdout, done.stderr
    before = state_of(target)

    with pytest.raises(InvalidDirectoryError, match="cannot share") as refused:
        wbcache.open(copy, shared=True)
    assert str(original) in str(refused.value)
    with pytest.raises(InvalidDirectoryError, match="cannot share"):
        recover_directory(copy)
    assert state_of(target) == before
    with wbcache.open(original, shared=True) as cache:
        assert [cache.get(f"x{n}") for n in range(100)] == list(range(100))


OPENER = """
import sys, wbcache
with wbcache.open(sys.argv[1], shared=True) as cache:
    cache.put(sys.argv[2], 1)
"""


def test_shared_opens_at_once_all_record_the_same_owner(tmp_path: Path) -> None:
    # Each open holds only its lane's lock, so several write OWNER at once; with one
    # temporary name for all, one could rename another's half-written file into place.
    root, target = tmp_path / "shared", tmp_path / "elsewhere-db"
    root.mkdir(mode=0o700)
    target.mkdir(mode=0o700)
    (root / "db").symlink_to(target)
    openers = [subprocess.Popen([sys.executable, "-c", OPENER, str(root), f"k{n}"],
                                stderr=subprocess.PIPE, text=True) for n in range(8)]
    errors = [opener.communicate(timeout=120)[1] for opener in openers]

    assert [opener.returncode for opener in openers] == [0] * 8, errors
    assert owner_path(target) == str(root)
    assert sorted(os.listdir(target)) == ["OWNER", "data.mdb", "lock.mdb"]
    with wbcache.open(root, shared=True) as cache:
        assert [cache.get(f"k{n}") for n in range(8)] == [1] * 8


def test_owner_written_by_many_at_once_is_always_whole(tmp_path: Path) -> None:
    # The race above, made frequent: each thread reaches the directory by a path of its own
    # (so each call rewrites OWNER), as processes opening it through several mounts would.
    root, target = tmp_path / "shared", tmp_path / "elsewhere-db"
    root.mkdir(mode=0o700)
    target.mkdir(mode=0o700)
    (root / "db").symlink_to(target)
    paths = []
    for n in range(4):
        (tmp_path / f"by-{n}").symlink_to(tmp_path)
        paths.append(tmp_path / f"by-{n}" / "shared")
    failures: list[BaseException] = []

    def check_often(path: Path) -> None:
        try:
            for _ in range(150):
                check_linked_dirs(Layout(str(path)), shared=True)
        except BaseException as exc:  # noqa: BLE001 - reported below
            failures.append(exc)

    threads = [threading.Thread(target=check_often, args=(path,)) for path in paths]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert failures == []
    assert owner_path(target) in {str(path) for path in paths}
    assert sorted(os.listdir(target)) == ["OWNER"]


@pytest.mark.parametrize("shared", [False, True])
def test_a_failed_owner_write_leaves_no_temporary_file(
        tmp_path: Path, shared: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    # A review: a shared writer's temporary file has a name of its own, so one a failed
    # write left was never replaced or removed by a later one.
    root, target = tmp_path / "dir", tmp_path / "elsewhere-db"
    root.mkdir(mode=0o700)
    target.mkdir(mode=0o700)
    (root / "db").symlink_to(target)
    real_fsync = os.fsync

    def failing_fsync(fd: int) -> None:
        raise OSError(5, "Input/output error (injected)")

    for _ in range(3):
        monkeypatch.setattr(os, "fsync", failing_fsync)
        with pytest.raises(OSError):
            check_linked_dirs(Layout(str(root)), shared=shared)
        monkeypatch.setattr(os, "fsync", real_fsync)
        assert os.listdir(target) == []
    check_linked_dirs(Layout(str(root)), shared=shared)
    assert sorted(os.listdir(target)) == ["OWNER"] and owner_path(target) == str(root)


@pytest.mark.parametrize("driver", DRIVERS)
@pytest.mark.parametrize("name", ["wal", "db"])
def test_a_link_to_another_cache_directorys_own_wal_or_db_is_refused(
        tmp_path: Path, name: str, driver: str) -> None:
    """Another directory's own wal/ or db/ (not a link) holds no OWNER: that directory never
    looks for one in its own. Linked to, it was claimed: the log replayed into this
    directory's database and deleted (the other's next open: records 1..100 missing), or
    this directory's flushes moved the other's checkpoint (its writes gone). An outside hunt.
    Refused by an open and by every command, nothing changed anywhere."""
    other = tmp_path / "other"
    killed_writer(other)  # 100 acknowledged writes, only in its log
    mine = tmp_path / "mine"
    wbcache.open(mine).close()
    shutil.rmtree(mine / name)
    (mine / name).symlink_to(other / name)
    before = state_of(other)
    with pytest.raises(InvalidDirectoryError, match=f"the cache directory {other} "
                                                    f"\\(its own {name}\\)"):
        wbcache.open(mine)
    for command in ("recover", "inspect", "verify", "dump"):  # read-only ones too: they
        # reported the other's records as this directory's, "replayed by recover or open"
        assert_one_line_error(run(driver, command, str(mine)), 2, "two cache directories "
                              "cannot share one")
    assert state_of(other) == before
    with wbcache.open(other) as cache:
        assert [cache.get(f"x{n}") for n in range(100)] == list(range(100))


def test_a_link_to_a_lane_or_a_shared_directorys_db_is_refused(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    with wbcache.open(shared, shared=True) as cache:
        cache.put("k", 1)
        lane = Path(cache._layout.root)
    for name, target in (("wal", lane / "wal"), ("db", shared / "db")):
        mine = tmp_path / f"mine-{name}"
        wbcache.open(mine).close()
        shutil.rmtree(mine / name)
        (mine / name).symlink_to(target)
        with pytest.raises(InvalidDirectoryError, match="two cache directories cannot share"):
            wbcache.open(mine)
    with wbcache.open(shared, shared=True) as cache:
        assert cache.get("k") == 1


def test_a_log_directory_swapped_for_a_link_while_the_cache_runs_is_never_written_through(
        tmp_path: Path) -> None:
    """The writer makes and deletes segments by path: a running cache's wal/ moved away and
    replaced by a link to another cache's log had its flusher delete that cache's segments
    (its next open: records missing) and its rotation make segments there (an attacker's
    hunt). The log now checks, at each, that the path still leads to the directory it
    opened: the flush says so (nothing deleted), a write needing a new segment fails the
    log, and the other cache keeps every write."""
    other = tmp_path / "other"
    killed_writer(other)  # 100 acknowledged writes in its log
    mine = tmp_path / "mine"
    cache = wbcache.open(mine, flush_interval=3600, segment_size=64 * 1024)
    try:
        for batch in range(2):  # the second in a new segment: the first closed
            cache.put_many({f"a{batch}-{n}": "v" * 1000 for n in range(100)})
        (mine / "wal").rename(tmp_path / "moved-wal")
        (mine / "wal").symlink_to(other / "wal")
        before = state_of(other)
        with pytest.raises(wbcache.FlushError, match="no longer the log directory"):
            cache.flush()
        with pytest.raises(wbcache.LogFailedError, match="no longer the log directory"):
            cache.put_many({f"b{n}": "v" * 1000 for n in range(100)})  # the next segment
        assert state_of(other) == before
    finally:
        try:
            cache.close()
        except wbcache.WbcacheError as exc:  # its last flush cannot delete its segments
            assert "no longer the log directory" in str(exc)
    with wbcache.open(other) as reopened:
        assert [reopened.get(f"x{n}") for n in range(100)] == list(range(100))
    (mine / "wal").unlink()
    (tmp_path / "moved-wal").rename(mine / "wal")
    with wbcache.open(mine) as reopened:
        assert reopened.get("a1-99") == "v" * 1000
