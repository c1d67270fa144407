"""`wbcache dump` and `get` on values the cache accepts that are odd to show: msgpack
Timestamps (extension type -1, which msgpack.ExtType refuses), and values nested as deep as
msgpack reads (1023 levels), past Python's recursion limit.

Each test runs the command in-process (CliRunner) and as a subprocess of the installed script.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import msgpack
import pytest
from cli_support import DRIVERS, new_cache_dir, put, run, write_segment

import wbcache
from wbcache.cli.ops_encoding import decode_json, encode_json

# the three sizes of msgpack's timestamp: 32-bit, 64-bit and 96-bit (a negative second)
TIMESTAMPS = {"t32": msgpack.Timestamp(1, 0), "t64": msgpack.Timestamp(1, 2),
              "t96": msgpack.Timestamp(-1, 500)}


@pytest.mark.parametrize("driver", DRIVERS)
def test_every_format_shows_a_timestamp_value(tmp_path: Path, driver: str) -> None:
    """The table decodes each value to show it: a Timestamp came back as ExtType(-1, ...),
    which msgpack refuses (a traceback). It shows the Timestamp the cache returns, the same
    {"$ext": [-1, ...]} the JSON formats print."""
    path = tmp_path / "cache"
    with wbcache.open(path) as cache:
        for key, value in TIMESTAMPS.items():
            cache.put(key, value)

    lines = run(driver, "dump", str(path))
    table = run(driver, "dump", "--format", "table", str(path))
    got = run(driver, "get", str(path), "t96")

    assert lines.exit_code == table.exit_code == got.exit_code == 0, table.stderr
    dumped = {line["key"]: line["value"] for line in map(json.loads, lines.stdout.splitlines())}
    assert {key: decode_json(value) for key, value in dumped.items()} == TIMESTAMPS
    assert all(value["$ext"][0] == -1 for value in dumped.values())
    assert json.loads(got.stdout) == dumped["t96"]
    assert table.stdout.splitlines()[1:-1] == [
        f"{key!r}  {value!r}" for key, value in TIMESTAMPS.items()]


@pytest.mark.parametrize("driver", DRIVERS)
def test_the_pending_table_shows_a_logged_timestamp(tmp_path: Path, driver: str) -> None:
    """The same decoding shows the log's records (`dump --pending --format table`)."""
    path = tmp_path / "cache"
    new_cache_dir(path)
    write_segment(path / "wal", [put(1, "when", msgpack.Timestamp(1, 2))])

    table = run(driver, "dump", "--pending", "--format", "table", str(path))

    assert table.exit_code == 0, table.stderr
    assert table.stdout.splitlines()[1].split() == [
        "1", "put", "'when'", "Timestamp(seconds=1,", "nanoseconds=2)"]


DEEPEST = 1023  # msgpack reads no deeper; the cache refuses a deeper value


def nested(depth: int) -> Any:
    """`depth` levels of list, str-keyed dict and $map dict in turn around bytes; the same
    outer levels whatever the depth."""
    value: Any = b"\x00bottom"
    for level in reversed(range(depth)):
        value = ([value, level] if level % 3 == 0 else {"a": value} if level % 3 == 1
                 else {level: value, "$x": 1})
    return value


@contextmanager
def deep_recursion() -> Iterator[None]:
    """For the test's own json.loads and ==, which recurse; never around a command."""
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(20_000)
    try:
        yield
    finally:
        sys.setrecursionlimit(limit)


@pytest.mark.parametrize("driver", DRIVERS)
def test_every_format_shows_a_value_nested_as_deep_as_the_cache_takes(tmp_path: Path,
                                                                     driver: str) -> None:
    """encode_json, decode_json, repr and json.dumps recursed, a frame or more a level: each
    command died with a RecursionError traceback. Each prints the whole value now."""
    path = tmp_path / "cache"
    value = nested(DEEPEST)
    with wbcache.open(path) as cache:
        cache.put("k", value)

    lines = run(driver, "dump", str(path))
    document = run(driver, "dump", "--json", str(path))
    table = run(driver, "dump", "--format", "table", str(path))
    got = run(driver, "get", str(path), "k")
    got_json = run(driver, "get", "--json", str(path), "k")

    for result in (lines, document, table, got, got_json):
        assert result.exit_code == 0 and "Traceback" not in result.stderr, result.stderr[-500:]
    with deep_recursion():
        assert got.stdout == json.dumps(encode_json(value)) + "\n"
        assert lines.stdout == json.dumps({"key": "k", "value": json.loads(got.stdout)}) + "\n"
        assert decode_json(json.loads(got.stdout)) == value
        for result in (document, got_json):
            assert result.stdout == json.dumps(result.json(), indent=2) + "\n"
        assert document.json()["entries"] == [json.loads(lines.stdout)]
        assert got_json.json()["value"] == json.loads(got.stdout)
    assert table.stdout.splitlines()[1] == "'k'  " + repr(nested(30))[:59] + "…"


@pytest.mark.parametrize("driver", DRIVERS)
def test_the_pending_formats_show_a_deeply_nested_logged_value(tmp_path: Path,
                                                               driver: str) -> None:
    """The same for a record still in the log (`dump --pending`)."""
    path = tmp_path / "cache"
    new_cache_dir(path)
    value = nested(DEEPEST)
    write_segment(path / "wal", [put(1, "k", value)])

    lines = run(driver, "dump", "--pending", str(path))
    table = run(driver, "dump", "--pending", "--format", "table", str(path))

    assert lines.exit_code == table.exit_code == 0, lines.stderr[-500:] + table.stderr[-500:]
    with deep_recursion():
        assert lines.stdout == json.dumps(
            {"lsn": 1, "op": "put", "key": "k", "value": encode_json(value)}) + "\n"
    assert table.stdout.splitlines()[1] == "  1  put  'k'  " + repr(nested(30))[:59] + "…"


def test_a_deep_document_with_keys_that_are_not_str_is_written_as_json_dumps_writes_it() -> None:
    # The walk that takes over past the recursion limit wrote such keys unquoted (1: 4).
    from wbcache.cli.ops_encoding import dumps_json

    document: Any = {1: 4, None: 2, 2.5: [1], False: 0, "a": {"b": 1}}
    for _ in range(1100):
        document = [document]
    written = dumps_json(document, indent=2)
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(10_000)
    try:
        assert written == json.dumps(document, indent=2)
    finally:
        sys.setrecursionlimit(limit)
