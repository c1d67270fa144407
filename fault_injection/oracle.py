"""The oracle: does a recovered state satisfy the guarantee, given what the worker reported?

Checked after every crash (docs/design.md, "The guarantee"):
  * lost: an acknowledged operation whose effect is not in the recovered state;
  * phantom: a recovered value that was never written (or a key nobody wrote);
  * partial: a batch or put_many of which some keys were recovered and others not;
  * holes: an operation missing while a later operation of the same thread was recovered
    (an acknowledged one is then counted as lost too);
  * counter regressions: a counter below the last value an incr acknowledged;
  * inconsistent: none of the above, yet the thread's keys match the state after no prefix of
    its operations (e.g. a delete undone while later writes survived);
  * carried: data recovered by an earlier cycle that changed or vanished.

Per thread the recovered keys must equal the state after some prefix P of the thread's
operations with P >= the number acknowledged: a thread runs one operation at a time, so its
operations are in LSN order and any prefix of the log projects onto a prefix of them. Which P
matches is found in one pass, keeping the count of keys where the model and the recovered
state differ. When no P matches, the diagnosis counts what kind of damage it is, from the
operations whose visibility is certain (their own, never-deleted keys; the counter's value).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from wbcache.fault_injection.workload import DELETED, Op, generate, owner, shared_key

Key = Any
_ABSENT: Any = object()
MAX_MESSAGES = 20


def same(a: Any, b: Any) -> bool:
    """Equal values of the same types, recursively (so True is not 1 and 1.0 is not 1)."""
    if type(a) is not type(b):
        return False
    if type(a) is list:
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if type(a) is dict:
        return a.keys() == b.keys() and all(same(v, b[k]) for k, v in a.items())
    return bool(a == b)


@dataclass
class Tally:
    """Counts over checked crashes; every field from `lost` on must stay 0."""

    cycles: int = 0
    operations: int = 0  # started
    acknowledged: int = 0
    recovered: int = 0  # acknowledged and found
    inflight_kept: int = 0  # started, not acknowledged, found (allowed either way)
    counters: int = 0  # shared counters compared with their exact expected total (nodes.py)
    forked: int = 0  # children forked by a worker that reported back (forks.py)
    lost: int = 0
    holes: int = 0
    partial: int = 0
    phantom: int = 0
    counter_regressions: int = 0
    counter_mismatches: int = 0  # a shared counter off its exact total: lost or counted twice
    inconsistent: int = 0
    carried: int = 0
    lsn: int = 0  # an acknowledged LSN beyond the recovered log, or LSNs not increasing
    # a shared counter or register whose history no linear order explains (linearizability.py)
    linearizability: int = 0
    fork: int = 0  # a forked child allowed to use its parent's cache, or whose write survived
    errors: int = 0  # a worker or the library raised where it must not, or recovery refused
    messages: list[str] = field(default_factory=list)

    VIOLATIONS = ("lost", "holes", "partial", "phantom", "counter_regressions",
                  "counter_mismatches", "inconsistent", "carried", "lsn", "linearizability",
                  "fork", "errors")

    @property
    def violations(self) -> int:
        return sum(getattr(self, name) for name in self.VIOLATIONS)

    def note(self, message: str) -> None:
        if len(self.messages) < MAX_MESSAGES:
            self.messages.append(message)

    def add(self, other: Tally) -> None:
        for f in fields(self):
            if f.name == "messages":
                for message in other.messages:
                    self.note(message)
            else:
                setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


@dataclass
class ThreadJournal:
    """What one writer thread reported: operations 0..started-1 began, 0..acked-1 returned."""

    started: int = 0
    acked: int = 0
    results: dict[int, Any] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    def start(self, seq: int) -> None:
        if seq != self.started or self.acked != seq:
            raise ValueError(f"journal out of order: start of {seq} after {self.started} "
                             f"started, {self.acked} acknowledged")
        self.started = seq + 1

    def ack(self, seq: int, result: Any) -> None:
        if seq != self.acked or seq + 1 != self.started:
            raise ValueError(f"journal out of order: ack of {seq} after {self.acked} acknowledged")
        self.acked = seq + 1
        self.results[seq] = result


def journals_from(events: Iterable[list[Any]]) -> dict[int, ThreadJournal]:
    """Per-thread journals from a worker's start/ack/error events (other events ignored)."""
    journals: dict[int, ThreadJournal] = {}
    for event in events:
        tag = event[0]
        if tag == "S":
            journals.setdefault(event[1], ThreadJournal()).start(event[2])
        elif tag == "A":
            journals.setdefault(event[1], ThreadJournal()).ack(event[2], event[3])
        elif tag == "E":
            journals.setdefault(event[1], ThreadJournal()).errors.append(
                f"operation {event[2]} raised {event[3]}: {event[4]}")
    return journals


