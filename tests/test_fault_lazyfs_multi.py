"""Power cuts on LazyFS under several processes at once (fault_injection/lazyfs_multi.py): four
PostgreSQL nodes, each with its own directory on the mount, and four processes sharing one
directory on it; every counter exact after every cut, a cut that drops unsynced log bytes
among them; acknowledging before the log's fsync is caught; a failing cycle leaves nothing
mounted or running.

They need LazyFS ($WBCACHE_LAZYFS) and, for the nodes, PostgreSQL (pg_support.py); without
either they skip, and fail under WBCACHE_REQUIRE_SERVICES=1 (CI).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from lazyfs_support import lazyfs_binary_fixture, processes_naming  # noqa: F401 (fixture)
from pg_support import pg_dsn_fixture, query  # noqa: F401 (fixture)

import wbcache.fault_injection.lazyfs_multi as lazyfs_multi
from wbcache.fault_injection.campaign import Outcome, Settings
from wbcache.fault_injection.lazyfs_mount import LazyfsMount, is_mount_point
from wbcache.fault_injection.lazyfs_multi import (
    NODE_TRIGGERS,
    SHARED_TRIGGERS,
    run_lazyfs_nodes,
    run_lazyfs_shared,
)
from wbcache.fault_injection.lazyfs_multi_check import lazyfs_truncate_artefact

SEED = int(os.environ.get("WBCACHE_TORTURE_SEED", "20261202"))
# Under the mutation every acknowledgement waits for no fsync, and nothing is flushed: the cut
# takes every write of the cycle, and the ledger still owes each one.
ACK_BEFORE_FSYNC = {"fsync": "interval", "fsync_interval": 3600.0, "flush_interval": 3600.0,
                    "flush_threshold": 100_000}


def _settings(tmp_path: Path, cycles: int, *, backend: str | None = None,
              threads: int = 2) -> Settings:
    return Settings(workdir=str(tmp_path / "work"), seed=SEED, cycles=cycles, threads=threads,
                    backend=backend)


def _assert_exact_through_cuts(outcome: Outcome, cycles: int, triggers: tuple[str, ...]) -> None:
    tally, rows = outcome.tally, outcome.rows
    assert outcome.ok, "\n".join(tally.messages)
    assert tally.cycles == cycles
    assert tally.recovered == tally.acknowledged > 100
    assert tally.counters == 100 * cycles and tally.counter_mismatches == 0
    used = dict(part.split() for part in rows["cut triggers"].split(", "))
    assert used == {trigger: str(int(trigger in triggers[:cycles])) for trigger in triggers}
    assert triggers[:2] == ("mid-write", "recovery")
    assert rows["power cuts"] == cycles + 1  # the recovery trigger cuts twice
    # The power cut took bytes the logs had written but not yet fsync'd (mid-write: surely).
    assert rows["cuts that dropped unsynced log bytes"] >= 1, rows
    assert rows["LazyFS cache peak usage, %"] < 50  # a full cache would write through


# ---------------------------------------------------------------- the slices pass


def test_postgresql_nodes_on_lazyfs_count_every_increment_exactly_through_power_cuts(
        lazyfs_binary: str, pg_dsn: str, tmp_path: Path) -> None:
    cycles = 2  # the first two triggers once each: mid-write, recovery (which cuts twice)
    outcome = run_lazyfs_nodes(_settings(tmp_path, cycles, backend=pg_dsn))
    _assert_exact_through_cuts(outcome, cycles, NODE_TRIGGERS)
    rows = outcome.rows
    assert rows["processes x writer threads"] == "4 x 2"
    assert rows["database commits before the cuts"] > 0  # flushes into PostgreSQL in flight
    assert rows["log records replayed into PostgreSQL after the cuts"] > 0
    table = rows["shared table (dropped)"]
    assert query(pg_dsn, "SELECT tablename FROM pg_tables WHERE tablename LIKE %s",
                 (f"{table}%",)) == []
    assert not (tmp_path / "work" / "lazyfs-nodes" / "fs").exists()  # unmounted and removed


def test_a_shared_directory_on_lazyfs_counts_every_increment_exactly_through_power_cuts(
        lazyfs_binary: str, tmp_path: Path) -> None:
    cycles = 2  # the first two triggers once each: mid-write, recovery (which cuts twice)
    outcome = run_lazyfs_shared(_settings(tmp_path, cycles))
    _assert_exact_through_cuts(outcome, cycles, SHARED_TRIGGERS)
    assert outcome.rows["processes x writer threads"] == "4 x 2"
    assert not (tmp_path / "work" / "lazyfs-shared" / "fs").exists()


# ---------------------------------------------------------------- a mutation is caught


def test_nodes_acknowledging_before_their_log_fsync_lose_writes_and_are_caught(
        lazyfs_binary: str, pg_dsn: str, tmp_path: Path) -> None:
    outcome = run_lazyfs_nodes(_settings(tmp_path, 1, backend=pg_dsn),
                               options=ACK_BEFORE_FSYNC)
    tally = outcome.tally
    assert not outcome.ok
    assert tally.lost > 0 and tally.acknowledged > tally.recovered, tally.messages[:3]
    assert any("acknowledged write(s) lost" in message for message in tally.messages)


def test_a_shared_directory_acknowledging_before_its_log_fsync_is_caught(
        lazyfs_binary: str, tmp_path: Path) -> None:
    outcome = run_lazyfs_shared(_settings(tmp_path, 1), options=ACK_BEFORE_FSYNC)
    assert not outcome.ok
    assert outcome.tally.lost > 0, outcome.tally.messages[:3]


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

    real_run_group = lazyfs_multi.run_group

    def failing_run_group(*args: Any, **kwargs: Any) -> Any:
        def decide(index: int, event: list[Any]) -> bool:
            raise RuntimeError("injected: the harness fails while the processes write")
        return real_run_group(*args, **{**kwargs, "decide": decide})

    monkeypatch.setattr(LazyfsMount, "mount", recording_mount)
    monkeypatch.setattr(lazyfs_multi, "run_group", failing_run_group)
    work = tmp_path / "work"
    with pytest.raises(RuntimeError, match="injected"):
        run_lazyfs_shared(_settings(tmp_path, 1))
    assert pids  # it did mount
    assert not any(is_mount_point(mount.mnt) for mount in mounts)
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)  # our LazyFS processes are gone (and reaped)
    assert processes_naming(str(work)) == []  # no process left writing


# ---------------------------------------------------------------- what is LazyFS's fault

_CLAIM = """Traceback (most recent call last):
  File "/x/wbcache/lanes.py", line 78, in take
    lock = DirectoryLock.acquire(layout.lock)
  File "/x/wbcache/lock.py", line 77, in record_owner
    os.ftruncate(self._fd, 0)
