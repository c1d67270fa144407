"""Linearizability of shared counters and registers, judged from the writers' own reports.

The journal is ONE stream of events, each written with one unbuffered `write` under a lock, in
the order they happened: a writer writes START before it calls the cache and ACK (with what the
call returned) after the call returned. So an event's position in the journal is a clock: when
the ACK of call a comes before the START of call b, a returned before b was invoked, and b
must be ordered after a ("a precedes b"). Calls whose intervals overlap may be ordered either
way. Nothing else is assumed, so a history flagged here is not linearizable, whatever the
timing of threads; a call with no ACK (running at the kill, or raising) may have taken effect
at any moment after its START, or not at all.

Counters (every increment is +1 and returns the new value; B is the counter's value before
this worker, as the previous recovery left it, F its value after this one):
  * every acknowledged increment returned a different value, above B, at most F (a value above
    F was acknowledged and then lost: a counter regression);
  * if a precedes b, a returned less than b; a read returns at least what every increment or
    read that preceded it returned, and at most B plus the increments started before it ended;
  * B + acknowledged <= F <= B + started (without a crash: F = B + acknowledged exactly);
  * every value in B+1..F that no acknowledged increment returned was taken by an increment
    still running, one that did not start after a call that had returned or seen that value
    or more (checked exactly: Hall's condition on these threshold sets, greedily).
Registers (written only with values nobody else writes, so a value names its write):
  * the recovered value was written (or is the one B held), and no acknowledged write of the
    register started after the recovered value's write returned, nor has a higher LSN: a
    recovered value older than an acknowledged write means that write was lost;
  * a read returns a value whose write had started before the read ended, and not one that a
    write which returned before the read began had overwritten (a write that started after it
    returned);
  * LSNs the writes returned are distinct, follow real-time order, and lie within the
    recovered log.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from wbcache.fault_injection.journal import ACK, ERROR, START
from wbcache.fault_injection.oracle import Tally, same
from wbcache.fault_injection.shared_keys import (
    COUNTER_KEYS,
    REGISTER_KEYS,
    SharedOp,
    SharedWorkload,
)

Key = Any
ABSENT: Any = object()


@dataclass(eq=False)
class Call:
    """One call of the shared workload, as the journal reports it."""

    op: SharedOp
    start: int  # position of its START in the journal
    end: int | None = None  # position of its ACK; None: never returned
    result: Any = None
    error: str | None = None

    @property
    def acked(self) -> bool:
        return self.end is not None

    def describe(self) -> str:
        return f"{self.op.kind} {self.op.seq} of writer {self.op.writer}"


@dataclass
class History:
    calls: list[Call] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # a journal that makes no sense


@dataclass
class SharedCheck:
    """The verdict on one cycle's shared keys: the tally, and what was looked at."""

    tally: Tally
    reads: int = 0  # acknowledged reads checked
    counters: int = 0  # counters checked


def history_from(events: Iterable[list[Any]], seed: int, cycle: int) -> History:
    """Every call of the shared workload from a worker's journal, positions as clock."""
    history = History()
    workloads: dict[int, SharedWorkload] = {}
    running: dict[int, Call] = {}
    for position, event in enumerate(events):
        tag = event[0]
        if tag == START:
            writer, seq = event[1], event[2]
            op = workloads.setdefault(writer, SharedWorkload(seed, cycle, writer)).next()
            if op.seq != seq or writer in running:
                history.problems.append(f"writer {writer} started {seq} out of order")
            call = Call(op, position)
            history.calls.append(call)
            running[writer] = call
        elif tag in (ACK, ERROR):
            writer, seq = event[1], event[2]
            reported = running.pop(writer) if writer in running else None
            if reported is None or reported.op.seq != seq:
                history.problems.append(f"writer {writer} reported {seq}, which it never started")
                continue
            if tag == ACK:
                reported.end, reported.result = position, event[3]
            else:
                reported.error = f"{event[3]}: {event[4]}"
    return history


