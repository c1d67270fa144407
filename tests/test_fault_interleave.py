"""Writers sharing cold keys: the interleave campaign finds no violation in the library, and its
checks (linearizability of counters and registers, forked children) each fail on a history that
breaks them.

The hand-made histories below give every call its START and ACK positions in the journal (the
harness's clock): call a precedes call b when a's ACK comes before b's START.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import wbcache
from wbcache.fault_injection.backends import SlowReads
from wbcache.fault_injection.campaign import Settings, check_after_crash
from wbcache.fault_injection.forks import CHILD_PREFIX, check_forks
from wbcache.fault_injection.interleave import TRIGGERS, run_interleave
from wbcache.fault_injection.journal import ACK, FORK, START
from wbcache.fault_injection.linearizability import (
    Call,
    History,
    check_shared,
    history_from,
)
from wbcache.fault_injection.oracle import Tally, ThreadJournal
from wbcache.fault_injection.runner import Recovered
from wbcache.fault_injection.shared_keys import COUNTER_KEYS, REGISTER_KEYS, SharedOp, generate

SEED = int(os.environ.get("WBCACHE_TORTURE_SEED", "4"))
CTR = COUNTER_KEYS[0]
REG = REGISTER_KEYS[0]


# ------------------------------------------------------------------ the campaign, for real

def test_writers_sharing_cold_keys_stay_linearizable_through_kills_forks_and_reopens(
        tmp_path: Path) -> None:
    outcome = run_interleave(Settings(workdir=str(tmp_path), seed=SEED, cycles=14))
    tally = outcome.tally
    assert outcome.ok, "\n".join(tally.messages)
    assert tally.cycles == 14
    assert tally.recovered == tally.acknowledged > 2_000
    used = dict(part.split() for part in outcome.rows["kill triggers"].split(", "))
    assert set(used) == set(TRIGGERS) and all(int(count) > 0 for count in used.values())
    clean, of = outcome.rows["  clean ends, counters exact"].split(" of ")
    assert clean == of and int(clean) > 0  # without a crash every counter was exact
    assert int(outcome.rows["  acknowledged reads checked"].replace(",", "")) > 500
    assert int(outcome.rows["  reopens inside a worker (cold again)"].replace(",", "")) > 0
    assert tally.forked > 0 and tally.fork == 0  # children forked, every one refused


def test_slow_reads_wrap_the_database_through_the_public_protocol(tmp_path: Path) -> None:
    wbcache.open(tmp_path / "c").close()
    database = wbcache.LmdbBackend(str(tmp_path / "c" / "db"))
    slow = SlowReads(database, 0.001)
    assert isinstance(slow, wbcache.Backend) and slow.kind == database.kind
    with wbcache.open(tmp_path / "c", backend=slow, capacity=1) as cache:
        cache.put_many({"a": 1, "b": 2})
        cache.flush()  # both clean now, and one of them evicted
        cold = next(key for key in ("a", "b") if not cache.sequencer.in_memory(key))
        assert cache.incr(cold) == {"a": 1, "b": 2}[cold] + 1  # read back from the database
    assert slow.reads >= 1
    database.close()


# ------------------------------------------------------------------ the checks themselves

class Calls:
    """Builds a history: each call gets positions from one clock."""

    def __init__(self) -> None:
        self.history = History()
        self._seq = 0

    def add(self, kind: str, start: int, end: int | None, result: Any = None, *,
            key: Any = CTR, value: str | None = None, writer: int = 0) -> Call:
        puts = ((key, value),) if value is not None else ()
        op = SharedOp(writer, self._seq, kind, key=None if puts else key, puts=puts)
        self._seq += 1
        call = Call(op, start, end, result)
        self.history.calls.append(call)
        return call


def judge(calls: Calls, actual: dict[Any, Any], base: dict[Any, Any] | None = None,
          last_lsn: int = 1_000) -> Tally:
    return check_shared(actual, base or {}, calls.history, recovered_last_lsn=last_lsn,
                        label="test").tally


def test_overlapping_increments_may_return_in_either_order_and_one_in_flight_may_count() -> None:
    calls = Calls()
    calls.add("incr", 0, 5, 12)  # overlaps the next: 12 and 11 in either order is fine
    calls.add("incr", 1, 4, 11)
    calls.add("incr", 6, 8, 13)
    calls.add("incr", 7, None)  # running at the kill
    calls.add("get_counter", 9, 10, 13)
    for final in (13, 14):
        tally = judge(calls, {CTR: final}, {CTR: 10})
        assert tally.violations == 0, tally.messages
        assert (tally.acknowledged, tally.recovered, tally.inflight_kept) == (3, 3, final - 13)


def test_two_increments_returning_the_same_value_are_not_linearizable() -> None:
    calls = Calls()
    calls.add("incr", 0, 3, 1)
    calls.add("incr", 1, 2, 1)  # the lost update: both built on 0
    tally = judge(calls, {CTR: 1})
    assert tally.linearizability == 1 and tally.lost == 1, tally.messages


def test_an_increment_returning_less_than_one_that_returned_before_it_started() -> None:
    calls = Calls()
    calls.add("incr", 0, 1, 2)
    calls.add("incr", 2, 3, 1)  # started after the 2 was returned
    tally = judge(calls, {CTR: 2})
    assert tally.linearizability == 1, tally.messages


def test_an_increment_at_or_below_the_value_before_the_worker_built_on_stale_data() -> None:
    calls = Calls()
    calls.add("incr", 0, 1, 5)
    tally = judge(calls, {CTR: 6}, {CTR: 5})
    assert tally.linearizability >= 1, tally.messages
    assert "returned 5, though 5 had been returned" in tally.messages[0]


def test_a_counter_below_its_acknowledged_increments_lost_some() -> None:
    calls = Calls()
    calls.add("incr", 0, 1, 4)
    calls.add("incr", 2, 3, 5)
    tally = judge(calls, {CTR: 4}, {CTR: 3})
    assert tally.lost == 1 and tally.counter_regressions == 1, tally.messages


def test_a_counter_above_every_increment_started_counted_one_twice() -> None:
    calls = Calls()
    calls.add("incr", 0, 1, 1)
    tally = judge(calls, {CTR: 2})
    assert tally.phantom == 1, tally.messages


def test_without_a_crash_a_counter_must_equal_its_acknowledged_increments_exactly() -> None:
    calls = Calls()
    calls.add("incr", 0, 1, 1)
    calls.add("incr", 2, 3, 2)
    assert judge(calls, {CTR: 2}).violations == 0
    calls.add("incr", 4, None)  # with one in flight, 3 may be recovered ...
    assert judge(calls, {CTR: 3}).violations == 0
    calls.history.calls.pop()  # ... without, the 3rd increment came from nowhere
    tally = judge(calls, {CTR: 3})
    assert tally.phantom == 1, tally.messages


def test_a_value_passed_by_the_counter_needs_an_increment_that_could_have_made_it() -> None:
    calls = Calls()
    calls.add("incr", 0, 1, 1)
    calls.add("incr", 2, 3, 3)  # 2 was passed, and no acknowledged increment returned it
    calls.add("incr", 4, None)  # running, but started after 3 was returned: it cannot be 2
    tally = judge(calls, {CTR: 3})
    assert tally.linearizability == 1, tally.messages
    calls.history.calls[-1].start = -1  # started before anything returned: it may be 2
    assert judge(calls, {CTR: 3}).violations == 0


def test_a_counter_read_must_see_what_returned_before_it_and_nothing_never_started() -> None:
    calls = Calls()
    calls.add("incr", 0, 1, 1)
    calls.add("incr", 2, 3, 2)
    calls.add("get_counter", 4, 5, 1)  # 2 had been returned before it began
    assert judge(calls, {CTR: 2}).linearizability == 1
    calls.history.calls[-1].result = 3  # only 2 increments started
    assert judge(calls, {CTR: 2}).linearizability == 1
    calls.history.calls[-1].result = 2
    assert judge(calls, {CTR: 2}).violations == 0


def test_a_register_keeping_a_value_overwritten_by_a_later_acknowledged_write_lost_it() -> None:
    calls = Calls()
    calls.add("put", 0, 1, 10, key=REG, value="c0.w0.s0.0.")
    calls.add("put", 2, 3, 11, key=REG, value="c0.w0.s1.0.")  # started after the first returned
    assert judge(calls, {REG: "c0.w0.s1.0."}).violations == 0
    tally = judge(calls, {REG: "c0.w0.s0.0."})
    assert tally.lost == 1, tally.messages


def test_a_register_keeping_the_lower_lsn_of_two_overlapping_writes_lost_the_other() -> None:
    calls = Calls()
    calls.add("put", 0, 3, 10, key=REG, value="c0.w0.s0.0.")
    calls.add("put", 1, 2, 11, key=REG, value="c0.w1.s0.0.", writer=1)  # overlaps, LSN 11
    assert judge(calls, {REG: "c0.w1.s0.0."}).violations == 0
    assert judge(calls, {REG: "c0.w0.s0.0."}).lost == 1


def test_a_register_still_holding_its_old_value_after_an_acknowledged_write_lost_it() -> None:
    calls = Calls()
    calls.add("put", 0, 1, 10, key=REG, value="c1.w0.s0.0.")
    tally = judge(calls, {REG: "c0.w3.s9.0."}, {REG: "c0.w3.s9.0."})
    assert tally.lost == 1, tally.messages
    calls.history.calls[0].end = None  # not acknowledged: the old value may stay
    assert judge(calls, {REG: "c0.w3.s9.0."}, {REG: "c0.w3.s9.0."}).violations == 0


def test_a_register_value_nobody_wrote_is_a_phantom() -> None:
    calls = Calls()
    calls.add("put", 0, 1, 10, key=REG, value="c0.w0.s0.0.")
    assert judge(calls, {REG: "c0.w0.s0.1."}).phantom == 1


def test_a_register_read_of_an_overwritten_value_is_not_linearizable() -> None:
    calls = Calls()
    calls.add("put", 0, 1, 10, key=REG, value="c0.w0.s0.0.")
    calls.add("put", 2, 3, 11, key=REG, value="c0.w0.s1.0.")
    read = calls.add("get_register", 4, 5, "c0.w0.s0.0.", key=REG)
    assert judge(calls, {REG: "c0.w0.s1.0."}).linearizability == 1
    read.start = 2  # overlapping the second write: the first value is still a right answer
    assert judge(calls, {REG: "c0.w0.s1.0."}).violations == 0


def test_lsns_must_be_distinct_and_follow_real_time() -> None:
    calls = Calls()
    calls.add("put", 0, 1, 10, key=REG, value="c0.w0.s0.0.")
    calls.add("put", 2, 3, 10, key=REGISTER_KEYS[1], value="c0.w0.s1.0.")
    tally = judge(calls, {REG: "c0.w0.s0.0.", REGISTER_KEYS[1]: "c0.w0.s1.0."})
    assert tally.lsn == 2, tally.messages  # reused, and not above the earlier write's
    calls.history.calls[1].result = 9  # returned before it started, yet a lower LSN
    assert judge(calls, {REG: "c0.w0.s0.0.", REGISTER_KEYS[1]: "c0.w0.s1.0."}).lsn == 1


def test_the_history_is_read_from_the_journal_in_its_own_order() -> None:
    ops = generate(SEED, 2, 0, 3)
    events = [[START, 0, 0], [ACK, 0, 0, 1], [START, 1, 0], [START, 0, 1], [ACK, 0, 1, 2],
              [START, 0, 2]]
    history = history_from(events, SEED, 2)
    assert [call.op for call in history.calls if call.op.writer == 0] == ops
    starts = [(call.op.writer, call.op.seq, call.start, call.end) for call in history.calls]
    assert starts == [(0, 0, 0, 1), (1, 0, 2, None), (0, 1, 3, 4), (0, 2, 5, None)]
    assert not history.problems
    assert history_from([[ACK, 0, 0, 1]], SEED, 2).problems


# ------------------------------------------------------------------ forked children

REFUSED_ALL = {"put": "refused", "get": "refused", "close": "closed"}


def test_a_forked_child_allowed_any_use_or_hanging_or_leaving_a_write_is_flagged() -> None:
    assert check_forks([[FORK, 0, 10, 0, REFUSED_ALL]], {}, "test")[0].fork == 0
    accepted = dict(REFUSED_ALL, put="accepted")
    assert check_forks([[FORK, 0, 10, 0, accepted]], {}, "test")[0].fork == 1
    assert check_forks([[FORK, 0, 10, -14, REFUSED_ALL]], {}, "test")[0].fork == 1  # its alarm
    assert check_forks([[FORK, 0, 10, 0, {"put": "refused"}]], {}, "test")[0].fork == 1
    tally, children = check_forks([], {f"{CHILD_PREFIX}10.put": 1}, "test")
    assert tally.fork == 1 and children == 0


def test_the_kill_oracle_flags_a_childs_write_instead_of_calling_it_a_phantom() -> None:
    state = {f"{CHILD_PREFIX}77.put": 1}
    tally = check_after_crash(Recovered(state=state, last_lsn=1), {}, seed=SEED, cycle=0,
                              journals={0: ThreadJournal()}, label="test",
                              events=[[FORK, 0, 77, 0, dict(REFUSED_ALL, put="accepted")]])
    assert tally.fork == 2 and tally.phantom == 0 and tally.forked == 1, tally.messages
