"""`wbcache recover`: after kill -9, dry run, damage refused then salvaged, twice, progress.

Each test runs the command in-process (CliRunner) and as a subprocess of the installed script.
"""

from __future__ import annotations

import json
import os
import pty
import re
import signal
import subprocess
from pathlib import Path

import msgpack
import pytest
from cli_support import (
    DRIVERS,
    WBCACHE,
    assert_one_line_error,
    flip_byte,
    frame_offsets,
    kill_writer,
    new_cache_dir,
    put,
    puts,
    run,
    three_segment_log,
    tree_state,
    write_segment,
)
from log_bytes import frame

import wbcache
from wbcache.backends.lmdb import LmdbBackend
from wbcache.errors import CorruptLogError, InvalidDirectoryError
from wbcache.maintenance import recover_directory
from wbcache.wal.format import FRAME, FRAME_MAGIC, FRAME_SIZE


def stored(path: Path) -> dict[object, object]:
    backend = LmdbBackend(str(path / "db"), readonly=True)
    try:
        return {key: msgpack.unpackb(value) for key, value in backend.items()}
    finally:
        backend.close()


# ------------------------------------------------------------------ after kill -9


@pytest.mark.parametrize("driver", DRIVERS)
def test_recover_after_sigkill_keeps_every_acknowledged_write_and_open_replays_nothing(
        tmp_path: Path, driver: str) -> None:
    path = tmp_path / "cache"
    acked = kill_writer(path, flushed=300, acks=2000)
    logged = len(acked) - 300  # acknowledged writes that only the log held

    result = run(driver, "recover", "--json", str(path))

    assert result.exit_code == 0, result.stderr
    report = result.json()
    assert report["ok"] is True and report["dry_run"] is False and report["set_aside"] is None
    assert report["checkpoint_before"] == 300  # phase A was flushed
    assert report["replayed"] >= logged  # and any unacknowledged writes that reached the log
    assert report["checkpoint_after"] == report["last_lsn"] == 300 + report["replayed"]
    assert report["segments"] > 1  # 16 KiB segments: several were replayed and deleted
    assert list((path / "wal").iterdir()) == []
    assert stored(path).items() >= acked.items()  # in the database now, not only the log
    with wbcache.open(path) as cache:
        assert (cache.recovery.records, cache.recovery.replayed) == (0, 0)
        present = sum(1 for key, value in acked.items() if cache.get(key) == value)
    assert present == len(acked)


@pytest.mark.parametrize("driver", DRIVERS)
def test_recover_prints_the_summary_a_person_reads(tmp_path: Path, driver: str) -> None:
    path = tmp_path / "cache"
    new_cache_dir(path)
    write_segment(path / "wal", puts(1, 41))
    with (path / "wal" / "00000000000000000001.log").open("ab") as segment:
        segment.write(b"\xc1WBC\x00\x01")  # a torn tail: a frame header cut off by the crash

    result = run(driver, "recover", str(path))

    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == f"recovered {path}: replayed 41 log records into the database"
    table = dict(re.match(r"  (\S.*?)  +(\S+.*)$", line).groups() for line in lines[1:])
    assert table["records replayed"] == "41  newer than the checkpoint"
    assert table["torn tail bytes dropped"] == "6  end of 00000000000000000001.log"
    assert table["checkpoint before"] == "0"
    assert table["checkpoint after"] == "41"


@pytest.mark.parametrize("driver", DRIVERS)
def test_running_recover_twice_replays_nothing_the_second_time(tmp_path: Path,
                                                               driver: str) -> None:
    path = tmp_path / "cache"
    three_segment_log(path)

    first = run(driver, "recover", "--json", str(path)).json()
    state = tree_state(path / "db")
    second = run(driver, "recover", "--json", str(path))

    assert (first["replayed"], first["checkpoint_after"]) == (300, 300)
    assert second.exit_code == 0
    assert (second.json()["replayed"], second.json()["segments"]) == (0, 0)
    assert second.json()["checkpoint_after"] == 300
    assert tree_state(path / "db") == state  # nothing to write: the database was not opened


# ------------------------------------------------------------------ dry run


