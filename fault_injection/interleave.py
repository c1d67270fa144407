"""Interleavings: writers sharing a few cold keys, killed, and checked for linearizability.

The kill campaign's writers never share a key, and their keys never leave memory; two bugs
lived where it could not look: an increment of a key not in memory built on a database read
that a write and a flush had overtaken (a lost update without any crash), and a child of
fork() writing through its parent's cache under the parent's LSNs. This campaign looks there.

Every cycle starts a worker on the directory the previous cycle left, running the shared-key
workload (shared_keys.py): all its threads (and, in some cycles, asyncio tasks) increment the
same counters, put the same registers and read them back, and so do the workers of the cycles
after it. The keys are kept cold: a `capacity` of a few entries (clean entries are evicted at
once), flushes every few milliseconds, database reads held up to 2 ms after their answer is
read (`backends.SlowReads`), in some cycles a `read_ttl` that expires clean entries, and the
cache closed and reopened every few hundred operations (and, of course, after every kill). The
worker ends on one trigger per cycle:

    acks     SIGKILL after a random number of acknowledgements
    flush    SIGKILL when a flush starts its database commit
    apply    SIGKILL from inside the worker, part-way through the Nth database apply
    clock    SIGKILL after a random time
    startup  SIGKILL during start-up and recovery
    fork     the worker forks children while it writes (forks.py); SIGKILL after the Nth
             child reported
    clean    no kill: two or three rounds, then `close()` and exit; the counters must then
             equal what they held before plus the acknowledged increments, exactly

The recovered copy is judged by linearizability.py against the journal (the order of its
events is the real-time order of the calls) and against what the previous recovery held; a
forked child must have been refused every use, and none of its writes may survive. The
directory goes on to the next cycle, whose worker recovers it.
"""

from __future__ import annotations

import os
import random
import shutil
from collections.abc import Callable
from typing import Any

from wbcache.fault_injection.campaign import Outcome, Settings, keep_evidence
from wbcache.fault_injection.forks import check_forks, forked_key
from wbcache.fault_injection.journal import ACK, DB_BEGIN, FORK, REOPENED
from wbcache.fault_injection.kill import nth_event
from wbcache.fault_injection.linearizability import SharedCheck, check_shared, history_from
from wbcache.fault_injection.oracle import Tally
from wbcache.fault_injection.runner import Recovered, prepare_directory, recover, run_worker
from wbcache.fault_injection.shared_keys import SHARED_KEYS
from wbcache.fault_injection.worker import WorkerConfig

TRIGGERS = ("acks", "flush", "apply", "clock", "startup", "fork", "clean")
FIGURES = ("cycles", "operations", "acknowledged", "recovered", "inflight_kept", "counters",
           "lost", "phantom", "counter_regressions", "carried", "lsn", "linearizability",
           "fork", "errors")
_FALLBACK = 5.0  # seconds: kill anyway if the awaited event never comes
_FORKS = 3  # children per fork cycle


def random_options(rng: random.Random) -> dict[str, Any]:
    """Options that keep the shared keys cold and make flushes and evictions frequent."""
    return {
        "fsync": "always" if rng.random() < 0.8 else "interval",
        "fsync_interval": 0.005,
        "segment_size": rng.choice([4096, 16384, 65536]),
        "flush_interval": rng.choice([0.002, 0.01, 0.05]),
        "flush_threshold": rng.choice([2, 8, 10_000]),
        "capacity": rng.choice([1, 2, 4]),
        "read_ttl": rng.choice([None, 0.001, 0.005]),
    }


def worker_config(settings: Settings, rng: random.Random, directory: str, cycle: int,
                  trigger: str) -> WorkerConfig:
    clean = trigger == "clean"
    return WorkerConfig(
        directory=directory, seed=settings.seed, cycle=cycle, threads=settings.threads,
        shared=True, record="light", options=settings.options(random_options(rng)),
        slow_reads=rng.choice([0.0, 0.001, 0.004]), async_tasks=rng.choice([0, 0, 2]),
        ops_per_thread=rng.choice([40, 120]) if clean else rng.choice([60, 200, 600]),
        rounds=rng.randint(2, 3) if clean else 1_000, close_at_end=clean,
        forks=_FORKS if trigger == "fork" else 0,
        kill_in_apply=rng.randint(1, 6) if trigger == "apply" else None)


