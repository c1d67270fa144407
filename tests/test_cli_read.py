"""`wbcache inspect`, `verify`, `stats`, `dump` and `get`: what they report, that they change
no byte, that they run beside a live cache, and that the JSON encoding of values is exact.

Each test runs the command in-process (CliRunner) and as a subprocess of the installed script.
A little over 500 lines: the five read commands share their directory builders here.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

import msgpack
import pytest
from cli_support import (
    DRIVERS,
    flip_byte,
    frame_offsets,
    kill_writer,
    live_owner,
    new_cache_dir,
    put,
    run,
    three_segment_log,
    tree_state,
    write_segment,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from log_bytes import frame

import wbcache
from wbcache.backends.lmdb import LmdbBackend
from wbcache.cli.ops_encoding import decode_json, encode_json
from wbcache.errors import CorruptLogError
from wbcache.wal.format import encode_header, encode_mark
from wbcache.wal.records import OP_BATCH, OP_DELETE, OP_INCR, OP_PUT
from wbcache.wal.segments import segment_name


def seed_database(path: Path, entries: dict[Any, Any], checkpoint: int) -> None:
    backend = LmdbBackend(str(path / "db"))
    try:
        backend.apply([(key, msgpack.packb(value)) for key, value in entries.items()], [],
                      checkpoint)
    finally:
        backend.close()


def half_flushed(path: Path) -> list[Path]:
    """LSNs 1..300 in three segments; the database holds 1..150 (checkpoint 150)."""
    segments = three_segment_log(path)
    seed_database(path, {f"key-{lsn}": lsn for lsn in range(1, 151)}, 150)
    return segments


# ------------------------------------------------------------------ inspect


@pytest.mark.parametrize("driver", DRIVERS)
def test_inspect_shows_checkpoint_segments_pending_records_and_owner(tmp_path: Path,
                                                                     driver: str) -> None:
    path = tmp_path / "cache"
    segments = half_flushed(path)

    result = run(driver, "inspect", "--json", str(path))

    assert result.exit_code == 0, result.stderr
    report = result.json()
    assert {key: report[key] for key in ("ok", "live_owner", "owner_pid", "checkpoint_lsn",
                                         "database_entries", "pending_records", "last_lsn",
                                         "next_lsn", "wal_segments", "torn_bytes")} == {
        "ok": True, "live_owner": False, "owner_pid": None, "checkpoint_lsn": 150,
        "database_entries": 150, "pending_records": 150, "last_lsn": 300, "next_lsn": 301,
        "wal_segments": 3, "torn_bytes": 0}
    assert report["segments"] == [
        {"name": segment.name, "size": segment.stat().st_size, "first_lsn": first,
         "last_lsn": first + 99, "records": 100, "pending": pending, "torn_bytes": 0,
         "damage": None}
        for segment, first, pending in zip(segments, (1, 101, 201), (0, 50, 100), strict=True)]
    assert report["wal_bytes"] == sum(segment.stat().st_size for segment in segments)
    human = run(driver, "inspect", str(path))
    assert human.exit_code == 0
    lines = human.stdout.splitlines()
    rows = dict(re.match(r"  (\S.*?)  +(\S+.*)$", line).groups() for line in lines[1:8])
    assert rows["pending records"] == "150  newer than the checkpoint: replayed by recover or open"
    assert rows["checkpoint LSN"].startswith("150  ")
    assert lines[-1].split() == [segments[2].name, f"{segments[2].stat().st_size:,}", "201",
                                 "300", "100", "100", "ok"]


@pytest.mark.parametrize("driver", DRIVERS)
def test_inspect_marks_the_damaged_segment_and_exits_1(tmp_path: Path, driver: str) -> None:
    path = tmp_path / "cache"
    segments = half_flushed(path)
    offset = frame_offsets(segments[2])[10]
    flip_byte(segments[2], offset + 20)

    result = run(driver, "inspect", "--json", str(path))

    assert result.exit_code == 1
    report = result.json()
    assert report["ok"] is False and report["next_lsn"] is None
    reason = f"checksum mismatch; a valid record follows at offset {frame_offsets(segments[2])[11]}"
    assert report["segments"][2]["damage"] == {"offset": offset, "reason": reason}
    assert report["segments"][2]["records"] == 10
    assert report["problems"] == [f"corrupt log segment {segments[2]} at byte offset {offset}: "
                                  f"{reason}"]


# ------------------------------------------------------------------ verify


@pytest.mark.parametrize("driver", DRIVERS)
def test_verify_of_a_clean_directory_exits_0(tmp_path: Path, driver: str) -> None:
    path = tmp_path / "cache"
    half_flushed(path)

    result = run(driver, "verify", str(path))

    assert result.exit_code == 0, result.stderr
    assert result.stdout.splitlines() == [
        "log       3 segments, 300 records (150 newer than the checkpoint)",
        "database  150 entries, checkpoint LSN 150",
        "ok: no damage found",
    ]


@pytest.mark.parametrize("driver", DRIVERS)
def test_verify_lists_each_problem_on_its_own_line_and_exits_1(tmp_path: Path,
                                                              driver: str) -> None:
    path = tmp_path / "cache"
    segments = half_flushed(path)
    first = frame_offsets(segments[0])
    second = frame_offsets(segments[1])[49]
    flip_byte(segments[0], first[49] + 20)
    flip_byte(segments[0], first[80] + 20)  # a second damage in the same segment
    flip_byte(segments[1], second + 20)
    before = tree_state(path)

    result = run(driver, "verify", str(path))
    as_json = run(driver, "verify", "--json", str(path))

    assert result.exit_code == as_json.exit_code == 1
    damaged = [line for line in result.stdout.splitlines() if line.startswith("DAMAGED: ")]
    assert damaged == [
        f"DAMAGED: corrupt log segment {segments[0]} at byte offset {first[49]}: "
        f"checksum mismatch",
        f"DAMAGED: corrupt log segment {segments[0]} at byte offset {first[80]}: "
        f"further damage: bytes {first[80]}..{first[81] - 1} hold no intact record",
        f"DAMAGED: corrupt log segment {segments[1]} at byte offset {second}: "
        f"checksum mismatch",
    ]
    assert "3 problems found; nothing was changed." in result.stderr
    assert f"wbcache recover --salvage {path}" in result.stderr
    assert f"into {path}/quarantine/ (preview with --dry-run)" in result.stderr  # as recover's
    assert [(p["segment"], p["offset"]) for p in as_json.json()["problems"]] == [
        (str(segments[0]), first[49]), (str(segments[0]), first[80]), (str(segments[1]), second)]
    assert tree_state(path) == before


@pytest.mark.parametrize("driver", DRIVERS)
def test_verify_takes_sync_marks_and_a_reserved_zero_tail_for_the_writers_own(
        tmp_path: Path, driver: str) -> None:
    """An fsync="interval" segment holds sync marks between its frames and zeros reserved to
    its end, which the walker reads as the writer's. After a first damage, verify's look for
    further damage called each mark and the zero tail "further damage" too (an outside hunt:
    6 problems listed for 1). A real further damage is still listed, alone."""
    path = new_cache_dir(tmp_path / "cache")
    frames = [frame(put(lsn, f"k{lsn}", lsn)) for lsn in range(1, 11)]
    header = encode_header(sync_marks=True)
    data = bytearray(header)
    offsets = []
    for index, framed in enumerate(frames):
        offsets.append(len(data))
        data += framed
        if index in (3, 6):
            data += encode_mark(len(data))
    data += bytes(4096)  # reserved by the writer, never reached
    segment = path / "wal" / segment_name(1)
    segment.write_bytes(bytes(data))
    flip_byte(segment, offsets[1] + 20)  # the first damage: the walker stops there
    result = run(driver, "verify", str(path))
    assert result.exit_code == 1
    assert "1 problem found" in result.stderr, result.stdout + result.stderr
    flip_byte(segment, offsets[8] + 20)  # a further damage, between a mark and the tail
    result = run(driver, "verify", str(path))
    damaged = [line for line in result.stdout.splitlines() if line.startswith("DAMAGED: ")]
    assert damaged[1:] == [
        f"DAMAGED: corrupt log segment {segment} at byte offset {offsets[8]}: further damage: "
        f"bytes {offsets[8]}..{offsets[9] - 1} hold no intact record"]
    assert "2 problems found" in result.stderr
    # In a segment whose header says no marks, a mark is not the writer's: damage like any.
    segment.write_bytes(encode_header() + bytes(data[len(header):]))
    damaged = [line for line in run(driver, "verify", str(path)).stdout.splitlines()
               if line.startswith("DAMAGED: ")]
    assert len(damaged) == 3 and "bad frame marker" in damaged[0], damaged
    assert all("further damage: bytes " in line for line in damaged[1:]), damaged  # the
    # second mark, and the zeros (no reserved end without marks)


def _damage(path: Path, kind: str) -> None:
    segments = three_segment_log(path)
    if kind == "checksum":
        flip_byte(segments[1], frame_offsets(segments[1])[5] + 20)
    elif kind == "gap":
        segments[1].unlink()
    elif kind == "header":
        flip_byte(segments[0], 3)
    elif kind == "torn tail":
        data = segments[2].read_bytes()
        segments[2].write_bytes(data[:-7])
    elif kind == "damage before a valid frame in the last segment":
        flip_byte(segments[2], frame_offsets(segments[2])[98] + 15)
    elif kind == "lsn out of sequence":
        write_segment(path / "wal", [put(1, "x", 1)], first_lsn=301)
    else:
        raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["checksum", "gap", "header", "torn tail", "lsn out of sequence",
                                  "damage before a valid frame in the last segment"])
def test_verify_judges_the_log_exactly_as_opening_the_cache_does(tmp_path: Path,
                                                                 kind: str) -> None:
    path = tmp_path / "cache"
    _damage(path, kind)

    verdict = run("runner", "verify", "--json", str(path)).json()

    try:
        wbcache.open(path).close()
    except CorruptLogError as exc:
        assert verdict["problems"][0]["message"] == str(exc)
        assert verdict["ok"] is False
    else:
        assert verdict["ok"] is True and kind == "torn tail"
        assert verdict["torn_bytes"] > 0


@pytest.mark.parametrize("driver", DRIVERS)
def test_verify_and_dump_report_a_database_value_that_does_not_decode(tmp_path: Path,
                                                                      driver: str) -> None:
    path = tmp_path / "cache"
    new_cache_dir(path)
    backend = LmdbBackend(str(path / "db"))
    backend.apply([("good", msgpack.packb(1)), ("bad", b"\xc1")], [], 0)
    backend.close()

    verified = run(driver, "verify", str(path))
    dumped = run(driver, "dump", str(path))

    assert verified.exit_code == 1
    damaged = [line for line in verified.stdout.splitlines() if line.startswith("DAMAGED")]
    assert len(damaged) == 1
    assert damaged[0].startswith("DAMAGED: database value of key 'bad' cannot be decoded (")
    assert dumped.exit_code == 1
    assert [json.loads(line) for line in dumped.stdout.splitlines()] == [
        {"key": "bad", "value": {"$raw": "wQ=="}}, {"key": "good", "value": 1}]
    assert "1 stored values could not be decoded" in dumped.stderr


# ------------------------------------------------------------------ beside a live cache


@pytest.mark.parametrize("driver", DRIVERS)
def test_read_only_commands_run_beside_a_live_cache_and_say_the_view_may_be_stale(
        tmp_path: Path, driver: str) -> None:
    path = tmp_path / "cache"
    with live_owner(path) as pid:
        inspected = run(driver, "inspect", "--json", str(path))
        verified = run(driver, "verify", str(path))
        got = run(driver, "get", str(path), "held")
        refused = run(driver, "recover", "--dry-run", str(path))

    warning = f"warning: {path} is in use by a live cache (pid {pid}); this view may be stale"
    for result in (inspected, verified, got):
        assert result.exit_code == 0, result.stderr
        assert warning in result.stderr
    assert (inspected.json()["live_owner"], inspected.json()["owner_pid"]) == (True, pid)
    assert json.loads(got.stdout) == "by a live cache"
    assert refused.exit_code == 3
    assert f"in use by a live cache (pid {pid})" in refused.stderr


# ------------------------------------------------------------------ nothing changes


@pytest.mark.parametrize("driver", DRIVERS)
def test_read_only_commands_change_no_byte_of_a_directory_left_by_kill_9(tmp_path: Path,
                                                                       driver: str) -> None:
    path = tmp_path / "cache"
    acked = kill_writer(path, flushed=50, acks=300)
    before = tree_state(path)

    results = [run(driver, *args) for args in (
        ("inspect", str(path)), ("verify", str(path)), ("stats", "--json", str(path)),
        ("dump", str(path)), ("dump", "--pending", "--format", "table", str(path)),
        ("get", str(path), "t0:0"))]

    assert [result.exit_code for result in results] == [0] * 6, [r.stderr for r in results]
    assert tree_state(path) == before
    dumped = {json.loads(line)["key"]: json.loads(line)["value"]
              for line in results[3].stdout.splitlines()}
    assert dumped.items() >= acked.items()
    assert results[2].json()["entries_after_recovery"] == len(dumped)


# ------------------------------------------------------------------ dump and get


# Every kind of key and value, with the traps: "a" vs b"a", 1 vs 1.0 vs True, a dict that
# looks like a tag, non-str dict keys, NaN and infinities.
VALUES: dict[Any, Any] = {
    "a": "str key",
    b"a": "bytes key",
    "int": 1,
    "float": 1.0,
    "bool": True,
    "none": None,
    "nan": math.nan,
    "inf": [math.inf, -math.inf, -0.0],
    "big": [2**63 - 1, -(2**63), 2**64 - 1],
    "bytes": b"\x00\xff",
    "looks like a tag": {"$bytes": "AAAA"},
    "int keys": {1: "one", b"k": [b"v"], "s": None},
    "nested": {"list": [1, "two", b"three", {"four": 4.5}]},
    "ключ": "",
    b"\x00\xfe": [],
}


def directory_with_every_kind_of_value(path: Path) -> dict[Any, Any]:
    """Half of VALUES flushed into the database, half only in the log, one database key
    deleted by the log; returns what the cache holds after recovery."""
    items = list(VALUES.items())
    with wbcache.open(path) as cache:
        cache.put_many(items[::2] + [("deleted later", 0)])
        cache.flush()
        checkpoint = cache.stats()["checkpoint_lsn"]
    for segment in (path / "wal").iterdir():
        segment.unlink()
    records = [[checkpoint + 1 + i, OP_PUT, key, msgpack.packb(value)]
               for i, (key, value) in enumerate(items[1::2])]
    records.append([checkpoint + 1 + len(records), OP_DELETE, "deleted later"])
    write_segment(path / "wal", records)
    return dict(VALUES)


def packed(mapping: dict[Any, Any]) -> dict[Any, bytes]:
    """Values as msgpack bytes: equal only if equal in type too (1 == 1.0 == True in Python)."""
    return {key: msgpack.packb(value) for key, value in mapping.items()}


@pytest.mark.parametrize("driver", DRIVERS)
def test_dump_writes_every_key_and_value_so_it_reads_back_exactly(tmp_path: Path,
                                                                  driver: str) -> None:
    path = tmp_path / "cache"
    expected = directory_with_every_kind_of_value(path)

    result = run(driver, "dump", str(path))

    assert result.exit_code == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    dumped = {decode_json(line["key"]): decode_json(line["value"]) for line in lines}
    assert packed(dumped) == packed(expected)
    keys = [decode_json(line["key"]) for line in lines]
    assert keys == sorted((k for k in keys if type(k) is str), key=str.encode) + \
        sorted(k for k in keys if type(k) is bytes)
    assert {"key": {"$bytes": "YQ=="}, "value": "bytes key"} in lines
    assert {"key": "looks like a tag", "value": {"$map": [["$bytes", "AAAA"]]}} in lines
    assert {"key": "nan", "value": {"$float": "nan"}} in lines
    with wbcache.open(path) as cache:  # the dump is what the cache itself holds
        assert packed(dict(cache.items())) == packed(dumped)


@pytest.mark.parametrize("driver", DRIVERS)
def test_dump_json_holds_the_same_entries_as_jsonl(tmp_path: Path, driver: str) -> None:
    path = tmp_path / "cache"
    directory_with_every_kind_of_value(path)

    lines = [json.loads(line) for line in run(driver, "dump", str(path)).stdout.splitlines()]
    document = run(driver, "dump", "--json", str(path)).json()

    assert document["entries"] == lines and document["count"] == len(VALUES)
    assert document["ok"] is True and document["pending"] is False


@pytest.mark.parametrize("driver", DRIVERS)
def test_dump_pending_lists_each_record_not_yet_in_the_database(tmp_path: Path,
                                                                driver: str) -> None:
    path = tmp_path / "cache"
    new_cache_dir(path)
    seed_database(path, {"old": 1}, 1)
    write_segment(path / "wal", [
        put(1, "old", "already in the database"),
        put(2, "a", b"\x01"),
        [3, OP_DELETE, "old"],
        [4, OP_INCR, b"n", 5, 5],
        [5, OP_BATCH, [[OP_PUT, "b", msgpack.packb([1])], [OP_DELETE, "a"],
                       [OP_INCR, b"n", 2, 7]]],
    ])

    result = run(driver, "dump", "--pending", str(path))

    assert result.exit_code == 0, result.stderr
    assert [json.loads(line) for line in result.stdout.splitlines()] == [
        {"lsn": 2, "op": "put", "key": "a", "value": {"$bytes": "AQ=="}},
        {"lsn": 3, "op": "delete", "key": "old"},
        {"lsn": 4, "op": "incr", "key": {"$bytes": "bg=="}, "delta": 5, "value": 5},
        {"lsn": 5, "op": "batch", "ops": [
            {"op": "put", "key": "b", "value": [1]},
            {"op": "delete", "key": "a"},
            {"op": "incr", "key": {"$bytes": "bg=="}, "delta": 2, "value": 7}]},
    ]
    table = run(driver, "dump", "--pending", "--format", "table", str(path))
    assert table.stdout.splitlines()[0].split() == ["LSN", "op", "key", "value"]
    assert table.stdout.splitlines()[-2].split() == ["5", "batch:incr", "b'n'", "7", "(+2)"]


@pytest.mark.parametrize("driver", DRIVERS)
def test_dump_of_a_damaged_log_prints_nothing_and_exits_1(tmp_path: Path, driver: str) -> None:
    path = tmp_path / "cache"
    segments = three_segment_log(path)
    flip_byte(segments[1], frame_offsets(segments[1])[5] + 20)

    result = run(driver, "dump", str(path))

    assert result.exit_code == 1 and result.stdout == ""
    assert f"corrupt log segment {segments[1]}" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("driver", DRIVERS)
def test_get_reads_the_log_then_the_database_and_keeps_str_and_bytes_keys_apart(
        tmp_path: Path, driver: str) -> None:
    path = tmp_path / "cache"
    directory_with_every_kind_of_value(path)

    from_log = run(driver, "get", "--json", str(path), "a")
    from_db = run(driver, "get", str(path), "--bytes", "a")
    by_hex = run(driver, "get", str(path), "--hex", "00fe")
    missing = run(driver, "get", str(path), "nope")
    deleted = run(driver, "get", str(path), "deleted later")

    document = from_log.json()
    assert from_log.exit_code == 0
    assert (document["found"], document["value"], document["key"]) == (True, "str key", "a")
    assert document["source"] in ("log", "database")
    assert (from_db.exit_code, json.loads(from_db.stdout)) == (0, "bytes key")
    assert (by_hex.exit_code, json.loads(by_hex.stdout)) == (0, [])
    assert (missing.exit_code, missing.stdout) == (1, "")
    assert missing.stderr == "key 'nope' not found\n"
    assert (deleted.exit_code, deleted.stderr) == (1, "key 'deleted later' not found\n")


@pytest.mark.parametrize("driver", DRIVERS)
def test_get_says_when_the_key_exists_with_the_other_type(tmp_path: Path, driver: str) -> None:
    path = tmp_path / "cache"
    new_cache_dir(path)
    write_segment(path / "wal", [put(1, b"only-bytes", 1)])

    result = run(driver, "get", str(path), "only-bytes")

    assert result.exit_code == 1
    assert result.stderr == ("key 'only-bytes' not found (a bytes key of that name exists: "
                             "use --bytes)\n")


@pytest.mark.parametrize("driver", DRIVERS)
def test_get_of_a_key_no_write_can_have_stored_is_a_usage_error(tmp_path: Path,
                                                                driver: str) -> None:
    """An empty key, and a str key that is not UTF-8 (a shell argument holding byte 0xff),
    reached the database and printed its traceback. With --bytes that argument names the
    bytes key it spells."""
    path = tmp_path / "cache"
    new_cache_dir(path)
    not_utf8 = os.fsdecode(b"k\xff")
    write_segment(path / "wal", [put(1, b"k\xff", 1)])

    empty = run(driver, "get", str(path), "")
    empty_hex = run(driver, "get", "--hex", str(path), "")
    as_str = run(driver, "get", str(path), not_utf8)
    as_bytes = run(driver, "get", "--bytes", str(path), not_utf8)

    for result in (empty, empty_hex, as_str):
        assert result.exit_code == 2 and "Traceback" not in result.stderr, result.stderr
    assert "keys must not be empty" in empty.stderr and "must not be empty" in empty_hex.stderr
    assert "cannot be encoded as UTF-8" in as_str.stderr and "--bytes" in as_str.stderr
    assert (as_bytes.exit_code, json.loads(as_bytes.stdout)) == (0, 1)


@pytest.mark.parametrize("driver", DRIVERS)
def test_a_cache_directory_whose_name_is_not_utf8_is_opened_read_and_recovered(
        tmp_path: Path, driver: str) -> None:
    """A legal Linux name that is not UTF-8 (Latin-1's e-acute) gave every command a traceback
    and the open a raw UnicodeEncodeError (py-lmdb encodes a str path as strict UTF-8),
    leaving acknowledged writes in a log no command could reach (an attacker's hunt)."""
    path = Path(os.fsdecode(os.fsencode(tmp_path) + b"/cach\xe9"))
    acked = kill_writer(path, flushed=20, acks=200)  # opened new there, then SIGKILLed
    strict = {"PYTHONIOENCODING": "utf-8:strict"}  # stdout as under a UTF-8 locale
    for command in ("inspect", "verify", "stats", "dump"):
        result = run(driver, command, str(path), env=strict)
        assert result.exit_code == 0 and "Traceback" not in result.stderr, result.stderr
    assert f"{tmp_path}/cach" in run(driver, "inspect", str(path), env=strict).stdout
    assert run(driver, "recover", str(path), env=strict).exit_code == 0
    with wbcache.open(path) as cache:
        assert {key: cache.get(key) for key in acked} == acked


# ------------------------------------------------------------------ stats


@pytest.mark.parametrize("driver", DRIVERS)
def test_stats_counts_the_database_and_the_pending_records_by_kind(tmp_path: Path,
                                                                   driver: str) -> None:
    path = tmp_path / "cache"
    new_cache_dir(path)
    seed_database(path, {"old": 1, b"raw": b"xyz"}, 1)
    write_segment(path / "wal", [
        put(2, "a", 1), [3, OP_DELETE, "old"], [4, OP_INCR, "n", 5, 5],
        [5, OP_BATCH, [[OP_PUT, "b", msgpack.packb(2)], [OP_INCR, "n", 1, 6]]],
    ])

    result = run(driver, "stats", "--json", str(path))

    assert result.exit_code == 0, result.stderr
    stats = result.json()
    assert {key: stats[key] for key in (
        "checkpoint_lsn", "last_lsn", "database_entries", "database_str_keys",
        "database_bytes_keys", "pending_records", "pending_keys", "pending_puts",
        "pending_deletes", "pending_incrs", "pending_batches", "entries_after_recovery",
        "wal_segments", "quarantine_files")} == {
        "checkpoint_lsn": 1, "last_lsn": 5, "database_entries": 2, "database_str_keys": 1,
        "database_bytes_keys": 1, "pending_records": 4, "pending_keys": 4, "pending_puts": 2,
        "pending_deletes": 1, "pending_incrs": 2, "pending_batches": 1,
        "entries_after_recovery": 4, "wal_segments": 1, "quarantine_files": 0}
    with wbcache.open(path) as cache:
        assert len(cache) == stats["entries_after_recovery"]


# ------------------------------------------------------------------ the encoding

msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=True, allow_infinity=True) | st.text() | st.binary(),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text() | st.binary() | st.integers(-5, 5) | st.sampled_from(
        ["$bytes", "$map", "$float", "$ext", "$"]), children, max_size=4),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(msgpack_values)
def test_the_json_encoding_reads_back_every_value_with_its_type(value: Any) -> None:
    text = json.dumps(encode_json(value))

    assert msgpack.packb(decode_json(json.loads(text))) == msgpack.packb(value)
