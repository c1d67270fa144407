"""Many processes, one shared directory: SIGKILL the processes of `wbcache.open(dir, shared=True)`.

Four "slots" (SLOTS) run worker processes (shared_dir_worker.py) of `threads` writer threads
each, at once, on ONE shared directory: each process claims a lane (its own log) and flushes
into the one LMDB database; the lanes of dead processes are adopted, at the next open or by a
live process's flusher (`adopt_interval`). Each slot's process is SIGKILLed and restarted on
its own schedule, sometimes after a pause (its lane an orphan meanwhile, for the others to
adopt), and after its last kill never again: the final open has orphans to adopt. A kill lands
on one trigger:

    acks      after a random number of the process's acknowledged writes
    flush     inside the flusher: at a crash point just before or after the database commit,
              or after the log's truncation (small flush_interval)
    adopt     inside a recovery: replaying an orphan lane's log (claimed or adopted at open,
              or adopted by the flusher's sweep, adopt_interval 0.02 s) or deleting it
    fork      the process forks children while it writes; each child must be refused every
              use of the cache it inherited, reopen() on a lane of its own and write as a
              writer of its own; SIGKILL after the Nth child reported (the children die with
              their parent, PR_SET_PDEATHSIG, in their reopen or their writes)
    clock     after a random time
    startup   very early: in the open, its recovery or its adoptions

Every process (and every child) writes as new writers, so nothing needs reading back between
runs: the check is at the end, once every process is dead. The directory is opened afresh
(adopting every orphan), and the ledger (ledger.py) and the register check
(shared_dir_workload.py) judge what it holds: for every writer, nothing acknowledged lost
(marker >= acknowledged), nothing never started (marker <= started); every counter exactly
the increments of the writes the markers say survived (so >= acknowledged, <= attempted,
neither lost nor counted twice across lanes and adoptions); every value and register one that
those writes left. No lane may still hold log records after the final open.
"""

from __future__ import annotations

import os
import random
import threading
import time
from collections.abc import Callable
from typing import Any

import wbcache
from wbcache.fault_injection.campaign import Outcome, Settings, keep_evidence
from wbcache.fault_injection.forks import REFUSED
from wbcache.fault_injection.journal import ACK, ERROR, FORK, MARKER, READY, START
from wbcache.fault_injection.kill import nth_event, random_options
from wbcache.fault_injection.ledger import ThreadLedger, check_final
from wbcache.fault_injection.oracle import Tally
from wbcache.fault_injection.runner import WorkerRun, run_worker
from wbcache.fault_injection.shared_dir_worker import SharedDirConfig
from wbcache.fault_injection.shared_dir_workload import REGISTERS, check_registers, is_register
from wbcache.wal.format import HEADER_SIZE

MODE = "shared"  # the report's column
SLOTS = 4
FORKS = 3  # children a process forks in a fork run
OTHER_FORKS = 2  # ... and in a fifth of the other runs
TRIGGERS = ("acks", "flush", "adopt", "fork", "clock", "startup")
FLUSH_POINTS = ("flush.before_commit", "flush.after_commit", "flush.after_truncate")
ADOPT_POINTS = ("recovery.before_replay", "recovery.after_replay", "recovery.after_delete")
_EVENT_TRIGGER_FALLBACK = 2.5  # seconds: kill anyway if the awaited event never comes
_NODES_PER_SLOT = 10_000 * 10  # node = (slot * 10_000 + run) * 10 + child
FIGURES = ("cycles", "operations", "acknowledged", "recovered", "inflight_kept", "counters",
           "lost", "partial", "phantom", "counter_mismatches", "inconsistent", "carried",
           "fork", "errors")


