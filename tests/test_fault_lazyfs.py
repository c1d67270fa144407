"""Power cuts for real, on LazyFS (fault_injection/lazyfs*.py): the tool does what it models,
the CI slice of the campaign passes and exercises the database half, a failing cycle leaves
nothing mounted or running, and LazyFS is found (or explained) as documented.

The tests that run LazyFS need its binary in $WBCACHE_LAZYFS (.ci/run builds it with
../shared/tools/lazyfs/build.sh); without it they skip, and fail under
WBCACHE_REQUIRE_SERVICES=1 (CI).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from lazyfs_support import lazyfs_binary_fixture, processes_naming  # noqa: F401 (fixture)

import wbcache
import wbcache.cli.torture as cli_torture
from wbcache.cli import main
from wbcache.fault_injection.campaign import Outcome
from wbcache.fault_injection.journal import ACK, OPEN, READY, START, SYNC
from wbcache.fault_injection.lazyfs_config import LazyfsUnavailable
from wbcache.fault_injection.lazyfs_mount import LazyfsMount, is_mount_point
from wbcache.fault_injection.lazyfs_oracle import INTERVAL_MARGIN, required_acks
from wbcache.fault_injection.lazyfs_plan import FIRST, KINDS
from wbcache.fault_injection.torture import TortureReport, run_torture

SLICE_CYCLES = 10  # the CI slice: every kind of cut once, then three at random
SLICE_SEED = 20261202


# ---------------------------------------------------------------- the tool itself


def test_a_cut_drops_unsynced_bytes_and_keeps_synced_ones_after_a_remount(
        lazyfs_binary: str, tmp_path: Path) -> None:
    with LazyfsMount(lazyfs_binary, str(tmp_path / "fs")) as fs:
        fs.mount()
        synced_path = os.path.join(fs.mnt, "synced")
        unsynced_path = os.path.join(fs.mnt, "unsynced")
        with open(synced_path, "wb") as file:
            file.write(b"durable")
            file.flush()
            os.fsync(file.fileno())
            file.write(b"+lost")
        with open(unsynced_path, "wb") as file:
            file.write(b"never fsync'd")
        report = fs.cut()
        fs.unmount()
        fs.mount()
        with open(synced_path, "rb") as file:
            assert file.read() == b"durable"
        with open(unsynced_path, "rb") as file:
            assert file.read() == b""
    assert sorted(os.path.basename(path) for path in report.files) == ["synced", "unsynced"]
    # LazyFS counts from the first unsynced byte of each block: at least what was written.
    assert report.unsynced_bytes >= len(b"+lost") + len(b"never fsync'd")
    assert not is_mount_point(fs.mnt)


# ---------------------------------------------------------------- the CI slice


def test_the_lazyfs_slice_passes_and_cuts_the_database_half(lazyfs_binary: str,
                                                            tmp_path: Path) -> None:
    report = run_torture(str(tmp_path / "work"), modes=("lazyfs",), cycles=SLICE_CYCLES,
                         seed=SLICE_SEED, threads=4)
    (outcome,) = report.outcomes
    rows = outcome.rows
    assert report.ok, report.table()
    assert outcome.tally.cycles == SLICE_CYCLES
    assert outcome.tally.acknowledged > 1000, report.table()
    assert all(rows.get(f"kind {kind}", 0) >= 1 for kind in KINDS), report.table()
    assert rows["power cuts"] >= SLICE_CYCLES + 2  # the recovery kinds cut twice
    # Every torn kind tore a write of the log once writes were acknowledged: counted from
    # the mount, the tear fell on the open's own writes (the first window's reserved zeros)
    # and the cut came before any write, in every torn cycle.
    torn = rows["kind torn-op"] + rows["kind torn-seq"]
    assert rows.get("torn writes, after acknowledged writes", 0) == torn >= 2, report.table()
    # LazyFS crashed itself at armed faults, and the cuts dropped unsynced bytes of both
    # halves, while flushes and segment deletions were in flight.
    assert sum(value for label, value in rows.items()
               if label.startswith("LazyFS crash faults fired")) >= 3, report.table()
    assert rows.get("cuts that dropped unsynced database bytes (data.mdb)", 0) >= 1
    assert rows.get("cuts that dropped unsynced log bytes", 0) >= 1
    assert rows["database commits before the cuts"] > 0
    assert rows["log segments deleted before the cuts"] > 0
    assert rows["LazyFS cache peak usage, %"] < 50  # a full cache would write through
    assert not (tmp_path / "work" / "lazyfs" / "fs").exists()  # unmounted and removed


def test_the_first_cycles_run_every_kind_of_cut_once() -> None:
    assert sorted(FIRST) == sorted(KINDS)
    assert len(FIRST) <= SLICE_CYCLES


# ---------------------------------------------------------------- cleanup


def test_a_failing_cycle_leaves_nothing_mounted_and_no_process_running(
        lazyfs_binary: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mounts: list[LazyfsMount] = []
    pids: list[int] = []
    real_mount = LazyfsMount.mount

    def recording_mount(self: LazyfsMount, *args: Any, **kwargs: Any) -> None:
        real_mount(self, *args, **kwargs)
        mounts.append(self)
        assert self.pid is not None
        pids.append(self.pid)

    def failing_arm(self: LazyfsMount, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError("injected: the harness fails while a worker is writing")

    monkeypatch.setattr(LazyfsMount, "mount", recording_mount)
    monkeypatch.setattr(LazyfsMount, "arm_crash", failing_arm)
    work = tmp_path / "work"
    with pytest.raises(RuntimeError, match="injected"):
        # Cycle 1 (log-unlink) arms its crash fault once the worker is ready: it fails there.
        run_torture(str(work), modes=("lazyfs",), cycles=2, seed=3, threads=2)
    assert len(pids) >= 2  # cycle 0 ran and was checked, cycle 1 was mounted
    assert not any(is_mount_point(mount.mnt) for mount in mounts)
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)  # our LazyFS processes are gone (and reaped)
    assert processes_naming(str(work)) == []  # no worker left writing


# ---------------------------------------------------------------- finding LazyFS


def test_a_missing_lazyfs_is_refused_by_name_with_how_to_build_it(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["torture", str(tmp_path / "work"), "--mode", "lazyfs",
                                       "--lazyfs", str(tmp_path / "no-such-lazyfs")])
    assert result.exit_code == 2, result.output
    assert "../shared/tools/lazyfs/build.sh" in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "work").exists()


def test_a_binary_that_does_not_mount_is_one_line_saying_where_the_scratch_is(
        tmp_path: Path, lazyfs_binary: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """An executable that is not LazyFS (here `true`) passes every check made before the
    campaign; its first mount fails, which was a traceback."""
    # the command names its binary in $WBCACHE_LAZYFS for the campaign: put ours back after
    monkeypatch.setenv("WBCACHE_LAZYFS", lazyfs_binary)
    work = tmp_path / "work"
    result = CliRunner().invoke(main, ["torture", str(work), "--mode", "lazyfs", "--cycles",
                                       "1", "--lazyfs", shutil.which("true") or "/bin/true"])
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and result.exception is not None
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("Error: LazyFS could not run the power cuts: LazyFS did not mount")
    assert f"its output: (no output) (scratch kept in {work})" in last


def test_all_skips_a_missing_lazyfs_and_says_why(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ran: list[tuple[str, ...]] = []

    def fake_run_torture(workdir: str, *, modes: tuple[str, ...], seed: int,
                         **_: Any) -> TortureReport:
        ran.append(modes)
        return TortureReport(seed, [Outcome("kill")])

    monkeypatch.delenv("WBCACHE_LAZYFS", raising=False)
    monkeypatch.setattr(cli_torture, "run_torture", fake_run_torture)
    result = CliRunner().invoke(main, ["torture", str(tmp_path / "work"), "--seed", "1"])
    assert result.exit_code == 0, result.output
    # both LazyFS modes named: the shared directories' one was skipped without a word
    assert "skipping lazyfs and lazyfs-shared: LazyFS not given" in result.output
    assert "build.sh" in result.output
    assert ran and not {"lazyfs", "lazyfs-shared"} & set(ran[0]) and "powerloss" in ran[0]


def test_the_campaign_refuses_to_start_without_lazyfs(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WBCACHE_LAZYFS", str(tmp_path / "missing"))
    with pytest.raises(LazyfsUnavailable, match="not an executable file"):
        run_torture(str(tmp_path / "work"), modes=("lazyfs",), cycles=1, seed=1)


# ---------------------------------------------------------------- what interval may lose


def _journal(*entries: tuple[float, list[Any]]) -> tuple[list[list[Any]], list[float]]:
    return [event for _, event in entries], [at for at, _ in entries]


def test_under_always_every_acknowledged_write_must_survive() -> None:
    events, times = _journal((0.0, [READY, 1, 0, 0, 0]), (0.1, [START, 0, 0]),
                             (0.2, [ACK, 0, 0, 5]), (0.3, [START, 0, 1]), (0.4, [ACK, 0, 1, 6]))
    floor = required_acks(events, times, fsync="always", fsync_interval=0.05, cut_time=0.5)
    assert floor.required == {0: 2} and floor.unsynced == 0


def test_under_interval_the_writes_before_the_last_log_fsync_must_survive() -> None:
    events, times = _journal(
        (0.00, [OPEN, 7, "wal/00000000000000000001.log", True, True]),
        (0.01, [START, 0, 0]), (0.02, [ACK, 0, 0, 1]),
        (0.03, [START, 1, 0]), (0.04, [ACK, 1, 0, 2]),
        (0.05, [SYNC, 7]),  # covers both acknowledgements above
        (0.06, [START, 0, 1]), (0.07, [ACK, 0, 1, 3]),  # unsynced at the cut
        (0.08, [SYNC, 9]))  # not a log file: covers nothing
    floor = required_acks(events, times, fsync="interval", fsync_interval=0.05, cut_time=0.1)
    assert floor.required == {0: 1, 1: 1}
    assert floor.unsynced == 1
    assert floor.longest_wait == pytest.approx(0.03)


def test_under_interval_writes_older_than_the_interval_must_survive_without_any_fsync() -> None:
    interval = 0.05
    cut = 10.0
    old = cut - interval - INTERVAL_MARGIN - 0.01
    events, times = _journal((old - 0.01, [START, 0, 0]), (old, [ACK, 0, 0, 1]),
                             (cut - 0.01, [START, 0, 1]), (cut - 0.005, [ACK, 0, 1, 2]))
    floor = required_acks(events, times, fsync="interval", fsync_interval=interval,
                          cut_time=cut)
    assert floor.required == {0: 1}  # the old one; the recent one may be lost
    unknown_cut = required_acks(events, times, fsync="interval", fsync_interval=interval,
                                cut_time=None)
    assert unknown_cut.required == {}  # no cut time, no fsync: nothing is owed


# ---------------------------------------------------------------- one busy writer, a real cut

# One thread putting in a tight loop under fsync="interval": each value is [its index, the
# monotonic time just before its put], so the survivors say how far the log was fsync'd.
BUSY_WRITER = """
import sys, time, wbcache
cache = wbcache.open(sys.argv[1], fsync="interval", fsync_interval=float(sys.argv[2]),
                     flush_interval=3600)
