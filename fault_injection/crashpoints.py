"""Crash points: SIGKILL a worker at every named point of the library, reopen, check.

The library names a point at every durable step (`wbcache.wal.crashpoints.POINTS`) and kills
its own process at the Nth hit of the point named by WBCACHE_CRASH_AT="name:N". This campaign
enumerates them:

  * points on the write, flush and rotation paths: a worker runs the workload with small
    segments and frequent flushes (so rotations, commits and truncations all happen; every
    other run with asyncio writers too; the cache is closed at the end), armed at "point:N"
    for N = 1 on the first pass, then 7, 2, 25, 3, 60, 5, 13 on later ones;
  * recovery points (and segment deletion as recovery does it), nested twice: a worker is
    killed with a log full of unflushed records, a second worker is killed inside its
    recovery of that, a third inside ITS recovery, and only then is the directory reopened
    and checked against what the first worker acknowledged.

A point counts as covered when a worker armed with it was killed by it (SIGKILLed, not by the
harness, with the point in its trace, WBCACHE_CRASH_TRACE) and the check that followed passed.

The library names no point while the first open lays a new directory out, so the harness adds
its own (`run_layout_crashes`): a worker that kills itself right after creating DIR/wal, or
DIR/db, during the first open of a new directory; reopening must then work.
"""

from __future__ import annotations

import os
import random
import shutil
from dataclasses import dataclass
from typing import Any

from wbcache.fault_injection.campaign import Outcome, Settings, check_after_crash, keep_evidence
from wbcache.fault_injection.oracle import journals_from
from wbcache.fault_injection.runner import WorkerRun, recover, run_worker
from wbcache.fault_injection.worker import WorkerConfig
from wbcache.wal.crashpoints import POINTS

RECOVERY_POINTS = tuple(point for point in POINTS if point.startswith("recovery."))
WORKLOAD_POINTS = tuple(point for point in POINTS if point not in RECOVERY_POINTS)
HITS = (1, 7, 2, 25, 3, 60, 5, 13)  # the Nth hit, pass by pass
# What a nested (second) crash inside recovery may be armed with: the recovery points, and
# the segment deletion that recovery performs (reached only while a log remains).
NESTED = tuple(f"{point}:1" for point in RECOVERY_POINTS) + (
    "wal.segment.before_delete:2", "wal.segment.after_delete:1")

LAYOUT_DIRS = ("wal", "db")  # the first open is killed right after it creates each of these

_WORKLOAD_OPTIONS = {"segment_size": 4096, "flush_interval": 0.01, "flush_threshold": 100}
_LOG_HEAVY_OPTIONS = {"segment_size": 4096, "flush_interval": 3600.0,
                      "flush_threshold": 1_000_000}


@dataclass(frozen=True)
class Step:
    """One cycle of the plan: an armed workload run, or a nested recovery crash."""

    first: str  # "point:N"
    second: str | None = None  # nested: the crash inside the first crash's recovery

    @property
    def nested(self) -> bool:
        return self.second is not None


def plan(count: int) -> list[Step]:
    """The first `count` steps: pass after pass over every point, N changing per pass."""
    steps: list[Step] = []
    passes = 0
    while len(steps) < count:
        hit = HITS[passes % len(HITS)]
        steps.extend(Step(f"{point}:{hit}") for point in WORKLOAD_POINTS)
        for index, point in enumerate(RECOVERY_POINTS):
            partners = [nested for nested in NESTED
                        if point != "recovery.after_delete" or nested.startswith("recovery.")]
            steps.append(Step(f"{point}:1", partners[(index + passes + 1) % len(partners)]))
        passes += 1
    return steps[:count]


def full_pass() -> int:
    """Steps in one pass: every point at least once."""
    return len(WORKLOAD_POINTS) + len(RECOVERY_POINTS)


