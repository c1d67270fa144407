"""Damage to the log's bytes: torn tails at every offset of the last three records recover the
exact prefix; single-byte and bit corruption before the tail is always refused, naming the
segment and offset; fuzzed segments never hang, over-allocate or raise a foreign error."""

from __future__ import annotations

import os
import random
import tracemalloc
from pathlib import Path

import pytest

import wbcache
import wbcache.fault_injection.fuzz as fuzz
from wbcache.fault_injection.campaign import Settings
from wbcache.fault_injection.corruption import (
    REGIONS,
    Corruption,
    check_corruption_case,
    run_corruption,
)
from wbcache.fault_injection.fuzz import check_fuzz_case, run_fuzz
from wbcache.fault_injection.logfile import write_sample_log
from wbcache.fault_injection.mutations import Mutated
from wbcache.fault_injection.torn import FILLS, run_torn

SEED = int(os.environ.get("WBCACHE_TORTURE_SEED", "4"))


def test_a_torn_tail_at_every_offset_of_the_last_three_records_recovers_the_exact_prefix(
        ram_path: Path) -> None:
    outcome = run_torn(Settings(workdir=str(ram_path), seed=SEED, cycles=1))
    assert outcome.tally.violations == 0, "\n".join(outcome.tally.messages)
    sample = write_sample_log(random.Random(f"wbcache-torture/torn/{SEED}/0").randrange(1 << 30),
                              small_tail=True)
    span = len(sample.segments[-1][1]) - sample.frames[-3].offset
    assert outcome.rows["torn-tail cases"] == len(FILLS) * span + 1  # every offset, every fill


def test_2000_byte_and_bit_corruptions_before_the_tail_are_all_refused(ram_path: Path) -> None:
    outcome = run_corruption(Settings(workdir=str(ram_path), seed=SEED, cycles=2_000))
    assert outcome.tally.violations == 0, "\n".join(outcome.tally.messages)
    assert outcome.rows["corruption cases"] == 2_000
    refused = dict(part.split() for part in outcome.rows["  refused as corrupt"].split(", "))
    assert set(refused) == set(REGIONS) and all(int(n.replace(",", "")) > 0
                                                for n in refused.values())


def test_damage_in_the_last_frame_is_a_torn_tail_so_the_corruption_check_would_flag_it(
        tmp_path: Path) -> None:
    # The corruption check must be able to fail: damage the LAST frame, which the contract
    # treats as a torn tail (opened, not refused), and the check reports it as accepted.
    sample = write_sample_log(SEED)
    last = sample.frames[-1]
    path = str(tmp_path / "case")
    os.makedirs(os.path.join(path, "wal"))
    open(os.path.join(path, "LOCK"), "wb").close()
    sample.write(os.path.join(path, "wal"))
    original = sample.segments[last.segment][1][last.offset + 20]
    case = Corruption(last.segment, last.offset + 20, 0, original ^ 1, "payload", last.offset)
    tally = check_corruption_case(path, sample, case, "last frame")
    assert tally.phantom == 1 and "SILENTLY ACCEPTED" in tally.messages[0]


def test_fuzzed_segments_never_hang_over_allocate_or_raise_a_foreign_error(
        ram_path: Path) -> None:
    outcome = run_fuzz(Settings(workdir=str(ram_path), seed=SEED, cycles=400))
    assert outcome.tally.violations == 0, "\n".join(outcome.tally.messages)
    assert outcome.rows["fuzz cases"] == 402
    opened, refused = (int(n.replace(",", ""))
                       for n in outcome.rows["  opened / refused"].split(" / "))
    assert opened > 0 and refused > 0


def test_the_fuzz_check_fails_on_a_foreign_exception(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    sample = write_sample_log(SEED)
    mutated = Mutated([(name, bytearray(data)) for name, data in sample.segments], ["none"],
                      False)

    def broken_open(path: str) -> None:
        raise IndexError("a parser bug")

    monkeypatch.setattr(fuzz.wbcache, "open", broken_open)
    tally = check_fuzz_case(str(tmp_path / "case"), sample, mutated, "broken",
                            {"opened": 0, "refused": 0})
    assert tally.errors == 1 and "IndexError" in tally.messages[0]


def test_the_fuzz_check_judges_what_an_open_allocates_not_what_was_held_before(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A reader that allocates past the bound is caught; memory the process already held
    (8 MiB here, twice the slack) does not count against a case that allocates little."""
    sample = write_sample_log(SEED)
    mutated = Mutated([(name, bytearray(data)) for name, data in sample.segments], ["none"],
                      False)
    bound = 4 * sum(len(data) for _, data in sample.segments) + fuzz.SLACK
    real_open = fuzz.wbcache.open

    def check() -> list[str]:
        return check_fuzz_case(str(tmp_path / "case"), sample, mutated, "case",
                               {"opened": 0, "refused": 0}).messages

    def greedy_open(path: str) -> wbcache.Cache:
        scratch = bytearray(2 * bound)  # what a reader trusting a length field would do
        del scratch
        return real_open(path)

    tracing = not tracemalloc.is_tracing()
    if tracing:
        tracemalloc.start()
    try:
        held = bytearray(2 * fuzz.SLACK)  # traced: allocated while tracing
        assert check() == []
        del held
        monkeypatch.setattr(fuzz.wbcache, "open", greedy_open)
        messages = check()
    finally:
        if tracing:
            tracemalloc.stop()
    assert len(messages) == 1 and "allocated" in messages[0], messages


@pytest.mark.soak
def test_soak_100000_corruptions_and_20000_fuzz_cases(tmp_path: Path) -> None:
    corruption = run_corruption(Settings(workdir=str(tmp_path), seed=SEED, cycles=100_000))
    assert corruption.ok, "\n".join(corruption.tally.messages)
    fuzzed = run_fuzz(Settings(workdir=str(tmp_path), seed=SEED, cycles=20_000))
    assert fuzzed.ok, "\n".join(fuzzed.tally.messages)
    torn = run_torn(Settings(workdir=str(tmp_path), seed=SEED, cycles=20))
    assert torn.ok, "\n".join(torn.tally.messages)