@pytest.mark.parametrize("driver", DRIVERS)
def test_dry_run_after_sigkill_reports_the_replay_and_changes_no_byte(tmp_path: Path,
                                                                     driver: str) -> None:
    path = tmp_path / "cache"
    kill_writer(path, flushed=100, acks=500)
    before = tree_state(path)

    dry = run(driver, "recover", "--dry-run", "--json", str(path))

    assert dry.exit_code == 0, dry.stderr
    assert tree_state(path) == before  # every file's bytes, mode and mtime; LOCK included
    planned = dry.json()
    assert planned["dry_run"] is True and planned["replayed"] >= 500
    done = run(driver, "recover", "--json", str(path)).json()
    assert {key: done[key] for key in ("replayed", "keys", "checkpoint_after", "segments")} == \
        {key: planned[key] for key in ("replayed", "keys", "checkpoint_after", "segments")}


# ------------------------------------------------------------------ damage


@pytest.mark.parametrize("planted", ["", "../../etc", "0123456789abcdef", "node-1" * 6])
def test_a_cache_id_that_is_not_an_identity_wbcache_made_is_refused(tmp_path: Path,
                                                                    planted: str) -> None:
    # An empty or edited cache_id was taken as the identity: two directories with an empty
    # one would share one checkpoint row in PostgreSQL and replay into each other's.
    path = tmp_path / "cache"
    acked = kill_writer(path, flushed=10, acks=50)
    identity = (path / "cache_id").read_text()
    (path / "cache_id").write_text(planted + "\n")
    before = tree_state(path)

    for command in ("recover", "verify", "inspect"):
        assert_one_line_error(run("runner", command, str(path)), 2,
                              f"{path / 'cache_id'} is not a file wbcache wrote",
                              "not an identity of 32 hexadecimal digits")
    assert tree_state(path) == before
    with pytest.raises(InvalidDirectoryError, match="not an identity of 32 hexadecimal"):
        wbcache.open(path)
    after = tree_state(path)
    for state in (before, after):  # but LMDB's reader table, which the open's database uses
        state.pop("db/lock.mdb")
    assert after == before
    (path / "cache_id").write_text(identity)  # restored: every acknowledged write is there
    with wbcache.open(path) as cache:
        assert {key: cache.get(key) for key in acked} == acked


@pytest.mark.parametrize("driver", DRIVERS)
def test_a_cache_id_open_refuses_is_refused_by_recover_too(tmp_path: Path, driver: str) -> None:
    # recover replayed the log (exit 0) into a directory that open and verify refuse, and
    # that still could not be opened afterwards
    path = tmp_path / "cache"
    kill_writer(path, flushed=10, acks=50)
    (path / "cache_id").write_bytes(bytes(range(200, 233)))
    before = tree_state(path)

    for command in ("recover", "verify"):
        result = run(driver, command, str(path))
        assert_one_line_error(result, 2, f"{path / 'cache_id'} is not a file wbcache wrote")
    assert tree_state(path) == before


@pytest.mark.parametrize("driver", DRIVERS)
def test_mid_log_damage_is_refused_naming_segment_and_offset_and_changes_nothing(
        tmp_path: Path, driver: str) -> None:
    path = tmp_path / "cache"
    segments = three_segment_log(path)
    offset = frame_offsets(segments[1])[49]  # the frame of LSN 150
    flip_byte(segments[1], offset + 20)
    before = tree_state(path)

    result = run(driver, "recover", str(path))

    assert result.exit_code == 1
    assert "Traceback" not in result.stderr
    message = result.stderr.splitlines()[0]
    assert message == (f"Error: corrupt log segment {segments[1]} at byte offset {offset}: "
                       f"checksum mismatch")
    assert f"wbcache recover --salvage {path}" in result.stderr
    assert tree_state(path) == before
    as_json = run(driver, "recover", "--json", str(path))
    assert as_json.exit_code == 1
    assert {key: as_json.json()[key] for key in ("ok", "error", "segment", "offset")} == \
        {"ok": False, "error": "corrupt_log", "segment": str(segments[1]), "offset": offset}
    assert tree_state(path) == before