class Slot:
    """One slot: its processes, one after the other, and the ledgers of their writers."""

    def __init__(self, index: int, settings: Settings, directory: str, kills: int,
                 mutation: str | None) -> None:
        self.index = index
        self.settings = settings
        self.directory = directory
        self.kills = kills
        self.mutation = mutation
        self.ledgers: dict[tuple[int, int], ThreadLedger] = {}
        self.tally = Tally()
        self.triggers = dict.fromkeys(TRIGGERS, 0)
        self.fired = dict.fromkeys(TRIGGERS, 0)  # kills by the crash point the run armed
        self.fired_live = 0  # ... of them, in a recovery after the open returned: adoptions
        #                      by the flusher's sweep of a live process
        self.children = 0
        self.pauses = 0
        self._rng = random.Random(f"wbcache-torture/shared-dir/{settings.seed}/{index}")

    def run(self) -> None:
        """Every run of this slot (its harness thread); an error of the harness is counted."""
        try:
            for kill in range(self.kills):
                if self.settings.expired():
                    break
                self._one_run(kill)
                if kill + 1 < self.kills and self._rng.random() < 0.3:
                    self.pauses += 1  # pacing: the lane stays an orphan for the others
                    time.sleep(self._rng.uniform(0.1, 0.6))
        except Exception as exc:  # the harness failed: a finding, never a silent pass
            self.tally.errors += 1
            self.tally.note(f"slot {self.index}: harness error {type(exc).__name__}: {exc}")

    def _one_run(self, kill: int) -> None:
        rng = self._rng
        trigger = (TRIGGERS[(self.index + kill) % len(TRIGGERS)] if kill < len(TRIGGERS)
                   else rng.choice(TRIGGERS))
        self.triggers[trigger] += 1
        options = self.settings.options(random_options(rng))
        options["adopt_interval"] = rng.choice([0.02, 0.1, 0.5])
        if trigger in ("flush", "adopt"):
            options["flush_interval"] = rng.choice([0.005, 0.02])
        if trigger == "adopt":
            options["adopt_interval"] = 0.02
        forks = FORKS if trigger == "fork" else (OTHER_FORKS if rng.random() < 0.2 else 0)
        config = SharedDirConfig(
            directory=self.directory, node=self.index * _NODES_PER_SLOT + kill * 10,
            threads=self.settings.threads, options=options, forks=forks,
            fork_interval=rng.choice([0.02, 0.1, 0.3]), child_writes=rng.choice([20, 200]),
            seed=self.settings.seed, mutation=self.mutation)
        kill_on, after, env = _trigger(rng, trigger, forks)
        run = run_worker(config, self.settings.path(MODE, f"scratch{self.index}"),
                         kill_on=kill_on, kill_after_seconds=after, env=env)
        label = f"slot {self.index} kill {kill + 1}/{self.kills} [{trigger}]"
        tally = Tally(cycles=1)
        acks, replayed = self._read(run, tally, label)
        fired = run.sigkilled and not run.killed
        self.fired[trigger] += fired
        self.fired_live += fired and trigger == "adopt" and replayed is not None
        if not run.sigkilled:
            tally.errors += 1
            tally.note(f"{label}: the worker was not killed but exited with {run.returncode}"
                       f"{' (hung)' if run.hung else ''}: {run.stderr[-2000:]}")
        self.tally.add(tally)
        opened = ("killed before its open returned" if replayed is None else
                  f"opened, replaying {replayed:,} log record{'' if replayed == 1 else 's'}")
        how = f"at {env['WBCACHE_CRASH_AT']}" if fired else "by the harness"
        self.settings.say(f"{MODE} {label}: {opened}; {acks:,} acknowledged, killed {how}; "
                          f"errors {tally.errors}, fork violations {tally.fork}")

    def _read(self, run: WorkerRun, tally: Tally, label: str) -> tuple[int, int | None]:
        """Feed the run's journal to the ledgers: (acknowledgements, records replayed at
        open, or None if it was killed before it had opened)."""
        acks, replayed = 0, None
        for event in run.events:
            tag = event[0]
            try:
                if tag == READY:
                    replayed = event[2]
                elif tag == MARKER:
                    ledger = self.ledgers.setdefault((event[1], event[2]),
                                                     ThreadLedger(event[1], event[2]))
                    ledger.found(event[3], tally, label)
                elif tag == START:
                    self._ledger(event).start(event[3])
                elif tag == ACK:
                    self._ledger(event).ack(event[3])
                    acks += 1
                elif tag == ERROR:
                    tally.errors += 1
                    tally.note(f"{label}: node {event[1]} thread {event[2]}: write {event[3]} "
                               f"raised {event[4]}: {event[5]}")
                elif tag == FORK:
                    self.children += 1
                    tally.forked += 1
                    wrong = {use: outcome for use, outcome in event[2].items()
                             if outcome != REFUSED}
                    if wrong:
                        tally.fork += 1
                        tally.note(f"{label}: forked child (node {event[1]}) was not refused "
                                   f"the cache it inherited: {wrong}")
            except (ValueError, KeyError) as exc:  # the journal contradicts itself
                tally.errors += 1
                tally.note(f"{label}: journal: {exc!r}")
        return acks, replayed

    def _ledger(self, event: list[Any]) -> ThreadLedger:
        ledger = self.ledgers.get((event[1], event[2]))
        if ledger is None:
            raise KeyError(f"node {event[1]} thread {event[2]} wrote before reading its marker")
        return ledger


def _trigger(rng: random.Random, trigger: str, forks: int
             ) -> tuple[Callable[[list[Any]], bool] | None, float | None, dict[str, str]]:
    """(decide on each journal event, seconds after which to kill anyway, environment)."""
    if trigger == "acks":
        return nth_event(ACK, rng.randint(50, 1500)), _EVENT_TRIGGER_FALLBACK, {}
    if trigger == "flush":
        point = f"{rng.choice(FLUSH_POINTS)}:{rng.randint(1, 6)}"
        return None, _EVENT_TRIGGER_FALLBACK, {"WBCACHE_CRASH_AT": point}
    if trigger == "adopt":
        point = f"{rng.choice(ADOPT_POINTS)}:{rng.randint(1, 2)}"
        return None, _EVENT_TRIGGER_FALLBACK, {"WBCACHE_CRASH_AT": point}
    if trigger == "fork":
        return _after_fork(rng.randint(1, forks), rng.randint(0, 200)), \
            _EVENT_TRIGGER_FALLBACK, {}
    if trigger == "clock":
        return None, rng.uniform(0.3, 2.0), {}
    return None, rng.uniform(0.0, 0.4), {}


