"""`wbcache torture --shared`: processes on one shared directory SIGKILLed mid-flush,
mid-adoption and mid-fork, every counter and register exact afterwards; and the campaign
catching the bugs planted in its workers (shared_dir_worker.MUTATIONS)."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import pytest
from click.testing import CliRunner

from wbcache.cli import main
from wbcache.fault_injection.campaign import Settings
from wbcache.fault_injection.ledger import ThreadLedger
from wbcache.fault_injection.oracle import Tally
from wbcache.fault_injection.shared_dir import TRIGGERS, run_shared_dir
from wbcache.fault_injection.shared_dir_worker import MUTATIONS
from wbcache.fault_injection.shared_dir_workload import (
    check_registers,
    register_of,
    register_value,
)
from wbcache.fault_injection.torture import run_torture

SEED = int(os.environ.get("WBCACHE_TORTURE_SEED", "7"))


CRASH_POINT_ROWS = ("  killed at the flusher's crash point",
                    "  killed at a crash point inside an adoption")


def test_processes_killed_on_a_shared_directory_leave_every_counter_and_register_exact(
        tmp_path: Path) -> None:
    """Every run must come out exact. What the runs must have reached (writes, forks, each kill
    trigger, the crash points) is summed over runs of 12 kills, a new seed each, until it is
    reached (4 runs at most): kills on a timer land earlier on a busy machine, before the open
    returns or the flusher runs (385 writes a run at load 5 on 2 cores, thousands when quiet;
    at load 12 a run of 12 once reached no flusher's crash point)."""
    acknowledged = forked = writers = 0
    used: Counter[str] = Counter()
    fired: Counter[str] = Counter()
    armed: Counter[str] = Counter()
    for run in range(4):
        report = run_torture(str(tmp_path / f"run{run}"), modes=("shared",), cycles=12,
                             seed=SEED + run, threads=4)
        [outcome] = report.outcomes
        tally = outcome.tally
        assert report.ok, "\n".join(tally.messages)
        assert tally.cycles == 12  # every kill landed (a worker that exited is an error)
        assert tally.recovered == tally.acknowledged
        assert tally.counters == 100 and tally.counter_mismatches == 0
        assert "shared" in report.table() and "counter mismatches (must be 0)" in report.table()
        acknowledged += tally.acknowledged
        forked += tally.forked  # children forked, refused the inherited cache, reopened
        writers += outcome.rows["writers checked"]  # a writer per thread of each run, and child
        used.update({trigger: int(count) for trigger, count in (
            part.split() for part in outcome.rows["kill triggers"].split(", "))})
        for row in CRASH_POINT_ROWS:  # the crash points armed in the flusher and in recovery
            fired_now, armed_now = (int(part) for part in outcome.rows[row].split(" of "))
            fired[row] += fired_now
            armed[row] += armed_now
        reached = (acknowledged > 200 and forked >= 3 and writers > 20
                   and all(used[trigger] > 0 for trigger in TRIGGERS)
                   and all(fired[row] >= 1 and armed[row] >= 2 for row in CRASH_POINT_ROWS))
        if reached:
            break
    assert acknowledged > 200  # enough writes to mean something, not a throughput bar
    assert forked >= 3
    assert writers > 20
    assert set(used) == set(TRIGGERS) and all(used[trigger] > 0 for trigger in TRIGGERS)
    for row in CRASH_POINT_ROWS:  # reached, not timed out
        assert fired[row] >= 1 and armed[row] >= 2, (row, fired[row], armed[row])


@pytest.mark.parametrize("mutation", MUTATIONS)
def test_a_bug_planted_in_the_workers_is_caught(tmp_path: Path, mutation: str) -> None:
    """ack-unwritten: a write acknowledged but never made; replay-at-checkpoint: recovery and
    adoption replay the record at a lane's checkpoint, counting its increments twice."""
    settings = Settings(workdir=str(tmp_path), seed=SEED, cycles=8, threads=4)
    outcome = run_shared_dir(settings, mutation=mutation)
    assert not outcome.ok
    # replay-at-checkpoint shows as one of two symptoms: the record at the checkpoint replayed
    # again (a counter counted twice), or, where the flush had deleted the segment holding
    # it, a worker's open refusing the lane as missing that record.
    refused = [message for message in outcome.tally.messages
               if "are missing (database checkpoint" in message]
    assert outcome.tally.counter_mismatches > 0 or (
        mutation == "replay-at-checkpoint" and refused), outcome.tally.messages
    assert os.path.isdir(tmp_path / "failures" / "shared")  # the evidence is kept


def _registers_after(writer: tuple[int, int], marker: int) -> dict[str, str]:
    """What the registers hold once `writer` alone made its writes 1..marker."""
    state = {}
    for n in range(1, marker + 1):
        key = register_of(*writer, n)
        if key is not None:
            state[key] = register_value(*writer, n)
    return state


def test_the_register_check_sees_an_overwritten_value_come_back() -> None:
    writer = (3, 1)
    key = register_of(*writer, 3)
    first, second = [n for n in range(1, 200) if register_of(*writer, n) == key][:2]
    assert check_registers(_registers_after(writer, second), {writer: second}, "t").violations == 0
    back = {**_registers_after(writer, second), key: register_value(*writer, first)}
    assert check_registers(back, {writer: second}, "t").inconsistent == 1
    ahead = {**_registers_after(writer, first), key: register_value(*writer, second)}
    assert check_registers(ahead, {writer: first}, "t").partial == 1
    gone = {name: value for name, value in _registers_after(writer, second).items()
            if name != key}
    assert check_registers(gone, {writer: second}, "t").lost == 1
    forged = {**_registers_after(writer, second), key: "7.7.7"}
    assert check_registers(forged, {writer: second}, "t").phantom == 1


def test_a_fresh_writer_that_finds_a_marker_is_a_phantom() -> None:
    tally = Tally()
    ThreadLedger(5, 0).found(3, tally, "t")
    assert tally.phantom == 1


def test_torture_shared_flag_runs_the_shared_campaign(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["torture", str(tmp_path / "work"), "--shared",
                                       "--cycles", "4", "--seed", "3", "--threads", "2",
                                       "--quiet"])
    assert result.exit_code == 0, result.output
    assert "modes shared," in result.output
    for row in ("counters checked", "counter mismatches (must be 0)",
                "forked children not refused (must be 0)", "lost (must be 0)",
                "shared: kill triggers"):
        assert row in result.output
    assert "verdict: PASS" in result.output


@pytest.mark.parametrize("other", [["--backend", "postgresql://postgres@127.0.0.1:5432/test"],
                                   ["--mode", "kill"]])
def test_torture_shared_refuses_backend_and_other_modes(tmp_path: Path,
                                                        other: list[str]) -> None:
    result = CliRunner().invoke(main, ["torture", str(tmp_path / "work"), "--shared", *other])
    assert result.exit_code == 2
    assert "--shared" in result.output and other[0] in result.output
    assert not (tmp_path / "work").exists()  # refused before any work
