"""`wbcache torture`: the table it prints, and its exit code when a check fails."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

import wbcache.fault_injection.torture as torture
from wbcache.cli import main
from wbcache.fault_injection.campaign import Outcome, Settings
from wbcache.fault_injection.oracle import Tally


def test_torture_prints_every_figure_of_the_table_and_passes(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["torture", str(tmp_path / "work"), "--mode", "kill",
                                       "--cycles", "3", "--seed", "9", "--threads", "2"])
    assert result.exit_code == 0, result.output
    for row in ("cycles", "operations", "acknowledged", "recovered", "lost (must be 0)",
                "holes (must be 0)", "seed", "cycles killed before any acknowledgement"):
        assert row in result.output
    # no campaign of this run covers crash points: no blank row claiming it
    assert "crash points covered" not in result.output
    assert "kill 3/3" in result.output  # progress
    assert "verdict: PASS" in result.output
    seed_row = next(line for line in result.output.splitlines() if line.strip().startswith("seed"))
    assert seed_row.split()[-1] == "9"


def test_torture_fsync_puts_every_worker_in_that_mode(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["torture", str(tmp_path / "work"), "--mode", "kill",
                                       "--cycles", "3", "--seed", "9", "--threads", "2",
                                       "--fsync", "interval"])
    assert result.exit_code == 0, result.output
    assert "2 writer threads, fsync=interval" in result.output
    modes_row = next(line for line in result.output.splitlines()
                     if "cycles by fsync mode" in line)
    assert modes_row.split()[-4:] == ["always", "0,", "interval", "3"]
    assert "verdict: PASS" in result.output
    wrong = CliRunner().invoke(main, ["torture", "--fsync", "never"])
    assert wrong.exit_code == 2 and "Traceback" not in wrong.output


def test_torture_interleave_prints_the_linearizability_and_fork_figures(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["torture", str(tmp_path / "work"), "--mode",
                                       "interleave", "--cycles", "2", "--seed", "3",
                                       "--threads", "2", "--quiet"])
    assert result.exit_code == 0, result.output
    for row in ("counters checked", "not linearizable (must be 0)",
                "forked children not refused (must be 0)", "acknowledged reads checked"):
        assert row in result.output
    assert "holes (must be 0)" not in result.output  # not a figure this workload can check
    assert "verdict: PASS" in result.output


def test_torture_exits_1_and_names_the_seed_when_a_write_is_lost(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def losing(settings: Settings) -> Outcome:
        tally = Tally(cycles=1, operations=10, acknowledged=10, recovered=9, lost=1)
        tally.note("kill cycle 0: acknowledged put 3 lost")
        return Outcome("kill", tally)

    monkeypatch.setitem(torture.CAMPAIGNS, "kill", losing)
    result = CliRunner().invoke(main, ["torture", str(tmp_path / "work"), "--mode", "kill",
                                       "--seed", "5"])
    assert result.exit_code == 1
    assert "verdict: FAIL in kill" in result.output and "--seed 5" in result.output
    assert "acknowledged put 3 lost" in result.output


def test_torture_refuses_a_directory_that_is_not_empty(tmp_path: Path) -> None:
    (tmp_path / "something").write_text("x")
    result = CliRunner().invoke(main, ["torture", str(tmp_path)])
    assert result.exit_code == 2 and "not empty" in result.output


def test_torture_refuses_lazyfs_for_a_mode_that_would_not_use_it(tmp_path: Path) -> None:
    # It was ignored: a run the user believed had cut the power never did.
    result = CliRunner().invoke(main, ["torture", str(tmp_path / "work"), "--mode", "kill",
                                       "--lazyfs", "/usr/bin/lazyfs"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "--lazyfs is for --mode lazyfs and lazyfs-shared" in result.output
    assert not (tmp_path / "work").exists()  # refused before anything was made