@dataclass
class _ThreadResult:
    consistent: list[int]  # prefixes P whose state equals the recovered keys
    shared_prefix: list[int]  # shared-counter increments among the first P operations
    max_acked_shared: int


def check_cycle(actual: Mapping[Key, Any], carried: Mapping[Key, Any], *, seed: int, cycle: int,
                journals: Mapping[int, ThreadJournal], recovered_last_lsn: int,
                label: str) -> Tally:
    """Check the recovered state `actual` (every key) after a crash of worker `cycle`.

    `carried` is what earlier cycles left (it must be unchanged); `journals` what this cycle's
    threads reported; `recovered_last_lsn` the last LSN the reopened cache knows of.
    """
    tally = Tally(cycles=1)
    per_thread: dict[int, dict[Key, Any]] = {}
    for key, value in carried.items():
        if not same(actual.get(key, _ABSENT), value):
            tally.carried += 1
            tally.note(f"{label}: key {key!r} of an earlier cycle changed: {value!r} -> "
                       f"{actual.get(key, '<absent>')!r}")
    for key, value in actual.items():
        if key in carried:
            continue
        who = owner(key)
        if who is None or who[0] != cycle:
            tally.phantom += 1
            tally.note(f"{label}: key {key!r} was not written by this cycle nor kept from an "
                       f"earlier one")
        elif who[1] is not None:
            if who[1] not in journals:
                tally.phantom += 1
                tally.note(f"{label}: key {key!r} belongs to a thread that never started")
            else:
                per_thread.setdefault(who[1], {})[key] = value
    results: list[_ThreadResult] = []
    for thread, journal in sorted(journals.items()):
        for error in journal.errors:
            tally.errors += 1
            tally.note(f"{label}: thread {thread}: {error}")
        ops = generate(seed, cycle, thread, journal.started)
        results.append(_check_thread(tally, ops, journal, per_thread.get(thread, {}),
                                     recovered_last_lsn, f"{label} thread {thread}"))
    _check_shared(tally, actual.get(shared_key(cycle), _ABSENT), results, label)
    return tally


def _check_thread(tally: Tally, ops: list[Op], journal: ThreadJournal, actual: dict[Key, Any],
                  recovered_last_lsn: int, label: str) -> _ThreadResult:
    acked = journal.acked
    tally.operations += len(ops)
    tally.acknowledged += acked
    consistent, shared_prefix = _matching_prefixes(ops, actual)
    max_acked_shared = max((journal.results[op.seq] for op in ops[:acked]
                            if op.kind == "incr_shared"), default=0)
    _check_lsns(tally, ops, journal, recovered_last_lsn, label)
    _check_counter(tally, ops, journal, actual, label)
    if consistent and consistent[-1] >= acked:
        tally.recovered += acked
        tally.inflight_kept += consistent[-1] - acked
    elif consistent:
        tally.recovered += consistent[-1]
        tally.lost += acked - consistent[-1]
        tally.note(f"{label}: {acked - consistent[-1]} acknowledged operation(s) lost: the "
                   f"recovered keys are the state after {consistent[-1]} of {len(ops)} "
                   f"operations, {acked} were acknowledged")
    else:
        _diagnose(tally, ops, acked, actual, label)
    return _ThreadResult(consistent, shared_prefix, max_acked_shared)


def _matching_prefixes(ops: list[Op], actual: dict[Key, Any]) -> tuple[list[int], list[int]]:
    """Every P such that applying ops[:P] to nothing gives exactly `actual`; and, per P, the
    shared-counter increments among ops[:P]."""
    model: dict[Key, Any] = {}
    mismatch = len(actual)  # the empty model differs from every recovered key
    consistent = [0] if not mismatch else []
    shared = [0]
    for count, op in enumerate(ops, 1):
        for key, value in op.writes:
            before = not same(actual.get(key, _ABSENT), model.get(key, _ABSENT))
            if value is DELETED:
                model.pop(key, None)
            else:
                model[key] = value
            after = not same(actual.get(key, _ABSENT), model.get(key, _ABSENT))
            mismatch += after - before
        if not mismatch:
            consistent.append(count)
        shared.append(shared[-1] + op.shared_delta)
    return consistent, shared


