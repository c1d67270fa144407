"""Corruption: single-byte changes and bit flips anywhere before the log's tail.

Every byte of every segment but the last, and every byte of the last segment before its last
frame, is fair game: the segment header, and in each frame the marker, the length, the CRC and
the payload. Damage there is not a torn write (valid data follows it), so opening must refuse
with `CorruptLogError` naming the damaged segment and the offset of the damaged frame (0 for
the header), and must change nothing on disk. Silently accepting it (opening, replaying
whatever it makes of it) is the failure this campaign looks for.

(Damage inside the very last frame cannot be told from a torn write; README.md says so. The
torn-tail campaign covers it.)
"""

from __future__ import annotations

import os
import random
import shutil
from dataclasses import dataclass

import wbcache
from wbcache.fault_injection.campaign import Outcome, Settings
from wbcache.fault_injection.logfile import SampleLog, write_sample_log
from wbcache.fault_injection.oracle import Tally
from wbcache.wal.format import HEADER_SIZE

REGIONS = ("header", "marker", "length", "crc", "payload")
_FIELD_ENDS = ((4, "marker"), (8, "length"), (12, "crc"))


@dataclass(frozen=True)
class Corruption:
    segment: int
    offset: int
    bit: int | None  # flip this bit; None: replace the byte with `value`
    value: int
    region: str
    expected_offset: int  # where the reader must say the damage is


def corruption_sites(sample: SampleLog) -> dict[str, list[tuple[int, int, int]]]:
    """Per region, every (segment, offset, expected error offset) that may be damaged."""
    sites: dict[str, list[tuple[int, int, int]]] = {region: [] for region in REGIONS}
    last_frame = sample.frames[-1]
    for index, (_, data) in enumerate(sample.segments):
        limit = last_frame.offset if index == last_frame.segment else len(data)
        for offset in range(min(HEADER_SIZE, limit)):
            sites["header"].append((index, offset, 0))
    for frame in sample.frames:
        if frame is last_frame:
            continue
        for offset in range(frame.offset, frame.end):
            within = offset - frame.offset
            region = next((name for end, name in _FIELD_ENDS if within < end), "payload")
            sites[region].append((frame.segment, offset, frame.offset))
    return sites


def corruption_cases(sample: SampleLog, count: int, rng: random.Random) -> list[Corruption]:
    """`count` cases, the regions taking turns (so each is hit whatever the count); within a
    region, sites in random order, each first with a byte change and then with bit flips."""
    sites = corruption_sites(sample)
    queues = {region: rng.sample(found, len(found)) for region, found in sites.items() if found}
    rounds = {region: 0 for region in queues}
    cases: list[Corruption] = []
    while len(cases) < count:
        for region, queue in queues.items():
            if len(cases) >= count:
                break
            position = rounds[region] % len(queue)
            variant = rounds[region] // len(queue)  # 0: a byte change; 1..8: bit flips
            segment, offset, expected = queue[position]
            rounds[region] += 1
            original = sample.segments[segment][1][offset]
            if variant % 9 == 0:
                value = (original + rng.randint(1, 255)) % 256
                cases.append(Corruption(segment, offset, None, value, region, expected))
            else:
                bit = (variant - 1) % 8
                cases.append(Corruption(segment, offset, bit, original ^ (1 << bit), region,
                                        expected))
    return cases


def run_corruption(settings: Settings) -> Outcome:
    """`settings.cycles` corruption cases, over fresh sample logs of about 5,000 cases each."""
    outcome = Outcome("corruption")
    refused = {region: 0 for region in REGIONS}
    done = sample_index = 0
    while done < settings.cycles and not settings.expired():
        rng = random.Random(f"wbcache-torture/corruption/{settings.seed}/{sample_index}")
        sample = write_sample_log(rng.randrange(1 << 30))
        cases = corruption_cases(sample, min(5_000, settings.cycles - done), rng)
        path = settings.path("corruption", "case")
        _reset(path, sample)
        label = f"corruption sample {sample_index}"
        for case in cases:
            tally = check_corruption_case(path, sample, case, label)
            if tally.violations:
                _reset(path, sample)
            else:
                refused[case.region] += 1
            outcome.tally.add(tally)
        done += len(cases)
        sample_index += 1
        settings.say(f"corruption: {done:,}/{settings.cycles:,} cases, "
                     f"violations {outcome.tally.violations}")
    outcome.rows["corruption cases"] = done
    outcome.rows["  refused as corrupt"] = ", ".join(f"{region} {count:,}"
                                                   for region, count in refused.items())
    return outcome


def _reset(path: str, sample: SampleLog) -> None:
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path)
    open(os.path.join(path, "LOCK"), "wb").close()
    sample.write(os.path.join(path, "wal"))


def check_corruption_case(path: str, sample: SampleLog, case: Corruption, label: str) -> Tally:
    """Damage one byte of the sample in `path`, open, expect a refusal, put the byte back."""
    name, data = sample.segments[case.segment]
    segment_path = os.path.join(path, "wal", name)
    damaged = bytearray(data)
    damaged[case.offset] = case.value
    how = f"bit {case.bit} flipped" if case.bit is not None else f"byte set to {case.value:#04x}"
    label = f"{label}: {name} offset {case.offset} ({case.region}, {how})"
    tally = Tally(cycles=1)
    _poke(segment_path, case.offset, case.value)
    try:
        cache = wbcache.open(path)
    except wbcache.CorruptLogError as exc:
        if (os.path.abspath(exc.path) != os.path.abspath(segment_path)
                or exc.offset != case.expected_offset or name not in str(exc)
                or f"offset {case.expected_offset}" not in str(exc)):
            tally.errors += 1
            tally.note(f"{label}: refused, but naming {exc.path} offset {exc.offset} (expected "
                       f"offset {case.expected_offset}): {exc}")
    except Exception as exc:  # anything but CorruptLogError is the wrong answer
        tally.errors += 1
        tally.note(f"{label}: raised {type(exc).__name__} instead of CorruptLogError: {exc}")
    else:
        cache.close()
        tally.phantom += 1
        tally.note(f"{label}: SILENTLY ACCEPTED (opened and replayed "
                   f"{cache.recovery.replayed} records)")
        return tally
    if sorted(os.listdir(os.path.join(path, "wal"))) != [n for n, _ in sample.segments]:
        tally.errors += 1
        tally.note(f"{label}: a refused open changed the log's files")
    else:
        with open(segment_path, "rb") as file:
            if file.read() != bytes(damaged):
                tally.errors += 1
                tally.note(f"{label}: a refused open changed the damaged segment")
    _poke(segment_path, case.offset, data[case.offset])
    return tally


def _poke(path: str, offset: int, value: int) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, bytes((value,)), offset)
    finally:
        os.close(fd)
