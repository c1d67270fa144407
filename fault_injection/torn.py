"""Torn tails: cut the log at every byte offset of its last three records (frames), plain,
zero-filled and garbage-filled; each must recover to the exact prefix of complete records,
without error, reporting how many bytes it dropped.

A crash in the middle of a write leaves the end of the last segment cut short, or (on file
systems that extend the size before the data lands) followed by zeros or stale garbage. None of
those bytes were acknowledged: their fsync never returned. The reader's policy
(wbcache/wal/reader.py) calls that a torn tail; this campaign holds it to it at every offset.
"""

from __future__ import annotations

import os
import random
import shutil
from dataclasses import dataclass

import wbcache
from wbcache.fault_injection.campaign import Outcome, Settings
from wbcache.fault_injection.logfile import SampleLog, read_state, write_sample_log
from wbcache.fault_injection.oracle import Tally, same
from wbcache.fault_injection.workload import state_after
from wbcache.wal.format import HEADER_SIZE

FILLS = ("cut", "zeros", "garbage")


@dataclass(frozen=True)
class TornCase:
    offset: int  # bytes of the last segment kept
    fill: str  # what follows them: nothing, zeros or garbage
    fill_length: int


def torn_cases(sample: SampleLog, rng: random.Random) -> list[TornCase]:
    """Every offset from the start of the third-last record to the end of the last segment,
    with each fill (the intact end: once, as the control)."""
    last = len(sample.segments) - 1
    size = len(sample.segments[last][1])
    start = sample.frames[-3].offset
    assert sample.frames[-3].segment == last, "the sample's last segment holds 3 frames"
    cases = []
    for offset in range(start, size):
        for fill in FILLS:
            length = 0 if fill == "cut" else rng.randint(1, size - offset + 64)
            cases.append(TornCase(offset, fill, length))
    cases.append(TornCase(size, "cut", 0))
    return cases


def run_torn(settings: Settings) -> Outcome:
    """`settings.cycles` sample logs, each cut at every offset of its last three records."""
    outcome = Outcome("torn")
    cases_run = 0
    for sample_index in range(settings.cycles):
        if settings.expired():
            break
        rng = random.Random(f"wbcache-torture/torn/{settings.seed}/{sample_index}")
        # Every other sample ends in small frames (a few hundred cuts); the others may end in
        # a big value's frame (thousands).
        sample = write_sample_log(rng.randrange(1 << 30), small_tail=sample_index % 2 == 0)
        cases = torn_cases(sample, rng)
        for case in cases:
            outcome.tally.add(check_torn_case(settings, sample, case, rng,
                                              f"torn tail sample {sample_index}"))
        cases_run += len(cases)
        settings.say(f"torn tails {sample_index + 1}/{settings.cycles}: {len(cases)} cuts of "
                     f"{sample.segments[-1][0]}, violations {outcome.tally.violations}")
    outcome.rows["torn-tail cases"] = cases_run
    return outcome


def check_torn_case(settings: Settings, sample: SampleLog, case: TornCase, rng: random.Random,
                    label: str) -> Tally:
    last = len(sample.segments) - 1
    name, data = sample.segments[last]
    fill = (b"" if case.fill == "cut" else
            bytes(case.fill_length) if case.fill == "zeros" else rng.randbytes(case.fill_length))
    damaged = data[:case.offset] + fill
    path = settings.path("torn", "case")
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path)
    open(os.path.join(path, "LOCK"), "wb").close()
    sample.write(os.path.join(path, "wal"), sample.segments[:last] + [(name, damaged)])
    # The fill may happen to repeat the bytes it replaced (a zero where a zero was): a frame
    # counts as cut only if its bytes are not all there.
    boundary, complete = HEADER_SIZE, sample.records_before(last, 0)
    for frame in (frame for frame in sample.frames if frame.segment == last):
        if damaged[frame.offset:frame.end] != data[frame.offset:frame.end]:
            break
        boundary, complete = frame.end, complete + frame.records
    label = f"{label} offset {case.offset} {case.fill}"
    tally = Tally(cycles=1)
    try:
        state, report = read_state(path)
    except wbcache.WbcacheError as exc:
        tally.errors += 1
        tally.note(f"{label}: refused: {exc}")
        return tally
    expected = state_after(sample.ops, complete)
    if report.replayed != complete or not same(state, expected):
        tally.lost += 1
        tally.note(f"{label}: expected the state after {complete} records, got "
                   f"{report.replayed} replayed and {len(state)} keys ({len(expected)} expected)")
    if report.torn_bytes != len(damaged) - boundary:
        tally.errors += 1
        tally.note(f"{label}: reported {report.torn_bytes} torn bytes, "
                   f"{len(damaged) - boundary} expected")
    return tally