"""


def test_only_enoent_from_a_truncate_of_an_open_file_is_excused_as_lazyfs_s() -> None:
    assert lazyfs_truncate_artefact(_CLAIM + "FileNotFoundError: [Errno 2] No such file or "
                                             "directory\n")
    # The same call failing as a real disk can make it fail is the library's to survive.
    assert not lazyfs_truncate_artefact(_CLAIM + "OSError: [Errno 5] Input/output error\n")
    assert not lazyfs_truncate_artefact(_CLAIM.replace("os.ftruncate(self._fd, 0)",
                                                       "os.open(path, flags)")
                                        + "FileNotFoundError: [Errno 2] No such file\n")
    assert not lazyfs_truncate_artefact("wbcache.errors.CorruptLogError: wal/1.log at 20\n")
    lmdb_open = ("  File \"/x/wbcache/backends/lmdb.py\", line 107, in __init__\n"
                 "    self._env = lmdb.open(path, map_size=map_size, subdir=True,\n"
                 "                ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^\n")
    assert lazyfs_truncate_artefact(lmdb_open + "lmdb.Error: /m/shared/db: No such file or "
                                                "directory\n")
    assert not lazyfs_truncate_artefact(lmdb_open + "lmdb.Error: /m/shared/db: "
                                                    "MDB_CORRUPTED: Located page was wrong type\n")
    # as the caller sees it: the DatabaseError raised from LMDB's error (backends/lmdb.py)
    raised_from = ("\nThe above exception was the direct cause of the following exception:\n"
                   "\nTraceback (most recent call last):\n"
                   "  File \"/x/wbcache/backends/lmdb.py\", line 345, in lmdb_errors\n"
                   "    raise DatabaseError(f\"cannot {doing} the LMDB database ...\") from exc\n"
                   "wbcache.errors.DatabaseError: cannot open the LMDB database "
                   "/m/shared/db/data.mdb: ")
    assert lazyfs_truncate_artefact(lmdb_open + "lmdb.Error: /m/shared/db: No such file or "
                                                "directory\n" + raised_from
                                    + "/m/shared/db: No such file or directory\n")
    assert not lazyfs_truncate_artefact(lmdb_open + "lmdb.CorruptedError: /m/shared/db: "
                                                    "MDB_CORRUPTED\n" + raised_from
                                        + "MDB_CORRUPTED\n")
    assert not lazyfs_truncate_artefact("")


# ---------------------------------------------------------------- soak


@pytest.mark.soak
def test_soak_50_power_cuts_of_nodes_and_of_a_shared_directory(
        lazyfs_binary: str, pg_dsn: str, tmp_path: Path) -> None:
    for run in (run_lazyfs_nodes, run_lazyfs_shared):
        outcome = run(Settings(workdir=str(tmp_path / run.__name__), seed=SEED, cycles=50,
                               threads=4, backend=pg_dsn))
        assert outcome.ok, "\n".join(outcome.tally.messages)
        assert outcome.tally.counters == 100 * 50
        assert outcome.rows["cuts that dropped unsynced log bytes"] >= 10


def test_wbcache_torture_runs_the_cuts_under_a_shared_directory_and_under_nodes(
        lazyfs_binary: str, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from wbcache.cli import main

    result = CliRunner().invoke(main, ["torture", str(tmp_path / "shared"), "--mode",
                                       "lazyfs-shared", "--cycles", "1", "--seed", "3",
                                       "--lazyfs", lazyfs_binary, "--quiet"])
    assert result.exit_code == 0, result.output
    assert "lazyfs-shared: power cuts" in result.output and "verdict: PASS" in result.output
    # With a database, --mode lazyfs is the cut under the nodes (refused modes say so).
    refused = CliRunner().invoke(main, ["torture", "--backend", "postgresql://u@h/db",
                                        "--mode", "lazyfs-shared"])
    assert refused.exit_code == 2
    assert "only kill and lazyfs do" in refused.output