def check_shared(actual: Mapping[Key, Any], base: Mapping[Key, Any], history: History, *,
                 recovered_last_lsn: int, label: str) -> SharedCheck:
    """Judge the shared keys of `actual` (recovered after the worker whose `history` this is)
    against `base` (what they held before it). Keys outside the workload are the caller's."""
    check = SharedCheck(Tally(cycles=1))
    tally = check.tally
    for problem in history.problems:
        tally.errors += 1
        tally.note(f"{label}: journal: {problem}")
    writes = [call for call in history.calls if call.op.writes]
    tally.operations += len(writes)
    tally.acknowledged += sum(call.acked for call in writes)
    for call in history.calls:
        if call.error is not None:
            tally.errors += 1
            tally.note(f"{label}: {call.describe()} raised {call.error}")
    lost: set[int] = set()  # ids of acknowledged writes whose effect is missing
    kept = 0  # writes never acknowledged whose effect was recovered
    lost_increments = 0
    for key in COUNTER_KEYS:
        calls = [call for call in history.calls if call.op.key == key]
        check.counters += 1
        check.reads += sum(call.acked for call in calls if call.op.kind == "get_counter")
        missing, extra = _check_counter(tally, key, base.get(key, ABSENT),
                                        actual.get(key, ABSENT), calls, label)
        lost_increments += missing
        kept += extra
    for key in REGISTER_KEYS:
        reads = [call for call in history.calls
                 if call.op.kind == "get_register" and call.op.key == key]
        check.reads += sum(call.acked for call in reads)
        kept += _check_register(tally, key, base.get(key, ABSENT), actual.get(key, ABSENT),
                                writes, reads, lost, label)
    _check_lsns(tally, writes, recovered_last_lsn, label)
    tally.counters += check.counters
    tally.lost += lost_increments + len(lost)
    tally.recovered += tally.acknowledged - lost_increments - len(lost)
    tally.inflight_kept += kept
    return check


# ------------------------------------------------------------------ counters

def _check_counter(tally: Tally, key: Key, base: Any, final: Any, calls: list[Call],
                   label: str) -> tuple[int, int]:
    """Check one counter; return (acknowledged increments missing, unacknowledged kept)."""
    where = f"{label}: counter {key!r}"
    before = 0 if base is ABSENT else base
    after = 0 if final is ABSENT else final
    if type(after) is not int or type(before) is not int:
        tally.phantom += 1
        tally.note(f"{where} holds {final!r} (before this worker: {base!r})")
        return 0, 0
    increments = [call for call in calls if call.op.kind == "incr"]
    acked = [call for call in increments if call.acked]
    values: list[int] = []
    for call in acked:
        if type(call.result) is not int:
            tally.linearizability += 1
            tally.note(f"{where}: {call.describe()} returned {call.result!r}")
        else:
            values.append(call.result)
    floors = _sweep_counter(tally, calls, before, where)
    repeated = {value: times for value, times in Counter(values).items() if times > 1}
    if repeated:
        tally.linearizability += sum(times - 1 for times in repeated.values())
        tally.note(f"{where}: increments returned the same value more than once "
                   f"(value: times) {dict(sorted(repeated.items())[:8])}")
    if after < before:
        tally.carried += 1
        tally.note(f"{where} went back from {before}, its value before this worker, to {after}")
    missing = min(len(acked), max(0, len(acked) - (after - before)))
    if missing:
        tally.note(f"{where} is {after}: {before} before this worker plus {after - before}, "
                   f"but {len(acked)} increments were acknowledged")
    top = max(values, default=before)
    if after < top:
        tally.counter_regressions += 1
        tally.note(f"{where} is {after}, below {top}, a value an increment returned")
    if after - before > len(increments):
        tally.phantom += 1
        tally.note(f"{where} is {after}: {before} plus {after - before}, more increments than "
                   f"the {len(increments)} started")
        return missing, 0
    _check_gaps(tally, sorted(set(range(before + 1, after + 1)) - set(values)),
                sorted(floors[id(call)] for call in increments if not call.acked), where)
    return missing, max(0, after - before - len(acked))