def _after_fork(nth: int, then: int) -> Callable[[list[Any]], bool]:
    """A kill decision: `then` events after the `nth` child reported its refusals (so the
    children are in their reopen, or writing)."""
    forked = nth_event(FORK, nth)
    after = -1

    def decide(event: list[Any]) -> bool:
        nonlocal after
        if after < 0 and forked(event):
            after = 0
        elif after >= 0:
            after += 1
        return after >= then

    return decide


def _lanes_with_records(directory: str) -> int:
    """Lanes whose log holds more than segment headers (records not yet in the database)."""
    lanes = os.path.join(directory, "lanes")
    count = 0
    for lane in sorted(os.listdir(lanes)) if os.path.isdir(lanes) else []:
        wal = os.path.join(lanes, lane, "wal")
        names = os.listdir(wal) if os.path.isdir(wal) else []
        count += any(os.path.getsize(os.path.join(wal, name)) > HEADER_SIZE for name in names)
    return count


def run_shared_dir(settings: Settings, *, mutation: str | None = None) -> Outcome:
    """`settings.cycles` kills shared among (at most) four slots of processes on one shared
    directory, then the exact check of everything it holds. `mutation`: a bug planted in the
    workers (shared_dir_worker.MUTATIONS), for the tests that prove it is caught."""
    outcome = Outcome(MODE, figures=FIGURES)
    directory = settings.path(MODE, "directory")
    count = min(SLOTS, settings.cycles)
    slots = [Slot(index, settings, directory,
                  settings.cycles // count + (index < settings.cycles % count), mutation)
             for index in range(count)]
    threads = [threading.Thread(target=slot.run, name=f"torture-shared-{slot.index}")
               for slot in slots]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for slot in slots:
        outcome.tally.add(slot.tally)
    orphans = _lanes_with_records(directory)
    final = Tally()
    state: dict[Any, Any] = {}
    try:
        with wbcache.open(directory, shared=True) as cache:
            state = dict(cache.items())
    except Exception as exc:  # any refusal is a finding
        final.errors += 1
        final.note(f"final open: {type(exc).__name__}: {exc}")
    stranded = _lanes_with_records(directory)
    if stranded:
        final.errors += stranded
        final.note(f"final check: {stranded} lane(s) still hold log records after the final "
                   f"open, which must adopt every orphan")
    ledgers = [ledger for slot in slots for ledger in slot.ledgers.values()]
    final.add(check_final({key: value for key, value in state.items() if not is_register(key)},
                          ledgers, "final check"))
    markers = {(ledger.node, ledger.thread): ledger.marker or 0 for ledger in ledgers}
    final.add(check_registers(state, markers, "final check"))
    outcome.tally.add(final)
    settings.say(f"{MODE} final check: {final.counters} counters, {final.counter_mismatches} "
                 f"off their exact total; {len(ledgers)} writers; violations "
                 f"{final.violations}")
    if outcome.tally.violations:
        where = keep_evidence(settings, MODE, directory)
        outcome.tally.note(f"{MODE}: the shared directory is kept in {where}")
    lanes = os.path.join(directory, "lanes")
    outcome.rows["processes x writer threads"] = f"{count} x {settings.threads}"
    outcome.rows["kill triggers"] = ", ".join(
        f"{name} {sum(slot.triggers[name] for slot in slots)}" for name in TRIGGERS)
    outcome.rows["  killed at the flusher's crash point"] = _fired(slots, "flush")
    outcome.rows["  killed at a crash point inside an adoption"] = _fired(slots, "adopt")
    outcome.rows["  of them, in a live process's adoption sweep"] = sum(
        slot.fired_live for slot in slots)
    outcome.rows["  forked children (refused, then reopen())"] = sum(s.children for s in slots)
    outcome.rows["  pauses with the lane orphaned"] = sum(s.pauses for s in slots)
    outcome.rows["writers checked"] = len(ledgers)
    outcome.rows["registers checked"] = REGISTERS
    outcome.rows["lanes (peak processes, reused)"] = (
        len(os.listdir(lanes)) if os.path.isdir(lanes) else 0)
    outcome.rows["  orphans holding records at the final open"] = orphans
    return outcome


def _fired(slots: list[Slot], trigger: str) -> str:
    return (f"{sum(slot.fired.get(trigger, 0) for slot in slots)} of "
            f"{sum(slot.triggers.get(trigger, 0) for slot in slots)}")