def run_interleave(settings: Settings) -> Outcome:
    """`settings.cycles` cycles (fewer if `settings.seconds` runs out)."""
    rng = random.Random(f"wbcache-torture/interleave/{settings.seed}")
    outcome = Outcome("interleave", figures=FIGURES)
    triggers = dict.fromkeys(TRIGGERS, 0)
    seen = {"reads": 0, "children": 0, "clean": 0, "reopens": 0, "asyncio": 0}
    base: dict[Any, Any] = {}
    directory = ""
    for cycle in range(settings.cycles):
        if settings.expired():
            break
        if cycle % settings.cycles_per_dir == 0:
            if directory:
                shutil.rmtree(directory, ignore_errors=True)
            directory = settings.path("interleave", f"dir{cycle // settings.cycles_per_dir}")
            base = {}
        trigger = TRIGGERS[cycle % len(TRIGGERS)] if cycle < len(TRIGGERS) else rng.choice(
            TRIGGERS)
        triggers[trigger] += 1
        config = worker_config(settings, rng, directory, cycle, trigger)
        if not os.path.isdir(os.path.join(directory, "wal")):
            prepare_directory(directory)  # the worker opens (and wraps) the database itself
        kill_on, after = _trigger(rng, trigger)
        scratch = settings.path("interleave", "scratch")
        run = run_worker(config, scratch, kill_on=kill_on, kill_after_seconds=after)
        label = f"interleave cycle {cycle} [{trigger}]"
        recovered = recover(directory, copy_to=os.path.join(scratch, "copy"))
        check = check_interleave_cycle(recovered, base, seed=settings.seed, cycle=cycle,
                                       events=run.events, label=label)
        tally = check.tally
        _check_ending(tally, run, trigger, label)
        seen["reads"] += check.reads
        seen["children"] += tally.forked
        seen["clean"] += trigger == "clean" and not tally.violations
        seen["reopens"] += sum(1 for event in run.events if event[0] == REOPENED)
        seen["asyncio"] += bool(config.async_tasks)
        if tally.violations:
            where = keep_evidence(settings, f"interleave-cycle{cycle}", directory)
            tally.note(f"{label}: the crashed directory is kept in {where}")
        outcome.tally.add(tally)
        if recovered.error is None:
            base = {key: value for key, value in recovered.state.items() if key in SHARED_KEYS}
        else:  # a directory that does not open cannot go on: start a new one
            directory, base = settings.path("interleave", f"dir{cycle}-fresh"), {}
        settings.say(f"interleave {cycle + 1}/{settings.cycles} [{trigger}]: "
                     f"{tally.acknowledged:,} acknowledged writes, {check.reads:,} reads, "
                     f"lost {tally.lost}, not linearizable {tally.linearizability}, "
                     f"violations {tally.violations}")
    if directory:
        shutil.rmtree(directory, ignore_errors=True)
    outcome.rows["kill triggers"] = ", ".join(f"{name} {count}"
                                              for name, count in triggers.items())
    outcome.rows["  acknowledged reads checked"] = f"{seen['reads']:,}"
    outcome.rows["  clean ends, counters exact"] = f"{seen['clean']:,} of {triggers['clean']:,}"
    outcome.rows["  reopens inside a worker (cold again)"] = f"{seen['reopens']:,}"
    outcome.rows["  cycles with asyncio writers too"] = seen["asyncio"]
    outcome.rows["  forked children checked"] = f"{seen['children']:,}"
    return outcome


def check_interleave_cycle(recovered: Recovered, base: dict[Any, Any], *, seed: int,
                           cycle: int, events: list[list[Any]], label: str) -> SharedCheck:
    """The verdict on one cycle: the shared keys' histories, the forked children, and no key
    outside the workload."""
    if recovered.error is not None:
        tally = Tally(cycles=1, errors=1)
        tally.note(f"{label}: recovery refused: {recovered.error}")
        return SharedCheck(tally)
    fork_tally, children = check_forks(events, recovered.state, label)
    state = {key: value for key, value in recovered.state.items() if not forked_key(key)}
    check = check_shared(state, base, history_from(events, seed, cycle),
                         recovered_last_lsn=recovered.last_lsn, label=label)
    for key in state:
        if key not in SHARED_KEYS:
            check.tally.phantom += 1
            check.tally.note(f"{label}: key {key!r} was never written by this workload")
    check.tally.add(fork_tally)
    check.tally.forked += children
    return check


def _check_ending(tally: Tally, run: Any, trigger: str, label: str) -> None:
    """A clean cycle must end by itself with 0; every other one by SIGKILL."""
    if trigger == "clean":
        ok = run.returncode == 0 and not run.killed
    else:
        ok = run.sigkilled
    if not ok:
        tally.errors += 1
        tally.note(f"{label}: the worker ended with {run.returncode}"
                   f"{' (hung)' if run.hung else ''}: {run.stderr[-2000:]}")


def _trigger(rng: random.Random, trigger: str
             ) -> tuple[Callable[[list[Any]], bool] | None, float | None]:
    """(decide on each journal event, seconds after which to kill anyway)."""
    if trigger == "acks":
        return nth_event(ACK, rng.randint(1, 1200)), _FALLBACK
    if trigger == "flush":
        return nth_event(DB_BEGIN, rng.randint(1, 40)), _FALLBACK
    if trigger == "fork":
        return nth_event(FORK, rng.randint(1, _FORKS)), _FALLBACK
    if trigger == "clock":
        return None, rng.uniform(0.1, 0.8)
    if trigger == "startup":
        return None, rng.uniform(0.0, 0.2)
    if trigger == "apply":  # the worker kills itself; the clock only if it never applies
        return None, 2 * _FALLBACK
    return None, None  # clean: nobody kills it