@pytest.mark.parametrize("driver", DRIVERS)
def test_salvage_replays_up_to_the_damage_and_quarantines_the_rest_byte_for_byte(
        tmp_path: Path, driver: str) -> None:
    path = tmp_path / "cache"
    segments = three_segment_log(path)
    damaged_at = frame_offsets(segments[1])[49]  # LSN 150
    flip_byte(segments[1], damaged_at + 20)
    originals = {segment.name: segment.read_bytes() for segment in segments[1:]}
    before = tree_state(path)

    preview = run(driver, "recover", "--salvage", "--dry-run", "--json", str(path))
    assert preview.exit_code == 0, preview.stderr
    assert tree_state(path) == before
    result = run(driver, "recover", "--salvage", "--yes", "--json", str(path))

    assert result.exit_code == 0, result.stderr
    report = result.json()
    aside = report["set_aside"]
    expected_bytes = (len(originals[segments[1].name]) - damaged_at
                      + len(originals[segments[2].name]))
    assert (report["replayed"], report["checkpoint_after"]) == (149, 149)
    assert aside["records_set_aside"] == 150  # LSNs 151..300 are intact; 150 was destroyed
    assert aside["records_unreadable"] == 1
    assert (aside["first_lsn"], aside["last_lsn"]) == (151, 300)
    assert aside["bytes_set_aside"] == expected_bytes
    assert [(item["name"], item["offset"], item["reason"]) for item in aside["segments"]] == [
        (segments[1].name, damaged_at, "checksum mismatch"), (segments[2].name, 0, None)]
    preview_aside = dict(preview.json()["set_aside"], quarantine_dir=aside["quarantine_dir"])
    for item in preview_aside["segments"]:
        item["moved_to"] = os.path.join(aside["quarantine_dir"], item["name"])
    assert preview_aside == aside  # the dry run predicted exactly what was done
    run_dir = Path(aside["quarantine_dir"])
    assert run_dir.parent == path / "quarantine"
    assert {name: (run_dir / name).read_bytes() for name in originals} == originals
    assert json.loads((run_dir / "salvage.json").read_text())["set_aside"] == aside
    assert list((path / "wal").iterdir()) == []
    assert stored(path) == {f"key-{lsn}": lsn for lsn in range(1, 150)}
    listed = run(driver, "inspect", "--json", str(path)).json()["quarantine"]
    assert sorted(item["path"] for item in listed) == sorted(
        f"{run_dir.name}/{name}" for name in [*originals, "salvage.json"])
    with wbcache.open(path) as cache:  # opens cleanly; the next write takes LSN 150
        assert cache.recovery.replayed == 0
        assert cache.put("after", 1) == 150


@pytest.mark.parametrize("crash_at", ["recovery.after_replay", "recovery.after_delete"])
def test_a_salvage_killed_part_way_is_finished_by_running_it_again(tmp_path: Path,
                                                                   crash_at: str) -> None:
    path = tmp_path / "cache"
    segments = three_segment_log(path)
    flip_byte(segments[1], frame_offsets(segments[1])[49] + 20)  # LSN 150

    killed = subprocess.run([str(WBCACHE), "recover", "--salvage", "--yes", str(path)],
                            env=dict(os.environ, WBCACHE_CRASH_AT=crash_at),
                            capture_output=True, timeout=60)
    if crash_at == "recovery.after_replay":  # the damage is still in wal/: opening refuses
        with pytest.raises(CorruptLogError, match="00000000000000000101.log"):
            wbcache.open(path)
    again = run("script", "recover", "--salvage", "--yes", "--json", str(path))

    assert killed.returncode == -signal.SIGKILL
    assert again.exit_code == 0, again.stderr
    assert list((path / "wal").iterdir()) == []
    assert stored(path) == {f"key-{lsn}": lsn for lsn in range(1, 150)}
    quarantined = sorted(p.name for p in (path / "quarantine").rglob("*.log"))
    assert quarantined == [segments[1].name, segments[2].name]
    with wbcache.open(path) as cache:
        assert cache.recovery.replayed == 0