def _sweep_counter(tally: Tally, calls: list[Call], before: int, where: str) -> dict[int, int]:
    """Walk the counter's calls in journal order; check each returned value against the calls
    that preceded it. Returns, per call (by id), the highest value returned or read by a call
    that returned before it started (`before` if none): the floor it must stay above."""
    points = sorted([(call.start, 0, call) for call in calls]
                    + [(call.end, 1, call) for call in calls if call.end is not None],
                    key=lambda point: point[0])
    seen = before  # highest value returned by (or read by) a call that has returned
    started = 0  # increments started so far
    floors: dict[int, int] = {}
    producer: dict[int, Call] = {}  # value -> acknowledged increment that returned it
    for call in calls:
        if call.op.kind == "incr" and call.acked and type(call.result) is int:
            producer.setdefault(call.result, call)
    for _, is_end, call in points:
        if not is_end:
            floors[id(call)] = seen
            started += call.op.kind == "incr"
            continue
        value = call.result
        if call.op.kind == "get_counter":
            value = 0 if value is None else value
            if type(value) is not int:
                tally.phantom += 1
                tally.note(f"{where}: {call.describe()} read {call.result!r}")
                continue
            if value < floors[id(call)]:
                tally.linearizability += 1
                tally.note(f"{where}: {call.describe()} read {value}, though {floors[id(call)]} "
                           f"had been returned or read before it started")
            elif value > before + started:
                tally.linearizability += 1
                tally.note(f"{where}: {call.describe()} read {value}, more than {before} plus "
                           f"the {started} increments started before it returned")
            elif value in producer and producer[value].start > call.end:  # type: ignore[operator]
                tally.linearizability += 1
                tally.note(f"{where}: {call.describe()} read {value} before the increment "
                           f"that returned it ({producer[value].describe()}) had started")
        elif type(value) is int and value <= floors[id(call)]:
            tally.linearizability += 1
            tally.note(f"{where}: {call.describe()} returned {value}, though "
                       f"{floors[id(call)]} had been returned or read before it started")
        if type(value) is int:
            seen = max(seen, value)
    return floors


def _check_gaps(tally: Tally, gaps: list[int], pending_floors: list[int], where: str) -> None:
    """Every value in `gaps` (passed by the counter, returned by no acknowledged increment)
    needs its own unacknowledged increment whose floor is below it. A floor below a gap is
    below every larger gap too, so matching the gaps in increasing order is exact."""
    eligible = 0
    for taken, gap in enumerate(gaps, 1):
        while eligible < len(pending_floors) and pending_floors[eligible] < gap:
            eligible += 1
        if eligible < taken:
            tally.linearizability += 1
            tally.note(f"{where} passed through {gap}, which no acknowledged increment "
                       f"returned, and no increment still running could have made it "
                       f"({len(pending_floors)} were running)")
            return


# ------------------------------------------------------------------ registers

def _check_register(tally: Tally, key: Key, base: Any, final: Any, writes: list[Call],
                    reads: list[Call], lost: set[int], label: str) -> int:
    """Check one register; add acknowledged writes it lost to `lost`; return 1 if its value
    came from a write never acknowledged."""
    where = f"{label}: register {key!r}"
    mine = [(call, value) for call in writes for put_key, value in call.op.puts
            if put_key == key]
    made_by = {value: call for call, value in mine}
    acked = [call for call, _ in mine if call.acked]
    _sweep_register(tally, base, made_by, [call for call, _ in mine], reads, where)
    if final is ABSENT:
        if base is not ABSENT:
            tally.carried += 1
            tally.note(f"{where} held {base!r} before this worker and is gone")
        lost.update(id(call) for call in acked)
        if acked:
            tally.note(f"{where} is absent, though {len(acked)} writes of it were "
                       f"acknowledged")
        return 0
    if base is not ABSENT and same(final, base):
        if acked:
            lost.update(id(call) for call in acked)
            tally.note(f"{where} still holds its value from before this worker, though "
                       f"{len(acked)} writes of it were acknowledged")
        return 0
    writer = made_by.get(final) if type(final) is str else None
    if writer is None:
        tally.phantom += 1
        tally.note(f"{where} holds {final!r}, which nobody wrote")
        return 0
    if not writer.acked:
        return 1  # running at the kill: it may be the last write, whatever was acknowledged
    newer = [call for call in acked
             if call.start > writer.end  # type: ignore[operator]
             or (type(call.result) is int and type(writer.result) is int
                 and call.result > writer.result)]
    if newer:
        lost.update(id(call) for call in newer)
        tally.note(f"{where} holds the value of {writer.describe()} (LSN {writer.result}), "
                   f"older than acknowledged {newer[0].describe()} (LSN {newer[0].result})")
    return 0