print("open", flush=True)
index = 0
while True:
    cache.put(f"k{index % 1000}", [index, time.monotonic()])
    index += 1
"""
BUSY_SECONDS = 2.0  # how long it writes before the cut: the interval and margin, and more


def test_a_busy_writer_under_interval_loses_at_most_the_interval_to_a_power_cut(
        lazyfs_binary: str, tmp_path: Path) -> None:
    interval = 0.05
    with LazyfsMount(lazyfs_binary, str(tmp_path / "fs")) as fs:
        fs.mount()
        cache_dir = os.path.join(fs.mnt, "cache")
        writer = subprocess.Popen([sys.executable, "-c", BUSY_WRITER, cache_dir, str(interval)],
                                  stdout=subprocess.PIPE, text=True)
        try:
            assert writer.stdout is not None and writer.stdout.readline() == "open\n"
            started = time.monotonic()
            time.sleep(BUSY_SECONDS)  # the workload's length, not a wait for an event
        finally:
            writer.kill()  # SIGKILL, then the power cut (nothing writes during it)
            writer.wait()
        killed = time.monotonic()
        fs.cut()
        fs.unmount()
        fs.mount()
        cache = wbcache.open(cache_dir, flush_interval=3600)
        try:
            survivors = [value for key in range(1000)
                         if (value := cache.get(f"k{key}")) is not None]
        finally:
            cache.close()
    assert survivors, "nothing of the busy writer survived the cut"
    newest_index, newest_time = max(survivors)
    # Everything acknowledged more than the interval (plus the oracle's margin for the
    # syncer's own delays) before the cut is on disk: the newest survivor was put after that.
    deadline = killed - interval - INTERVAL_MARGIN
    assert deadline > started + 0.5  # the rule covers a good part of the run
    assert newest_time >= deadline, (
        f"the newest surviving write (#{newest_index}) was put {killed - newest_time:.2f} s "
        f"before the cut; fsync_interval is {interval} s")