@pytest.mark.parametrize("driver", DRIVERS)
def test_salvage_asks_first_and_a_no_changes_nothing(tmp_path: Path, driver: str) -> None:
    path = tmp_path / "cache"
    segments = three_segment_log(path)
    flip_byte(segments[0], frame_offsets(segments[0])[10] + 20)
    before = tree_state(path)

    declined = run(driver, "recover", "--salvage", str(path), input="n\n")

    assert declined.exit_code == 1 and declined.stdout == ""
    assert "records set aside" in declined.stderr
    assert "not confirmed: nothing was changed" in declined.stderr
    assert tree_state(path) == before
    unanswered = run(driver, "recover", "--salvage", str(path), input="")
    assert unanswered.exit_code == 1 and "Aborted!" not in unanswered.stderr
    assert "run again with --yes" in unanswered.stderr
    assert tree_state(path) == before
    for answer, says in (("n\n", "not confirmed"), ("", "run again with --yes")):
        as_json = run(driver, "recover", "--salvage", "--json", str(path), input=answer)
        assert as_json.exit_code == 1  # and, as every error with --json, one JSON object
        document = as_json.json()
        assert (document["ok"], document["exit_code"], document["error"]) == (False, 1, "error")
        assert says in document["message"] and "nothing was changed" in document["message"]
    assert tree_state(path) == before
    accepted = run(driver, "recover", "--salvage", str(path), input="y\n")
    assert accepted.exit_code == 0, accepted.stderr
    assert len(list((path / "quarantine").iterdir())) == 1


@pytest.mark.parametrize("driver", DRIVERS)
def test_salvage_sets_aside_only_a_damaged_segment_the_checkpoint_covers(
        tmp_path: Path, driver: str) -> None:
    # A crash between a flush's commit and its truncation leaves covered segments behind; if
    # one of them rots, nothing after it is lost, so nothing after it may be set aside.
    path = tmp_path / "cache"
    segments = three_segment_log(path)
    backend = LmdbBackend(str(path / "db"))
    backend.apply([(f"key-{lsn}", msgpack.packb(lsn)) for lsn in range(1, 201)], [], 200)
    backend.close()
    flip_byte(segments[0], frame_offsets(segments[0])[50] + 20)  # LSN 51, in the database

    result = run(driver, "recover", "--salvage", "--yes", "--json", str(path))

    assert result.exit_code == 0, result.stderr
    report = result.json()
    aside = report["set_aside"]
    assert [item["name"] for item in aside["segments"]] == [segments[0].name]
    assert (aside["records_set_aside"], aside["records_in_database"]) == (0, 49)
    assert (report["replayed"], report["checkpoint_after"]) == (100, 300)
    assert stored(path) == {f"key-{lsn}": lsn for lsn in range(1, 301)}


@pytest.mark.parametrize("driver", DRIVERS)
def test_missing_records_between_segments_are_refused_then_salvaged(tmp_path: Path,
                                                                    driver: str) -> None:
    path = tmp_path / "cache"
    segments = three_segment_log(path)
    segments[1].unlink()  # LSNs 101..200 are gone

    refused = run(driver, "recover", str(path))
    salvaged = run(driver, "recover", "--salvage", "--yes", "--json", str(path))

    assert refused.exit_code == 1
    assert (f"corrupt log segment {segments[2]} at byte offset 0: records 101..200 are missing"
            in refused.stderr)
    assert salvaged.exit_code == 0, salvaged.stderr
    aside = salvaged.json()["set_aside"]
    assert (aside["records_set_aside"], aside["records_unreadable"]) == (100, 100)
    assert stored(path) == {f"key-{lsn}": lsn for lsn in range(1, 101)}


@pytest.mark.parametrize("driver", DRIVERS)
def test_salvage_of_a_clean_log_is_a_plain_recovery(tmp_path: Path, driver: str) -> None:
    path = tmp_path / "cache"
    three_segment_log(path)

    result = run(driver, "recover", "--salvage", str(path))

    assert result.exit_code == 0, result.stderr
    assert "no damage found: nothing set aside" in result.stdout
    assert not (path / "quarantine").exists()
    assert len(stored(path)) == 300