def _sweep_register(tally: Tally, base: Any, made_by: dict[Any, Call], writes: list[Call],
                    reads: list[Call], where: str) -> None:
    """Check every acknowledged read of the register against the writes around it."""
    points = sorted([(call.start, 0, call) for call in writes + reads]
                    + [(call.end, 1, call) for call in writes if call.end is not None],
                    key=lambda point: point[0])
    latest = -1  # the latest START among writes that have returned (-1: none has)
    overwritten_before: dict[int, int] = {}
    is_read = {id(call) for call in reads}
    for _, is_end, call in points:
        if is_end:
            latest = max(latest, call.start)
        elif id(call) in is_read:
            overwritten_before[id(call)] = latest
    for read in reads:
        if not read.acked:
            continue
        value, cutoff = read.result, overwritten_before[id(read)]
        if value is None or (base is not ABSENT and same(value, base)):
            if value is None and base is not ABSENT:
                tally.linearizability += 1
                tally.note(f"{where}: {read.describe()} found it absent; it held {base!r}")
            elif cutoff >= 0:
                tally.linearizability += 1
                tally.note(f"{where}: {read.describe()} read the value from before this "
                           f"worker, though a write of it had returned before the read began")
            continue
        writer = made_by.get(value) if type(value) is str else None
        if writer is None:
            tally.phantom += 1
            tally.note(f"{where}: {read.describe()} read {value!r}, which nobody wrote")
        elif writer.start > read.end:  # type: ignore[operator]
            tally.linearizability += 1
            tally.note(f"{where}: {read.describe()} read the value of {writer.describe()}, "
                       f"which started after the read returned")
        elif writer.end is not None and writer.end < cutoff:
            tally.linearizability += 1
            tally.note(f"{where}: {read.describe()} read the value of {writer.describe()}, "
                       f"overwritten by a write that returned before the read began")


# ------------------------------------------------------------------ LSNs

def _check_lsns(tally: Tally, writes: list[Call], recovered_last_lsn: int, label: str) -> None:
    """The LSNs puts and put_manys returned: distinct, in real-time order, within the log."""
    logged = [call for call in writes if call.acked and call.op.kind != "incr"]
    lsns = [call.result for call in logged]
    repeated = sorted(lsn for lsn, times in Counter(lsns).items() if times > 1)
    if repeated:
        tally.lsn += len(repeated)
        tally.note(f"{label}: LSNs acknowledged to more than one write: {repeated[:8]}")
    points = sorted([(call.start, 0, call) for call in logged]
                    + [(call.end, 1, call) for call in logged if call.end is not None],
                    key=lambda point: point[0])
    highest = 0
    floor: dict[int, int] = {}
    for _, is_end, call in points:
        if not is_end:
            floor[id(call)] = highest
            continue
        lsn = call.result
        if type(lsn) is not int or lsn <= floor[id(call)] or lsn > recovered_last_lsn:
            tally.lsn += 1
            tally.note(f"{label}: {call.describe()} acknowledged LSN {lsn!r} (a write that "
                       f"returned before it started had {floor[id(call)]}; the recovered log "
                       f"ends at {recovered_last_lsn})")
        if type(lsn) is int:
            highest = max(highest, lsn)