def run_crashpoints(settings: Settings, *, layout: bool = True) -> Outcome:
    """`settings.cycles` steps of `plan`; with `layout`, `run_layout_crashes` first."""
    rng = random.Random(f"wbcache-torture/crashpoints/{settings.seed}")
    outcome = run_layout_crashes(settings) if layout else Outcome("crashpoints")
    covered: set[str] = set()
    fired = armed = 0
    carried: dict[Any, Any] = {}
    directory = ""
    steps = plan(settings.cycles)
    for cycle, step in enumerate(steps):
        if settings.expired():
            break
        if cycle % settings.cycles_per_dir == 0 or step.nested:
            if directory:
                shutil.rmtree(directory, ignore_errors=True)
            directory = settings.path("crashpoints", f"dir{cycle}")
            carried = {}
        scratch = settings.path("crashpoints", "scratch")
        armed_at = step.first + (f" then {step.second}" if step.nested else "")
        label = f"crash point cycle {cycle} [{armed_at}]"
        if step.nested:
            journals, runs = _nested(settings, rng, directory, scratch, cycle, step)
        else:
            config = WorkerConfig(directory=directory, seed=settings.seed, cycle=cycle,
                                  threads=min(settings.threads, 3), ops_per_thread=400,
                                  options=dict(_WORKLOAD_OPTIONS), close_at_end=True,
                                  async_tasks=2 * (cycle % 2))
            runs = [(step.first, _armed_run(config, scratch, step.first))]
            journals = journals_from(runs[0][1][0].events)
        recovered = recover(directory, copy_to=os.path.join(scratch, "copy"))
        tally = check_after_crash(recovered, carried, seed=settings.seed, cycle=cycle,
                                  journals=journals, label=label)
        for spec, (run, hit) in runs:
            armed += 1
            if hit:
                fired += 1
            elif run.returncode != 0 or run.hung:  # not reached: it must have ended cleanly
                tally.errors += 1
                tally.note(f"{label}: worker armed at {spec} ended with {run.returncode}"
                           f"{' (hung)' if run.hung else ''}: {run.stderr[-2000:]}")
        if tally.violations:
            where = keep_evidence(settings, f"crashpoints-cycle{cycle}", directory)
            tally.note(f"{label}: the crashed directory is kept in {where}")
        elif all(hit for _, (_, hit) in runs):
            covered.update(spec.partition(":")[0] for spec, _ in runs)
        outcome.tally.add(tally)
        carried = recovered.state
        settings.say(f"crash point {cycle + 1}/{len(steps)} {armed_at}: "
                     f"{'fired' if all(hit for _, (_, hit) in runs) else 'NOT reached'}, "
                     f"{tally.acknowledged:,} acknowledged, lost {tally.lost}, "
                     f"violations {tally.violations}")
    if directory:
        shutil.rmtree(directory, ignore_errors=True)
    outcome.rows["crash points covered"] = f"{len(covered)} of {len(POINTS)}"
    outcome.rows["armed runs (fired)"] = f"{armed:,} ({fired:,})"
    outcome.rows["uncovered"] = sorted(set(POINTS) - covered)
    if len(steps) >= full_pass() and covered != set(POINTS) and not settings.expired():
        outcome.failed = True
    return outcome


def run_layout_crashes(settings: Settings) -> Outcome:
    """Kill the first open of a new directory right after it creates each of LAYOUT_DIRS;
    reopening must give an empty, working cache."""
    outcome = Outcome("crashpoints")
    fired = 0
    for name in LAYOUT_DIRS:
        directory = settings.path("crashpoints", f"layout-{name}", "cache")
        shutil.rmtree(os.path.dirname(directory), ignore_errors=True)
        scratch = settings.path("crashpoints", "scratch")
        config = WorkerConfig(directory=directory, seed=settings.seed, cycle=0,
                              kill_after_mkdir=name)
        run = run_worker(config, scratch)
        label = f"layout crash [first open killed after creating DIR/{name}]"
        tally = check_after_crash(recover(directory, copy_to=os.path.join(scratch, "copy")), {},
                                  seed=settings.seed, cycle=0, journals={}, label=label)
        if run.sigkilled and not run.killed:
            fired += 1
        else:
            tally.errors += 1
            tally.note(f"{label}: the worker ended with {run.returncode}: {run.stderr[-2000:]}")
        if tally.violations:
            where = keep_evidence(settings, f"layout-{name}", directory)
            tally.note(f"{label}: the crashed directory is kept in {where}")
        outcome.tally.add(tally)
        settings.say(f"{label}: violations {tally.violations}")
    outcome.rows["layout crashes (harness-injected)"] = f"{fired} of {len(LAYOUT_DIRS)}"
    return outcome


def _armed_run(config: WorkerConfig, scratch: str, spec: str) -> tuple[WorkerRun, bool]:
    """Run a worker armed at `spec` ("point:N"); (the run, whether the point killed it)."""
    trace = os.path.join(scratch, "points.trace")
    if os.path.exists(trace):
        os.unlink(trace)
    run = run_worker(config, scratch,
                     env={"WBCACHE_CRASH_AT": spec, "WBCACHE_CRASH_TRACE": trace})
    point = spec.partition(":")[0]
    try:
        with open(trace, encoding="utf-8") as file:
            reached = file.read().split()
    except FileNotFoundError:  # no point reached at all
        reached = []
    # Only the armed point sends SIGKILL (the harness did not), so a SIGKILL means it fired.
    # The trace cannot say more: other threads may reach other points between its line and
    # the kill, and the library's hit counter is not atomic across threads (two threads can
    # count the same hit), so the trace may hold fewer than N lines of it.
    hit = run.sigkilled and not run.killed and point in reached
    return run, hit


def _nested(settings: Settings, rng: random.Random, directory: str, scratch: str, cycle: int,
            step: Step) -> tuple[dict[int, Any], list[tuple[str, tuple[WorkerRun, bool]]]]:
    """Kill a writer with a log full of unflushed records, then crash two recoveries of it."""
    prep = WorkerConfig(directory=directory, seed=settings.seed, cycle=cycle,
                        threads=settings.threads, options=dict(_LOG_HEAVY_OPTIONS),
                        kill_after_acks=rng.randint(100, 400))
    first = run_worker(prep, scratch)
    journals = journals_from(first.events)
    runs = []
    for spec in (step.first, step.second):
        assert spec is not None
        config = WorkerConfig(directory=directory, seed=settings.seed, cycle=cycle,
                              workload=False, options=dict(_LOG_HEAVY_OPTIONS),
                              async_tasks=rng.choice([0, 1]))  # recover via open_async too
        runs.append((spec, _armed_run(config, scratch, spec)))
    if not first.sigkilled:
        for journal in journals.values():
            journal.errors.append(f"the log-filling worker ended with {first.returncode}: "
                                  f"{first.stderr[-2000:]}")
    return journals, runs

