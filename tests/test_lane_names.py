"""What may stand in a shared directory's lanes/ (wbcache/lanes.py): a lane is a private
directory of its own, never followed through a link, and every lane is in sight, whatever its
number, while a new lane is always numbered with 8 digits, without ever spinning.

A link there used to be followed: a link to another cache directory made it a lane, its log
replayed into this database and deleted, our log written in it. And lanes were numbered
highest + 1 but listed only by 8-digit names: past 99999999 a lane was made out of sight of
adoption and recovery, and the next new lane spun forever on the same name.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from cli_support import assert_one_line_error, run, tree_state
from controlled import wait_until

import wbcache
from wbcache import lanes
from wbcache.errors import CacheLockedError, InvalidDirectoryError
from wbcache.maintenance import recover_directory

# Opens the cache at argv[1] (shared if argv[2] == "shared"), writes argv[3] = 1 (acknowledged:
# in the log, not flushed), prints the log's directory and dies by SIGKILL.
WRITE_AND_DIE = r"""
import os, signal, sys, wbcache
cache = wbcache.open(sys.argv[1], shared=sys.argv[2] == "shared", flush_interval=3600)
cache.put(sys.argv[3], 1)
print(cache._layout.root, flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def write_and_die(directory: Path, key: str, *, shared: bool) -> Path:
    """A process writes `key` into the cache at `directory` and is SIGKILLed; its log's
    directory (a lane's, if shared) is returned."""
    result = subprocess.run([sys.executable, "-c", WRITE_AND_DIE, str(directory),
                             "shared" if shared else "single", key],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == -signal.SIGKILL, result.stderr
    return Path(result.stdout.strip())


def make_shared(directory: Path) -> None:
    wbcache.open(directory, shared=True).close()


def segments(cache_dir: Path) -> list[str]:
    return sorted(os.listdir(cache_dir / "wal"))


# ---------------------------------------------------------------- a lane is never a link


def test_a_lane_that_is_a_link_is_refused_and_what_it_points_at_untouched(
        tmp_path: Path) -> None:
    """A link in lanes/ to another cache directory: a shared open and `wbcache recover` refuse
    the directory, naming the link, and the other cache keeps its log and its write."""
    shared, other = tmp_path / "shared", tmp_path / "other"
    make_shared(shared)
    write_and_die(other, "precious", shared=False)
    before = segments(other)
    assert before
    (shared / "lanes" / "00000000").symlink_to(other)  # sorts first
    with pytest.raises(InvalidDirectoryError, match="00000000 is a symbolic link"):
        wbcache.open(shared, shared=True)
    with pytest.raises(InvalidDirectoryError, match="00000000 is a symbolic link"):
        recover_directory(shared)
    assert segments(other) == before
    assert sorted(os.listdir(shared / "lanes")) == ["00000000", "00000001"]  # nothing made
    with wbcache.open(other) as cache:
        assert cache.get("precious") == 1


def test_a_link_planted_while_a_cache_runs_is_refused_by_its_sweep(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The flusher's adoption sweep refuses the link too (it can only say so, in a warning,
    and try again at the next sweep) and never touches what it points at."""
    shared, other = tmp_path / "shared", tmp_path / "other"
    write_and_die(other, "precious", shared=False)
    before = segments(other)
    with caplog.at_level(logging.WARNING, logger="wbcache"):
        with wbcache.open(shared, shared=True, adopt_interval=0.05) as cache:
            (shared / "lanes" / "00000000").symlink_to(other)
            wait_until(lambda: any("00000000 is a symbolic link" in record.getMessage()
                                   for record in caplog.records),
                       what="the sweep's warning about the link")
            cache.put("mine", 2)
    assert segments(other) == before
    with wbcache.open(other) as cache:
        assert cache.get("precious") == 1


@pytest.mark.parametrize("kind", ["file", "group-writable directory"])
def test_a_lane_that_is_not_a_private_directory_is_refused(tmp_path: Path, kind: str) -> None:
    shared = tmp_path / "shared"
    make_shared(shared)
    planted = shared / "lanes" / "00000002"
    if kind == "file":
        planted.write_bytes(b"")
        expected = "not a directory"
    else:
        planted.mkdir(mode=0o700)
        planted.chmod(0o770)
        expected = "group- or world-writable"
    with pytest.raises(InvalidDirectoryError, match=expected):
        wbcache.open(shared, shared=True)


# ---------------------------------------------------------------- every lane in sight


def test_a_lane_numbered_past_99999999_is_adopted(tmp_path: Path) -> None:
    """A lane named with more than 8 digits (an earlier wbcache made one past 99999999) is a
    lane: its dead process's acknowledged write is adopted by the next open, and listed after
    the 8-digit ones."""
    shared = tmp_path / "shared"
    lane = write_and_die(shared, "far", shared=True)
    lane.rename(lane.with_name("100000000"))
    (shared / "lanes" / "99999999").mkdir(mode=0o700)
    with wbcache.open(shared, shared=True) as cache:
        assert cache.get("far") == 1
    assert segments(shared / "lanes" / "100000000") == []  # replayed, then deleted
    assert [os.path.basename(root) for root in lanes.lane_roots(str(shared))] == [
        "99999999", "100000000"]  # in the order of their numbers, no lane made


# Claims (and holds) argv[2] lanes of the shared directory argv[1]; prints each one's name.
CLAIM_LANES = r"""
import sys
from wbcache import lanes
held = [lanes.claim(sys.argv[1]) for _ in range(int(sys.argv[2]))]
print(" ".join(lane.name for lane in held))
"""


def test_new_lanes_beside_lane_99999999_are_numbered_in_sight_and_never_spin(
        tmp_path: Path) -> None:
    """With a lane 99999999, new lanes still get 8-digit numbers (the lowest free), each
    listed; none is made out of sight, and no claim spins (a run that did would time out)."""
    shared = tmp_path / "shared"
    make_shared(shared)  # lane 00000001
    (shared / "lanes" / "99999999").mkdir(mode=0o700)
    result = subprocess.run([sys.executable, "-c", CLAIM_LANES, str(shared), "4"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    claimed = result.stdout.split()
    assert claimed == ["00000001", "99999999", "00000002", "00000003"]
    listed = [os.path.basename(root) for root in lanes.lane_roots(str(shared))]
    assert listed == ["00000001", "00000002", "00000003", "99999999"]
    assert sorted(os.listdir(shared / "lanes")) == sorted(listed)  # nothing out of sight


def test_claim_refuses_once_every_lane_number_is_held(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """When every number a new lane could take is a lane held by a live process, claim says
    so at once, and a released lane is claimed again."""
    shared = tmp_path / "shared"
    make_shared(shared)
    monkeypatch.setattr(lanes, "_LAST_NUMBER", 3)
    held = [lanes.claim(str(shared)) for _ in range(3)]
    try:
        with pytest.raises(CacheLockedError, match="no free lane"):
            lanes.claim(str(shared))
        held[1].release()
        held[1] = lanes.claim(str(shared))
        assert held[1].name == "00000002"
    finally:
        for lane in held:
            lane.release()


# ------------------------------------------------------------ one identity, one lane


@pytest.mark.parametrize("driver", ["runner", "script"])
def test_a_lane_copied_back_into_lanes_is_refused_while_its_original_runs(
        tmp_path: Path, driver: str) -> None:
    """A copy of a lane put back in lanes/ has the lane's identity, and so its checkpoint.
    Claimed beside its original (held by a running cache), a flush of the original counted
    the copy's unflushed writes as flushed: a process writing on the copy and SIGKILLed
    lost its acknowledged write at the next open. Now an open and every command refuse the
    two lanes, naming both, and change nothing; the running cache is unharmed."""
    shared = tmp_path / "shared"
    with wbcache.open(shared, shared=True, flush_interval=3600) as cache:
        cache.put("a", 1)
        cache.flush()
        original = Path(cache._layout.root)
        copy = original.parent / "00000002"
        shutil.copytree(original, copy, symlinks=True)
        before = tree_state(shared)
        with pytest.raises(InvalidDirectoryError, match="one identity") as refused:
            wbcache.open(shared, shared=True)
        assert str(original) in str(refused.value) and str(copy) in str(refused.value)
        assert_one_line_error(run(driver, "stats", str(shared)), 2, "one identity",
                              str(copy))
        assert tree_state(shared) == before
        cache.put("b", 2)
        assert cache.get("a") == 1
    shutil.rmtree(copy)  # as the message says: the copy out of lanes/
    with wbcache.open(shared, shared=True) as cache:
        assert (cache.get("a"), cache.get("b")) == (1, 2)
