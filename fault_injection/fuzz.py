"""Parser fuzz: random and mutated segment files must never hang recovery, never make it
allocate beyond what is on disk (and never beyond the record cap), and never make it raise
anything but the library's own errors.

Each case starts from a sample log (logfile.py) and applies one to four random mutations:
bytes changed or inserted or deleted, truncation, a frame duplicated, swapped or dropped, a
length field set to an extreme, a frame re-framed with a valid CRC around a crafted payload,
a header with another version, a segment renamed, removed, added, or replaced with noise.
Then the directory is opened with the public API:

  * it may be refused, with a `wbcache.WbcacheError` (a `CorruptLogError` must name a file of
    the log and an offset inside it), and then nothing on disk may have changed;
  * it may open, and then (unless a mutation forged a frame with a valid CRC) the state must be
    the state after some prefix of the sample's operations: a mutation cannot invent data;
  * any other exception, more than `CASE_TIMEOUT` seconds, or a traced allocation peak (above
    what the process held before the open) over four times the log's size plus `SLACK` (what
    opening an empty cache allocates, with room) is a violation.

Two fixed cases run first in every campaign: a sparse 70 MiB segment whose first frame claims
a payload above the cap, and one claiming exactly the cap (the reader may read 64 MiB then,
and no more: the bound there is the cap plus `SLACK`; above the cap, `SLACK` alone).
"""

from __future__ import annotations

import gc
import os
import random
import shutil
import signal
import threading
import time
import tracemalloc
from typing import Any

import wbcache
from wbcache.fault_injection.campaign import Outcome, Settings
from wbcache.fault_injection.logfile import SampleLog, write_sample_log
from wbcache.fault_injection.mutations import Mutated, Segments, mutate
from wbcache.fault_injection.oracle import Tally, same
from wbcache.fault_injection.workload import state_after
from wbcache.wal.format import FRAME, FRAME_MAGIC, MAX_FRAME_PAYLOAD, encode_v1_header

CASE_TIMEOUT = 10.0  # seconds
_MIB = 1 << 20
SLACK = 4 * _MIB  # bytes: opening, reading and closing a small cache allocates about 0.3 MB


class CaseHung(Exception):
    """A fuzz case ran longer than CASE_TIMEOUT."""


def run_fuzz(settings: Settings) -> Outcome:
    """The two fixed huge-length cases, then `settings.cycles` mutated logs."""
    outcome = Outcome("fuzz")
    outcomes = {"opened": 0, "refused": 0}
    path = settings.path("fuzz", "case")
    tracing = not tracemalloc.is_tracing()
    if tracing:
        tracemalloc.start()
    try:
        for claimed in (MAX_FRAME_PAYLOAD + 1, MAX_FRAME_PAYLOAD):
            outcome.tally.add(_huge_length_case(path, claimed, outcomes))
        done = sample_index = 0
        slowest = 0.0
        while done < settings.cycles and not settings.expired():
            rng = random.Random(f"wbcache-torture/fuzz/{settings.seed}/{sample_index}")
            sample = write_sample_log(rng.randrange(1 << 30))
            for case in range(min(1_000, settings.cycles - done)):
                mutated = mutate(sample, rng)
                label = f"fuzz sample {sample_index} case {case} ({'; '.join(mutated.steps)})"
                started = time.monotonic()
                outcome.tally.add(check_fuzz_case(path, sample, mutated, label, outcomes))
                slowest = max(slowest, time.monotonic() - started)
                done += 1
            sample_index += 1
            # + 2: the two fixed huge-length cases, counted as the table counts them
            settings.say(f"fuzz: {done + 2:,}/{settings.cycles + 2:,} cases, "
                         f"{outcomes['opened']:,} opened, {outcomes['refused']:,} refused, "
                         f"violations {outcome.tally.violations}")
    finally:
        if tracing:
            tracemalloc.stop()
    outcome.rows["fuzz cases"] = done + 2
    outcome.rows["  opened / refused"] = f"{outcomes['opened']:,} / {outcomes['refused']:,}"
    outcome.rows["  slowest case (s)"] = f"{slowest:.3f}"
    return outcome


def _write_case(path: str, segments: Segments) -> None:
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(os.path.join(path, "wal"))
    open(os.path.join(path, "LOCK"), "wb").close()
    for name, data in segments:
        with open(os.path.join(path, "wal", name), "wb") as file:
            file.write(data)


