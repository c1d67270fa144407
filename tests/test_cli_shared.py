"""The operating commands on a shared directory (many processes, one LMDB database, a lane
each): lane rows, the data after every free lane's recovery, `recover` adopting the free lanes
and leaving a live one alone (exit 3), and no byte changed by the read-only commands.

The directories are made by real processes: a live writer holding lane 1 (its writes
flushed), and writers SIGKILLed with their writes only in their lanes' logs (lanes 2, 3).
Each test runs the command in-process (CliRunner) and as a subprocess of the installed script.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
from cli_support import (
    DRIVERS,
    after_shared_recovery,
    assert_one_line_error,
    flip_byte,
    frame_offsets,
    run,
    shared_lanes,
    tree_state,
)

import wbcache

DEAD = (3, 4)
LIVE = 5


def lane_rows(document: dict[str, Any], *names: str) -> list[tuple[Any, ...]]:
    return [tuple(lane[name] for name in names) for lane in document["lanes"]]


def beside_the_reader_table(path: Path) -> dict[str, Any]:
    """The whole directory but LMDB's lock.mdb, whose reader table every process reading a
    shared database writes (and clears of dead processes' slots)."""
    state = tree_state(path)
    state.pop("db/lock.mdb", None)
    return state


@pytest.mark.parametrize("driver", DRIVERS)
def test_inspect_shows_each_lane_its_owner_checkpoint_and_pending_records(
        tmp_path: Path, driver: str) -> None:
    path = tmp_path / "shared"
    with shared_lanes(path, dead=DEAD, live=LIVE) as holder:
        assert holder is not None
        result = run(driver, "inspect", "--json", str(path))
        human = run(driver, "inspect", str(path))

    assert result.exit_code == 0, result.stderr
    document = result.json()
    assert (document["ok"], document["shared"], document["database_kind"],
            document["live_owner"], document["database_entries"]) == (
        True, True, "lmdb", True, LIVE + 1)
    assert lane_rows(document, "lane", "in_use", "owner_pid", "checkpoint_lsn",
                     "pending_records", "next_lsn") == [
        ("00000001", True, holder.pid, 2 * LIVE, 0, 2 * LIVE + 1),
        ("00000002", False, None, 0, 2 * DEAD[0], 2 * DEAD[0] + 1),
        ("00000003", False, None, 0, 2 * DEAD[1], 2 * DEAD[1] + 1)]
    assert document["pending_records"] == 2 * sum(DEAD)
    assert [len(lane["segments"]) for lane in document["lanes"]] == [1, 1, 1]
    assert (f"warning: {path}: lane 00000001 (pid {holder.pid}) in use by a live cache; its "
            f"log is read as it stands") in result.stderr
    lines = human.stdout.splitlines()
    assert lines[0] == f"{path}  (shared directory: 3 lanes, one LMDB database)"
    assert f"00000001  pid {holder.pid}" in human.stdout
    assert any(line.split()[:2] == ["00000002", "free"] for line in lines)


def test_the_warning_for_several_live_lanes_speaks_of_them_all(tmp_path: Path) -> None:
    path = tmp_path / "shared"
    with shared_lanes(path, dead=DEAD, live=LIVE) as holder, \
            wbcache.open(path, shared=True) as mine:  # a second live lane, this process's
        assert holder is not None
        inspected = run("script", "inspect", str(path))
        dumped = run("script", "dump", str(path))
    lane = os.path.basename(mine._layout.root)
    names = f"lanes 00000001 (pid {holder.pid}), {lane} (pid {os.getpid()})"
    assert (f"warning: {path}: {names} in use by live caches; their logs are read as they "
            f"stand: this view may be stale") in inspected.stderr
    assert (f"warning: {path}: {names} in use by live caches; what they have not flushed "
            f"yet is not shown (their caches flush it)") in dumped.stderr


@pytest.mark.parametrize("driver", DRIVERS)
def test_recover_adopts_the_free_lanes_and_names_the_live_one_left_alone(
        tmp_path: Path, driver: str) -> None:
    path = tmp_path / "shared"
    with shared_lanes(path, dead=DEAD, live=LIVE) as holder:
        assert holder is not None
        live_lane = tree_state(path / "lanes" / "00000001")
        dry = run(driver, "recover", "--dry-run", "--json", str(path))
        result = run(driver, "recover", str(path))
        again = run(driver, "recover", "--json", str(path))
        assert tree_state(path / "lanes" / "00000001") == live_lane

    assert (dry.exit_code, result.exit_code, again.exit_code) == (3, 3, 3)
    assert lane_rows(dry.json(), "lane", "in_use", "replayed") == [
        ("00000001", True, None), ("00000002", False, 2 * DEAD[0]),
        ("00000003", False, 2 * DEAD[1])]
    assert dry.json()["skipped"] == ["00000001"] and dry.json()["ok"] is False
    assert result.stdout.splitlines()[0] == (
        f"recovered {path}: replayed {2 * sum(DEAD)} log records from 2 free lanes into the "
        f"database")
    assert (f"left alone: lane 00000001 (pid {holder.pid}), in use by a live cache"
            in result.stderr)
    assert "Traceback" not in result.stderr
    assert lane_rows(again.json(), "replayed") == [(None,), (0,), (0,)]
    for lane in ("00000002", "00000003"):
        assert os.listdir(path / "lanes" / lane / "wal") == []
    with wbcache.open(path, shared=True) as cache:
        assert dict(cache.items()) == after_shared_recovery(DEAD, LIVE)


@pytest.mark.parametrize("driver", DRIVERS)
def test_recover_of_a_shared_directory_with_every_lane_free_exits_0(tmp_path: Path,
                                                                     driver: str) -> None:
    path = tmp_path / "shared"
    with shared_lanes(path, dead=DEAD, live=None):
        pass

    result = run(driver, "recover", "--json", str(path))

    assert result.exit_code == 0, result.stderr
    document = result.json()
    assert (document["ok"], document["skipped"], document["replayed"]) == (
        True, [], 2 * sum(DEAD))
    assert lane_rows(document, "lane", "in_use", "replayed") == [
        ("00000001", False, 2 * DEAD[0]), ("00000002", False, 2 * DEAD[1])]
    with wbcache.open(path, shared=True) as cache:
        assert dict(cache.items()) == after_shared_recovery(DEAD, None)


@pytest.mark.parametrize("driver", DRIVERS)
def test_a_lane_whose_lock_file_is_gone_is_read_and_recovered_all_the_same(
        tmp_path: Path, driver: str) -> None:
    """A lane's log whose LOCK was lost or removed: inspect and verify read it as a lane made a
    moment ago (no log: 0 pending records, acknowledged writes out of sight) and recover
    --dry-run failed with "No such file or directory", though recover itself adopts it."""
    path = tmp_path / "shared"
    with shared_lanes(path, dead=DEAD, live=None):
        pass
    (path / "lanes" / "00000001" / "LOCK").unlink()

    inspected = run(driver, "inspect", "--json", str(path))
    verified = run(driver, "verify", "--json", str(path))
    dry = run(driver, "recover", "--dry-run", "--json", str(path))
    recovered = run(driver, "recover", "--json", str(path))

    for result in (inspected, verified, dry, recovered):
        assert result.exit_code == 0, result.stderr
    assert lane_rows(inspected.json(), "lane", "pending_records") == [
        ("00000001", 2 * DEAD[0]), ("00000002", 2 * DEAD[1])]
    assert verified.json()["ok"]
    assert dry.json()["replayed"] == recovered.json()["replayed"] == 2 * sum(DEAD)
    with wbcache.open(path, shared=True) as cache:
        assert dict(cache.items()) == after_shared_recovery(DEAD, None)


@pytest.mark.parametrize("driver", DRIVERS)
def test_dump_and_get_show_the_data_after_every_free_lanes_recovery(tmp_path: Path,
                                                                   driver: str) -> None:
    path = tmp_path / "shared"
    with shared_lanes(path, dead=DEAD, live=LIVE):
        dumped = run(driver, "dump", str(path))
        got = run(driver, "get", "--json", str(path), "hits")
        pending = run(driver, "dump", "--pending", str(path))
        stats = run(driver, "stats", "--json", str(path))

    expected = after_shared_recovery(DEAD, LIVE)
    assert dumped.exit_code == 0, dumped.stderr
    assert {json.loads(line)["key"]: json.loads(line)["value"]
            for line in dumped.stdout.splitlines()} == expected
    assert [json.loads(line)["key"] for line in dumped.stdout.splitlines()] == sorted(expected)
    # the lanes' increments are added to the 5 the live cache had flushed
    assert (got.json()["value"], got.json()["source"], got.json()["lane"]) == (
        LIVE + sum(DEAD), "log", "00000003")
    records = [json.loads(line) for line in pending.stdout.splitlines()]
    assert [(record["lane"], record["lsn"]) for record in records] == [
        ("00000002", lsn) for lsn in range(1, 2 * DEAD[0] + 1)] + [
        ("00000003", lsn) for lsn in range(1, 2 * DEAD[1] + 1)]
    assert stats.exit_code == 0, stats.stderr
    assert (stats.json()["entries_after_recovery"], stats.json()["pending_records"],
            stats.json()["pending_incrs"]) == (len(expected), 2 * sum(DEAD), sum(DEAD))
    assert lane_rows(stats.json(), "in_use", "pending_records") == [
        (True, 0), (False, 2 * DEAD[0]), (False, 2 * DEAD[1])]
    assert "what it has not flushed yet is not shown" in dumped.stderr


@pytest.mark.parametrize("driver", DRIVERS)
def test_read_only_commands_change_no_byte_of_a_shared_directory(tmp_path: Path,
                                                                 driver: str) -> None:
    path = tmp_path / "shared"
    with shared_lanes(path, dead=DEAD, live=None):
        pass
    before = beside_the_reader_table(path)

    results = [run(driver, *args) for args in (
        ("inspect", str(path)), ("verify", "--json", str(path)), ("stats", str(path)),
        ("dump", "--format", "table", str(path)), ("dump", "--pending", str(path)),
        ("get", str(path), "hits"), ("recover", "--dry-run", str(path)))]

    assert [result.exit_code for result in results] == [0] * 7, [r.stderr for r in results]
    assert beside_the_reader_table(path) == before
    assert results[1].json()["lanes"][0]["records"] == 2 * DEAD[0]
    assert json.loads(results[5].stdout) == sum(DEAD)


@pytest.mark.parametrize("driver", DRIVERS)
def test_a_damaged_lane_is_refused_naming_it_then_salvaged_into_its_own_quarantine(
        tmp_path: Path, driver: str) -> None:
    path = tmp_path / "shared"
    with shared_lanes(path, dead=(20, 20), live=None):
        pass
    segment = next((path / "lanes" / "00000002" / "wal").iterdir())
    flip_byte(segment, frame_offsets(segment)[10] + 20)
    before = beside_the_reader_table(path)

    refused = run(driver, "recover", str(path))
    verified = run(driver, "verify", "--json", str(path))
    unchanged = beside_the_reader_table(path) == before
    salvaged = run(driver, "recover", "--salvage", "--yes", "--json", str(path))

    assert refused.exit_code == 1 and "Traceback" not in refused.stderr
    assert f"corrupt log segment {segment}" in refused.stderr
    assert f"{path}/lanes/00000002/quarantine/" in refused.stderr  # the hint names its place
    assert unchanged  # lane 1, whole and before the damaged one, was not recovered either
    assert verified.exit_code == 1
    assert [problem["lane"] for problem in verified.json()["problems"]] == ["00000002"]
    assert salvaged.exit_code == 0, salvaged.stderr
    lanes = salvaged.json()["lanes"]
    assert lanes[0]["replayed"] == 40 and lanes[0]["set_aside"] is None
    assert lanes[1]["replayed"] == 10 and lanes[1]["set_aside"]["quarantine_dir"].startswith(
        f"{path}/lanes/00000002/quarantine/")
    inspected = run(driver, "inspect", "--json", str(path)).json()
    assert [len(lane["quarantine"]) for lane in inspected["lanes"]] == [0, 2]


@pytest.mark.parametrize("driver", DRIVERS)
def test_a_backend_url_is_refused_for_a_shared_directory(tmp_path: Path, driver: str) -> None:
    path = tmp_path / "shared"
    wbcache.open(path, shared=True).close()
    before = tree_state(path)

    result = run(driver, "inspect", "--backend", "postgresql://u:Zq7xK9w@h/db", str(path))

    assert_one_line_error(result, 2, "flushes into its own LMDB database", "drop --backend")
    assert "Zq7xK9w" not in result.stderr
    assert tree_state(path) == before


# A state no open makes, so that a log would be out of sight: every command and every open
# refuses it, naming what is wrong, and changes nothing (the commands used to read such a
# directory by its SHARED mark alone: "ok: no damage found", its wal/ never looked at).
COMMANDS = (["verify"], ["recover"], ["inspect"], ["stats"], ["dump"], ["get", "k"])


def _refused_everywhere(path: Path, driver: str, *fragments: str) -> None:
    before = tree_state(path)
    for command in COMMANDS:
        result = run(driver, command[0], str(path), *command[1:])
        assert_one_line_error(result, 2, *fragments)
    for shared in (False, True):
        with pytest.raises(wbcache.InvalidDirectoryError) as refused:
            wbcache.open(path, shared=shared)
        for fragment in fragments:
            assert fragment in str(refused.value)
    assert tree_state(path) == before


@pytest.mark.parametrize("driver", DRIVERS)
def test_a_shared_mark_beside_a_single_owner_log_is_refused(tmp_path: Path,
                                                            driver: str) -> None:
    path = tmp_path / "cache"
    with wbcache.open(path) as cache:
        cache.put("k", 1)
    (path / "SHARED").write_bytes(b"")
    _refused_everywhere(path, driver, "both a SHARED mark", "wal/")


@pytest.mark.parametrize("driver", DRIVERS)
def test_a_shared_directory_without_lanes_is_refused(tmp_path: Path, driver: str) -> None:
    path = tmp_path / "shared"
    with wbcache.open(path, shared=True) as cache:
        cache.put("k", 1)
    shutil.rmtree(path / "lanes")
    _refused_everywhere(path, driver, "no lanes/ directory", "mkdir -m 0700")


@pytest.mark.parametrize("driver", DRIVERS)
def test_a_lane_named_as_a_cache_directory_is_refused_and_nothing_changes(
        tmp_path: Path, driver: str) -> None:
    """A lane holds what a single-owner directory holds (LOCK, wal/, cache_id). Recovered or
    opened as one, its log went into a new database inside the lane and was deleted: its
    acknowledged writes gone from the shared database, and the shared directory refused at
    its next open, records missing (an outside hunt). Every command and open refuses it."""
    path = tmp_path / "shared"
    dead = (4,)
    with shared_lanes(path, dead=dead, live=None):
        pass  # its writer SIGKILLed: lane 1's log holds its acknowledged writes
    lane = path / "lanes" / "00000001"
    link = tmp_path / "link"
    link.symlink_to(lane)
    before = tree_state(path)
    for command in ("recover", "verify", "inspect", "stats", "dump"):
        for named in (lane, link):
            assert_one_line_error(run(driver, command, str(named)), 2,
                                  "lane 00000001 of the shared cache directory")
    for named in (lane, link):
        for shared in (False, True):
            with pytest.raises(wbcache.InvalidDirectoryError, match="lane 00000001 of the"):
                wbcache.open(named, shared=shared)
    assert tree_state(path) == before
    for command in (["demo"], ["torture", "--mode", "kill", "--cycles", "1"]):
        new_lane = path / "lanes" / "00000009"  # a lane's place: a shared open would take it
        assert_one_line_error(run(driver, *command, str(new_lane)), 2,
                              "lane 00000009 of the shared cache directory")
        assert not new_lane.exists()
    # Reached outside lanes/ (moved, copied, bind-mounted), its LANE mark still tells.
    moved = tmp_path / "moved"
    lane.rename(moved)
    moved_before = tree_state(moved)
    for command in ("recover", "verify"):
        assert_one_line_error(run(driver, command, str(moved)), 2,
                              "holds LANE, the mark of a lane of a shared cache directory")
    with pytest.raises(wbcache.InvalidDirectoryError, match="holds LANE, the mark of a lane"):
        wbcache.open(moved)
    assert tree_state(moved) == moved_before
    (moved / "LANE").rename(moved / "LANE.tmp")  # its first use killed before the rename
    with pytest.raises(wbcache.InvalidDirectoryError, match="holds LANE.tmp, the mark of a"):
        wbcache.open(moved)
    (moved / "LANE.tmp").rename(moved / "LANE")
    moved.rename(lane)
    with wbcache.open(path, shared=True) as cache:
        assert dict(cache.items()) == after_shared_recovery(dead, None)


@pytest.mark.parametrize("driver", DRIVERS)
def test_a_shared_directorys_lanes_named_as_a_cache_directory_is_refused(
        tmp_path: Path, driver: str) -> None:
    """`lanes/` itself, empty (a first shared open interrupted before its first lane), was
    taken for a new directory: `wbcache demo S/lanes` or an open built a single-owner cache
    there, out of sight of every shared open and command. Refused, nothing made."""
    path = tmp_path / "shared"
    wbcache.open(path, shared=True).close()
    shutil.rmtree(path / "lanes" / "00000001")
    before = tree_state(path)
    assert_one_line_error(run(driver, "demo", str(path / "lanes")), 2,
                          "holds the lanes of the shared cache directory")
    for shared in (False, True):
        with pytest.raises(wbcache.InvalidDirectoryError, match="holds the lanes of the"):
            wbcache.open(path / "lanes", shared=shared)
    assert tree_state(path) == before
