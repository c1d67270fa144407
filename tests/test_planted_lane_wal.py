"""A lane's wal/ that is a symbolic link is refused by `wbcache recover` as by a shared open.

`wbcache.open(shared=True)` refuses a lane whose wal/ is a link (`layout.complete_lane`).
Recovery must apply the same rule: it replays a lane's log into the shared database and then
deletes it, so a wal/ linked to ANOTHER cache directory's log (a private directory of the
user's, which passes every other check) would move that directory's unflushed writes into
the wrong database and delete them from their own. Refused before anything is locked, read or
changed, with the exit code of a bad directory (2) and one line naming the link.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from cli_support import DRIVERS, assert_one_line_error, run, three_segment_log
from plant_support import READ_COMMANDS, argv, state_of

import wbcache
from wbcache.errors import InvalidDirectoryError
from wbcache.maintenance import recover_directory

RECOVERS = (("recover",), ("recover", "--dry-run"), ("recover", "--salvage", "--yes"))


@pytest.fixture
def linked(tmp_path: Path) -> tuple[Path, Path, Path]:
    """(shared directory, its lane 2 whose wal/ links to the other's, the other directory):
    a single-owner cache directory whose log holds key-1..key-300, none flushed."""
    other = tmp_path / "other"
    three_segment_log(other)
    shared = tmp_path / "shared"
    wbcache.open(shared, shared=True).close()  # lane 00000001, a real one
    lane = shared / "lanes" / "00000002"
    lane.mkdir(mode=0o700)
    (lane / "cache_id").write_text("feedfacefeedfacefeedfacefeedface\n")
    (lane / "wal").symlink_to(other / "wal")
    return shared, lane, other


def assert_other_intact(other: Path, before: dict[str, Any]) -> None:
    assert state_of(other) == before
    with wbcache.open(other) as cache:  # its own log still holds its writes
        assert [cache.get(f"key-{n}") for n in (1, 150, 300)] == [1, 150, 300]


def test_a_shared_open_refuses_the_lane(linked: tuple[Path, Path, Path]) -> None:
    # The rule recover must match.
    shared, lane, _ = linked
    with pytest.raises(InvalidDirectoryError, match="symbolic link"):
        wbcache.open(shared, shared=True)


@pytest.mark.parametrize("options", [{}, {"dry_run": True}, {"salvage": True}])
def test_recover_directory_refuses_a_lane_wal_link_and_changes_nothing(
        linked: tuple[Path, Path, Path], options: dict[str, bool]) -> None:
    shared, lane, other = linked
    before_other, before_shared = state_of(other), state_of(shared)

    with pytest.raises(InvalidDirectoryError) as caught:
        recover_directory(shared, **options)

    assert str(lane / "wal") in str(caught.value)
    assert "symbolic link" in str(caught.value)
    assert state_of(shared) == before_shared
    assert_other_intact(other, before_other)


@pytest.mark.parametrize("driver", DRIVERS)
@pytest.mark.parametrize("command", RECOVERS)
def test_the_cli_refuses_it_in_one_line_with_exit_2_and_deletes_no_log(
        linked: tuple[Path, Path, Path], driver: str, command: tuple[str, ...]) -> None:
    shared, lane, other = linked
    before_other, before_shared = state_of(other), state_of(shared)

    result = run(driver, *command, str(shared))

    assert_one_line_error(result, 2, str(lane / "wal"), "symbolic link")
    assert state_of(shared) == before_shared
    assert_other_intact(other, before_other)


@pytest.mark.parametrize("driver", DRIVERS)
def test_the_read_only_commands_refuse_it_too(linked: tuple[Path, Path, Path],
                                              driver: str) -> None:
    # They change nothing, but would show (or `verify` pass) the other directory's log as
    # this lane's pending writes.
    shared, lane, other = linked
    before_other, before_shared = state_of(other), state_of(shared)

    for command in READ_COMMANDS:
        result = run(driver, *argv(command, shared))
        assert_one_line_error(result, 2, str(lane / "wal"), "symbolic link")
    assert state_of(shared) == before_shared
    assert_other_intact(other, before_other)


def test_a_lane_with_a_real_wal_is_still_recovered(tmp_path: Path) -> None:
    # The check refuses links only: a lane's own log, left by a dead process, is adopted.
    shared = tmp_path / "shared"
    wbcache.open(shared, shared=True).close()
    lane = shared / "lanes" / "00000001"
    for segment in three_segment_log(tmp_path / "other"):
        os.rename(segment, lane / "wal" / segment.name)

    outcome = recover_directory(shared)

    assert outcome.lanes is not None and outcome.lanes[0].report is not None
    assert outcome.lanes[0].report.replayed == 300
    assert os.listdir(lane / "wal") == []
    with wbcache.open(shared, shared=True) as cache:
        assert cache.get("key-300") == 300