def _check_lsns(tally: Tally, ops: list[Op], journal: ThreadJournal, recovered_last_lsn: int,
                label: str) -> None:
    previous = 0
    for op in ops[:journal.acked]:
        if not op.returns_lsn:
            continue
        lsn = journal.results[op.seq]
        if lsn <= previous or lsn > recovered_last_lsn:
            tally.lsn += 1
            tally.note(f"{label}: operation {op.seq} acknowledged LSN {lsn} (previous "
                       f"{previous}, recovered log ends at {recovered_last_lsn})")
        previous = lsn


def _check_counter(tally: Tally, ops: list[Op], journal: ThreadJournal, actual: dict[Key, Any],
                   label: str) -> None:
    last = max((op.counter_after for op in ops[:journal.acked] if op.counter_after is not None),
               default=0)
    if not ops:
        return
    value = actual.get(ops[0].counter_key, 0)
    if type(value) is int and value < last:
        tally.counter_regressions += 1
        tally.note(f"{label}: counter {ops[0].counter_key!r} is {value}, below {last}, "
                   f"the last value acknowledged")


def _diagnose(tally: Tally, ops: list[Op], acked: int, actual: dict[Key, Any],
              label: str) -> None:
    """The recovered keys match no prefix: count lost, holes, partial batches, phantoms."""
    before = tally.violations
    written: dict[Key, Any] = {}
    counter_values: set[int] = set()
    deleted_by: dict[Key, int] = {}
    for op in ops:
        for key, value in op.puts:
            written[key] = value
        if op.counter_after is not None:
            counter_values.add(op.counter_after)
        if op.delete is not None:
            deleted_by[op.delete] = op.seq
    counter_key = ops[0].counter_key if ops else None
    for key, value in actual.items():
        if key == counter_key:
            ok = type(value) is int and value in counter_values
        else:
            expected = written.get(key, _ABSENT)
            ok = expected is not _ABSENT and same(value, expected)
        if not ok:
            tally.phantom += 1
            tally.note(f"{label}: {key!r} = {value!r} was never written")
    visible: list[bool | None] = [None] * len(ops)
    counter = actual.get(counter_key, 0)
    for op in ops:
        if op.witnesses:
            present = sum(1 for key in op.witnesses if key in actual)
            if 0 < present < len(op.witnesses):
                tally.partial += 1
                tally.note(f"{label}: {op.kind} {op.seq} partly applied: {present} of "
                           f"{len(op.witnesses)} keys recovered")
            visible[op.seq] = present > 0
        elif op.kind in ("put", "big_put"):
            key = op.puts[0][0]
            visible[op.seq] = True if key in actual else (None if key in deleted_by else False)
        elif op.kind == "delete":
            visible[op.seq] = False if op.delete in actual else None
        elif op.kind == "incr" and type(counter) is int:
            visible[op.seq] = op.counter_after is not None and op.counter_after <= counter
    last_visible = max((i for i, v in enumerate(visible) if v), default=-1)
    for i, v in enumerate(visible):
        if v is False and i < acked:
            tally.lost += 1
            tally.note(f"{label}: acknowledged {ops[i].kind} {i} lost")
        if v is False and i < last_visible:
            tally.holes += 1
            tally.note(f"{label}: {ops[i].kind} {i} missing while {ops[last_visible].kind} "
                       f"{last_visible} was recovered")
    tally.recovered += sum(1 for v in visible[:acked] if v is not False)
    tally.inflight_kept += sum(1 for v in visible[acked:] if v)
    if tally.violations == before:
        tally.inconsistent += 1
        tally.note(f"{label}: recovered keys match the state after no prefix of its "
                   f"{len(ops)} operations")


def _check_shared(tally: Tally, value: Any, results: list[_ThreadResult], label: str) -> None:
    if not results:
        return
    count = 0 if value is _ABSENT else value
    floor = max(result.max_acked_shared for result in results)
    if type(count) is not int:
        tally.phantom += 1
        tally.note(f"{label}: shared counter holds {value!r}")
        return
    if count < floor:
        tally.counter_regressions += 1
        tally.note(f"{label}: shared counter is {count}, below {floor}, a value acknowledged")
        return
    if all(result.consistent for result in results):
        low = sum(result.shared_prefix[result.consistent[0]] for result in results)
        high = sum(result.shared_prefix[result.consistent[-1]] for result in results)
        if not low <= count <= high:
            tally.inconsistent += 1
            tally.note(f"{label}: shared counter is {count}; the threads' recovered prefixes "
                       f"allow {low}..{high}")