def test_recover_of_a_torn_value_full_of_frame_headers_does_not_hang(tmp_path: Path) -> None:
    """The progress bar's estimate samples the last segment from its middle, inside such a
    value: each header, claiming 1 MiB, cost a checksum of 1 MiB (the recovery itself reads
    it in one pass), and `recover` still ran after 60 s. The estimate now gives up in time."""
    path = tmp_path / "cache"
    new_cache_dir(path)
    segment = write_segment(path / "wal", puts(1, 3))
    value = FRAME.pack(FRAME_MAGIC, 1 << 20, 0) * ((4 << 20) // FRAME_SIZE)
    torn = frame(put(4, "backup", value))
    with segment.open("ab") as file:
        file.write(torn[:len(torn) * 9 // 10])  # the write a crash cut off

    result = subprocess.run([str(WBCACHE), "recover", str(path)], capture_output=True,
                            text=True, timeout=60)

    assert result.returncode == 0, result.stderr
    assert stored(path) == {f"key-{lsn}": lsn for lsn in (1, 2, 3)}


# ------------------------------------------------------------------ progress


def _run_on_a_terminal(*args: str) -> tuple[int, str, bytes]:
    """Run the script with stderr on a pseudo-terminal: (exit code, stdout, terminal bytes)."""
    controller, terminal = pty.openpty()
    child = subprocess.Popen([str(WBCACHE), *args], stdout=subprocess.PIPE, stderr=terminal)
    os.close(terminal)
    seen = b""
    while True:
        try:
            chunk = os.read(controller, 65536)
        except OSError:  # EIO: the child closed its end
            break
        if not chunk:
            break
        seen += chunk
    os.close(controller)
    stdout = child.communicate(timeout=60)[0].decode()
    return child.returncode, stdout, seen


def test_a_long_log_shows_a_progress_bar_on_a_terminal_but_not_with_json(tmp_path: Path) -> None:
    paths = [tmp_path / "bar", tmp_path / "json"]
    for path in paths:
        new_cache_dir(path)
        write_segment(path / "wal", puts(1, 70_000))  # progress is reported every 65,536

    code, stdout, terminal = _run_on_a_terminal("recover", str(paths[0]))
    json_code, json_stdout, json_terminal = _run_on_a_terminal("recover", "--json",
                                                               str(paths[1]))

    assert code == 0 and "replayed 70,000 log records" in stdout
    assert b"reading the log" in terminal and b"70000/70000" in terminal
    assert json_code == 0 and json_terminal == b""
    assert json.loads(json_stdout)["replayed"] == 70_000


def test_the_replay_bar_is_sized_by_the_records_the_read_counted(tmp_path: Path) -> None:
    """The first pass's total is sampled from the last segment, and runs of small and large
    records mislead it (38,446 for this log of 70,000). The replay pass's bar was sized by
    the same guess; it now takes the reading pass's count."""
    path = new_cache_dir(tmp_path / "cache")
    write_segment(path / "wal", [put(lsn, f"key-{lsn}", "x" * (1 if lsn // 5000 % 2 else 300))
                                 for lsn in range(1, 70_001)])
    seen: list[tuple[str, int, int]] = []

    recover_directory(path, progress=lambda *report: seen.append(report))

    reading = [estimate for phase, _, estimate in seen if phase == "reading"]
    replaying = [estimate for phase, _, estimate in seen if phase == "replaying"]
    assert reading[0] != 70_000  # the sample's guess, which this log makes wrong
    assert replaying and set(replaying) == {70_000}
    assert seen[-1] == ("replaying", 70_000, 70_000)


@pytest.mark.parametrize("driver", DRIVERS)
def test_no_progress_bar_when_stderr_is_not_a_terminal(tmp_path: Path, driver: str) -> None:
    path = tmp_path / "cache"
    new_cache_dir(path)
    write_segment(path / "wal", puts(1, 70_000))

    result = run(driver, "recover", str(path))

    assert result.exit_code == 0 and result.stderr == ""
    assert "replayed 70,000 log records" in result.stdout


@pytest.mark.parametrize("driver", DRIVERS)
def test_yes_without_salvage_is_a_usage_error(tmp_path: Path, driver: str) -> None:
    path = tmp_path / "cache"
    three_segment_log(path)
    before = tree_state(path)
    result = run(driver, "recover", "--yes", str(path))
    assert result.exit_code == 2 and "--yes only answers --salvage" in result.stderr
    assert tree_state(path) == before