def _open_guarded(path: str) -> tuple[Any, BaseException | None, int, float]:
    """Open and read the cache at `path` under a timeout and the allocation tracer:
    (state or None, the exception, traced peak bytes above what was held before, seconds)."""
    alarm = threading.current_thread() is threading.main_thread()
    previous: Any = None
    if alarm:
        def hung(signum: int, frame: Any) -> None:
            raise CaseHung(f"no answer after {CASE_TIMEOUT} s")

        previous = signal.signal(signal.SIGALRM, hung)
        signal.setitimer(signal.ITIMER_REAL, CASE_TIMEOUT)
    # The bound is on what this open allocates, so judge the peak above what the process
    # already holds: memory kept across cases (cyclic garbage awaiting the collector, the
    # campaign's own records) swung that by 2 MB over a 20,000-case soak and failed it.
    # Collecting first keeps a collection during the open from hiding the open's own peak.
    gc.collect()
    tracemalloc.reset_peak()
    held = tracemalloc.get_traced_memory()[0]
    started = time.monotonic()
    state = error = None
    try:
        with wbcache.open(path) as cache:
            state = dict(cache.items())
    except BaseException as exc:  # judged by the caller
        error = exc
    finally:
        if alarm:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
    seconds = time.monotonic() - started
    if not alarm and seconds > CASE_TIMEOUT:
        error = CaseHung(f"no answer after {seconds:.1f} s")
    return state, error, tracemalloc.get_traced_memory()[1] - held, seconds


def check_fuzz_case(path: str, sample: SampleLog, mutated: Mutated, label: str,
                    outcomes: dict[str, int]) -> Tally:
    _write_case(path, mutated.segments)
    size = sum(len(data) for _, data in mutated.segments)
    before = {name: bytes(data) for name, data in mutated.segments}
    state, error, peak, _ = _open_guarded(path)
    tally = Tally(cycles=1)
    _judge_allocation(tally, peak, 4 * size + SLACK, label)
    if error is None:
        outcomes["opened"] += 1
        if not mutated.forged and not _is_prefix_state(sample, state):
            tally.phantom += 1
            tally.note(f"{label}: opened to a state that is no prefix of what was written")
        return tally
    outcomes["refused"] += 1
    _judge_refusal(tally, path, error, label)
    after = {}
    for name in sorted(os.listdir(os.path.join(path, "wal"))):
        with open(os.path.join(path, "wal", name), "rb") as file:
            after[name] = file.read()
    if after != before:
        tally.errors += 1
        tally.note(f"{label}: a refused open changed the log ({sorted(before)} -> {sorted(after)})")
    return tally


def _judge_allocation(tally: Tally, peak: int, bound: int, label: str) -> None:
    if peak > bound:
        tally.errors += 1
        tally.note(f"{label}: allocated {peak:,} bytes (bound {bound:,})")


def _judge_refusal(tally: Tally, path: str, error: BaseException, label: str) -> None:
    if not isinstance(error, wbcache.WbcacheError):
        tally.errors += 1
        tally.note(f"{label}: raised {type(error).__name__}: {error}")
        return
    if isinstance(error, wbcache.CorruptLogError):
        damaged = os.path.abspath(error.path)
        if (os.path.dirname(damaged) != os.path.abspath(os.path.join(path, "wal"))
                or not os.path.exists(damaged)
                or not 0 <= error.offset <= os.path.getsize(damaged)):
            tally.errors += 1
            tally.note(f"{label}: CorruptLogError names {error.path} offset {error.offset}, "
                       f"not a place in the log")


def _is_prefix_state(sample: SampleLog, state: Any) -> bool:
    return any(same(state, state_after(sample.ops, count))
               for count in range(len(sample.ops) + 1))


def _huge_length_case(path: str, claimed: int, outcomes: dict[str, int]) -> Tally:
    """A sparse segment larger than the cap whose first frame claims `claimed` bytes."""
    header = encode_v1_header()
    name = f"{1:020d}.log"
    _write_case(path, [(name, bytearray(header + FRAME.pack(FRAME_MAGIC, claimed, 0)))])
    segment = os.path.join(path, "wal", name)
    os.truncate(segment, MAX_FRAME_PAYLOAD + 6 * _MIB)  # sparse: no blocks written
    label = f"fuzz: sparse {os.path.getsize(segment):,}-byte segment claiming {claimed:,} bytes"
    state, error, peak, _ = _open_guarded(path)
    tally = Tally(cycles=1)
    _judge_allocation(tally, peak, (claimed if claimed <= MAX_FRAME_PAYLOAD else 0) + SLACK, label)
    if error is None:
        outcomes["opened"] += 1
        if state:
            tally.phantom += 1
            tally.note(f"{label}: opened to {len(state)} keys")
    else:
        outcomes["refused"] += 1
        _judge_refusal(tally, path, error, label)
    shutil.rmtree(path, ignore_errors=True)
    return tally

