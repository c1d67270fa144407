"""The torture harness's own parts: the oracle must catch each kind of violation, the journal
must survive a kill mid-frame, and the workload must be the same in every process."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

from wbcache.fault_injection.journal import ACK, START, Journal, encode_event, read_events
from wbcache.fault_injection.oracle import Tally, ThreadJournal, check_cycle, journals_from
from wbcache.fault_injection.workload import Op, generate, shared_key, state_after

SEED, CYCLE = 7, 3


def journal_of(ops: list[Op], acked: int, started: int | None = None) -> ThreadJournal:
    """What a thread that started `started` (default all) ops and saw `acked` return reports."""
    journal = ThreadJournal()
    lsn = 100
    for op in ops[:len(ops) if started is None else started]:
        journal.start(op.seq)
        if op.seq < acked:
            lsn += 1
            result = (op.counter_after if op.kind == "incr"
                      else 1 if op.kind == "incr_shared" else lsn)
            journal.ack(op.seq, result)
    return journal


def check(actual: dict[Any, Any], journals: dict[int, ThreadJournal],
          carried: dict[Any, Any] | None = None, last_lsn: int = 10_000) -> Tally:
    return check_cycle(actual, carried or {}, seed=SEED, cycle=CYCLE, journals=journals,
                       recovered_last_lsn=last_lsn, label="test")


def ops_of(thread: int = 0, count: int = 60) -> list[Op]:
    return generate(SEED, CYCLE, thread, count)


def test_the_state_after_every_acknowledged_operation_passes() -> None:
    ops = ops_of()
    tally = check(state_after(ops, 60), {0: journal_of(ops, 60)})
    assert tally.violations == 0, tally.messages
    assert (tally.acknowledged, tally.recovered) == (60, 60)


def test_an_unacknowledged_operation_may_survive_or_not() -> None:
    ops = ops_of()
    for kept in (59, 60):
        tally = check(state_after(ops, kept), {0: journal_of(ops, 59)})
        assert tally.violations == 0, tally.messages
        assert tally.inflight_kept == kept - 59


def test_a_lost_acknowledged_operation_is_counted_as_lost() -> None:
    ops = ops_of()
    tally = check(state_after(ops, 57), {0: journal_of(ops, 60)})
    assert tally.lost == 3 and tally.holes == 0


def test_an_operation_missing_before_recovered_ones_is_a_hole() -> None:
    ops = ops_of()
    put = next(op for op in ops[10:] if op.kind == "put" and not any(
        later.delete == op.puts[0][0] for later in ops))
    actual = state_after(ops, 60)
    del actual[put.puts[0][0]]
    tally = check(actual, {0: journal_of(ops, 60)})
    assert tally.holes == 1 and tally.lost == 1, tally.messages


def test_half_a_batch_is_a_partial_batch() -> None:
    ops = ops_of()
    batch = next(op for op in ops if op.kind in ("batch", "put_many"))
    actual = state_after(ops, 60)
    del actual[batch.witnesses[0]]
    tally = check(actual, {0: journal_of(ops, 60)})
    assert tally.partial == 1, tally.messages


def test_a_value_never_written_is_a_phantom() -> None:
    ops = ops_of()
    put = next(op for op in reversed(ops) if op.kind == "put")
    actual = state_after(ops, 60)
    actual[put.puts[0][0]] = "never written"
    assert check(actual, {0: journal_of(ops, 60)}).phantom == 1
    actual = state_after(ops, 60)
    actual[f"c{CYCLE}.t0.k999999"] = 1  # a key of this thread nobody wrote
    assert check(actual, {0: journal_of(ops, 60)}).phantom == 1
    actual = state_after(ops, 60)
    actual["foreign"] = 1
    assert check(actual, {0: journal_of(ops, 60)}).phantom == 1


def test_a_counter_below_its_last_acknowledged_value_is_a_regression() -> None:
    ops = ops_of()
    actual = state_after(ops, 60)
    counter = ops[0].counter_key
    assert counter in actual
    actual[counter] -= 1
    tally = check(actual, {0: journal_of(ops, 60)})
    assert tally.counter_regressions == 1, tally.messages


def test_the_shared_counter_must_match_what_the_threads_recovered() -> None:
    journals = {thread: journal_of(ops_of(thread), 60) for thread in range(3)}
    actual: dict[Any, Any] = {}
    shared = 0
    for thread in range(3):
        state = state_after(ops_of(thread), 60)
        shared += state.pop(shared_key(CYCLE), 0)
        actual.update(state)
    assert shared > 0
    actual[shared_key(CYCLE)] = shared
    assert check(actual, journals).violations == 0
    actual[shared_key(CYCLE)] = shared + 5
    assert check(actual, journals).inconsistent == 1
    actual[shared_key(CYCLE)] = 0
    assert check(actual, journals).counter_regressions == 1


def test_data_of_an_earlier_cycle_must_stay_as_it_was() -> None:
    carried = {"c1.t0.k1": "old", "c1.t0.k2": [1, 2]}
    assert check(dict(carried), {}, carried).violations == 0
    assert check({"c1.t0.k1": "old"}, {}, carried).carried == 1
    assert check({**carried, "c1.t0.k2": [1, 3]}, {}, carried).carried == 1
    assert check({**carried, "c1.t0.k3": 1}, {}, carried).phantom == 1  # resurrected


def test_an_acknowledged_lsn_beyond_the_recovered_log_is_flagged() -> None:
    ops = ops_of()
    tally = check(state_after(ops, 60), {0: journal_of(ops, 60)}, last_lsn=120)
    assert tally.lsn > 0


def test_values_of_other_types_are_not_equal() -> None:
    ops = ops_of()
    actual = state_after(ops, 60)
    key = next(key for key, value in actual.items() if type(value) is bool)
    actual[key] = int(actual[key])  # equal under ==, but not the value that was written
    assert check(actual, {0: journal_of(ops, 60)}).violations == 1


def test_a_journal_cut_short_by_a_kill_ends_at_its_last_whole_event(tmp_path: Any) -> None:
    path = tmp_path / "journal"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    journal = Journal(fd)
    journal.emit(START, 0, 0)
    journal.emit(ACK, 0, 0, 17)
    os.close(fd)
    data = path.read_bytes() + encode_event([START, 0, 1])[:-2]
    assert list(read_events(data)) == [[START, 0, 0], [ACK, 0, 0, 17]]
    assert journals_from(read_events(data))[0].acked == 1


def test_the_workload_is_the_same_in_every_process() -> None:
    here = repr(generate(11, 2, 1, 200))
    code = ("from wbcache.fault_injection.workload import generate;"
            "print(repr(generate(11, 2, 1, 200)))")
    there = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           check=True, env={**os.environ, "PYTHONHASHSEED": "12345"}).stdout
    assert there.strip() == here


class _OrphaningWorker:
    """A 'worker' that forks a child which keeps the journal pipe (its stdout) open for a
    minute, then exits: what a forked child stuck before closing its copy leaves behind."""

    module = "orphaning_worker"

    def __init__(self, pid_file: str) -> None:
        self.pid_file = pid_file

    def to_json(self) -> str:
        return self.pid_file


def test_a_dead_worker_whose_forked_child_holds_its_pipe_does_not_hold_the_harness(
        tmp_path: Any) -> None:
    from wbcache.fault_injection.runner import run_worker

    (tmp_path / "orphaning_worker.py").write_text(
        "import os, sys, time\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    time.sleep(60)\n"
        "    os._exit(0)\n"
        "open(sys.argv[1], 'w').write(str(pid))\n")
    pid_file = str(tmp_path / "orphan.pid")
    try:
        run = run_worker(_OrphaningWorker(pid_file), str(tmp_path / "scratch"),
                         env={"PYTHONPATH": str(tmp_path)}, timeout=120)
        assert run.returncode == 0 and not run.hung
        assert run.seconds < 20  # not the orphan's 60 s (it used to spin until then)
    finally:
        if os.path.exists(pid_file):
            os.kill(int(open(pid_file).read()), 9)
