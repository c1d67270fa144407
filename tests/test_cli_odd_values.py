"""`wbcache dump` and `get` on values the cache accepts that are odd to show: msgpack
Timestamps (extension type -1, which msgpack.ExtType refuses).

Each test runs the command in-process (CliRunner) and as a subprocess of the installed script.
"""

from __future__ import annotations

import json
from pathlib import Path

import msgpack
import pytest
from cli_support import DRIVERS, new_cache_dir, put, run, write_segment

import wbcache
from wbcache.cli.ops_encoding import decode_json

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
