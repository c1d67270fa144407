"""Random SIGKILL torture: kill a writing worker at random moments, reopen, check.

Each cycle starts a worker on the directory the previous cycle's kill left (so the worker's
own open is a recovery, and a kill can land inside it), and kills it on one trigger:

    acks      after a random number of acknowledgements
    flush     when a flush starts its database commit (the worker journals it)
    commit    when a commit has returned: the log's truncation is running
    rotate    when a new segment file has been opened
    clock     after a random time
    startup   very early: during start-up, the open or the recovery
    apply     from inside the worker, part-way through its Nth database apply (a crash
              inside the database's own commit, which a kill from outside reaches by luck)
    fork      the worker forks children while its threads write (forks.py); each must be
              refused every use of the cache it inherited and change nothing; SIGKILL after
              the Nth child reported

The worker's options vary per cycle (fsync mode, segment size, flush interval and threshold,
asyncio writers through `AsyncCache` beside the threads or not), so flushes, rotations and
truncations happen at different moments. A cycle is checked on a
copy of the crashed directory; the directory itself goes on to the next worker.
"""

from __future__ import annotations

import os
import random
import shutil
from collections.abc import Callable
from typing import Any

from wbcache.fault_injection.campaign import Outcome, Settings, check_after_crash, keep_evidence
from wbcache.fault_injection.journal import ACK, DB_BEGIN, DB_DONE, FORK, OPEN
from wbcache.fault_injection.oracle import journals_from
from wbcache.fault_injection.runner import prepare_directory, recover, run_worker
from wbcache.fault_injection.worker import WorkerConfig

TRIGGERS = ("acks", "flush", "commit", "rotate", "clock", "startup", "apply", "fork")
_EVENT_TRIGGER_FALLBACK = 5.0  # seconds: kill anyway if the awaited event never comes
FORKS = 3  # children a worker forks in a fork cycle


def nth_event(tag: str, n: int, *, created_only: bool = False) -> Callable[[list[Any]], bool]:
    """A kill decision: true from the `n`th journal event tagged `tag` on (with
    `created_only`, counting only OPEN events of files the open created)."""
    seen = 0

    def decide(event: list[Any]) -> bool:
        nonlocal seen
        if event[0] == tag and (not created_only or event[3]):
            seen += 1
        return seen >= n

    return decide


def random_options(rng: random.Random) -> dict[str, Any]:
    """Cache options for one worker run, varied so flushes, rotations and truncations land
    at different moments of different runs."""
    return {
        "fsync": "always" if rng.random() < 0.75 else "interval",
        "fsync_interval": rng.choice([0.005, 0.05]),
        "segment_size": rng.choice([4096, 8192, 65536]),
        "flush_interval": rng.choice([0.005, 0.02, 0.1, 1.0]),
        "flush_threshold": rng.choice([20, 200, 10_000]),
    }


def run_kills(settings: Settings) -> Outcome:
    """`settings.cycles` kill cycles (fewer if `settings.seconds` runs out)."""
    rng = random.Random(f"wbcache-torture/kill/{settings.seed}")
    outcome = Outcome("kill")
    triggers = dict.fromkeys(TRIGGERS, 0)
    carried: dict[Any, Any] = {}
    directory = ""
    asynchronous = children = before_any_ack = 0
    modes = {"always": 0, "interval": 0}
    for cycle in range(settings.cycles):
        if settings.expired():
            break
        if cycle % settings.cycles_per_dir == 0:
            if directory:
                shutil.rmtree(directory, ignore_errors=True)
            directory = settings.path("kill", f"dir{cycle // settings.cycles_per_dir}")
            carried = {}
        trigger = TRIGGERS[cycle % len(TRIGGERS)] if cycle < len(TRIGGERS) else rng.choice(TRIGGERS)
        triggers[trigger] += 1
        record = "light" if trigger in ("flush", "commit", "rotate") else "none"
        async_tasks = rng.choice([0, 0, 2, 4])  # asyncio writers beside the threads
        asynchronous += bool(async_tasks)
        options = settings.options(random_options(rng))
        modes[options["fsync"]] += 1
        config = WorkerConfig(directory=directory, seed=settings.seed, cycle=cycle,
                              threads=settings.threads, options=options,
                              record=record, async_tasks=async_tasks,
                              forks=FORKS if trigger == "fork" else 0,
                              kill_in_apply=rng.randint(1, 4) if trigger == "apply" else None)
        if config.wraps_backend and not os.path.isdir(os.path.join(directory, "wal")):
            prepare_directory(directory)  # a wrapped backend needs the layout to exist
        kill_on, after = _trigger(rng, trigger)
        scratch = settings.path("kill", "scratch")
        run = run_worker(config, scratch, kill_on=kill_on, kill_after_seconds=after)
        label = f"kill cycle {cycle} [{trigger}]"
        journals = journals_from(run.events)
        recovered = recover(directory, copy_to=os.path.join(scratch, "copy"))
        tally = check_after_crash(recovered, carried, seed=settings.seed, cycle=cycle,
                                  journals=journals, label=label, events=run.events)
        children += tally.forked
        before_any_ack += tally.acknowledged == 0
        if not run.sigkilled:
            tally.errors += 1
            tally.note(f"{label}: the worker was not killed but exited with {run.returncode}"
                       f"{' (hung)' if run.hung else ''}: {run.stderr[-2000:]}")
        if tally.violations:
            where = keep_evidence(settings, f"kill-cycle{cycle}", directory)
            tally.note(f"{label}: the crashed directory is kept in {where}")
        outcome.tally.add(tally)
        carried = recovered.state
        settings.say(f"kill {cycle + 1}/{settings.cycles} [{trigger}]: "
                     f"{tally.acknowledged:,} acknowledged, {tally.recovered:,} recovered, "
                     f"lost {tally.lost}, holes {tally.holes}, violations {tally.violations}")
    if directory:
        shutil.rmtree(directory, ignore_errors=True)
    outcome.rows["kill triggers"] = ", ".join(f"{name} {count}" for name, count in triggers.items())
    outcome.rows["  cycles with asyncio writers too"] = asynchronous
    outcome.rows["  cycles by fsync mode"] = ", ".join(f"{name} {count}"
                                                       for name, count in modes.items())
    outcome.rows["  forked children checked"] = children
    # Killed in start-up or recovery before any write was acknowledged: such a cycle checks
    # only what the earlier cycles left (carried), not writes of its own.
    outcome.rows["  cycles killed before any acknowledgement"] = before_any_ack
    return outcome


def _trigger(rng: random.Random, trigger: str
             ) -> tuple[Callable[[list[Any]], bool] | None, float | None]:
    """(decide on each journal event, seconds after which to kill anyway)."""
    if trigger == "acks":
        return nth_event(ACK, rng.randint(1, 1500)), _EVENT_TRIGGER_FALLBACK
    if trigger == "flush":
        return nth_event(DB_BEGIN, rng.randint(1, 4)), _EVENT_TRIGGER_FALLBACK
    if trigger == "commit":
        return nth_event(DB_DONE, rng.randint(1, 4)), _EVENT_TRIGGER_FALLBACK
    if trigger == "rotate":  # the first segment is the one every open creates
        return nth_event(OPEN, rng.randint(2, 6), created_only=True), _EVENT_TRIGGER_FALLBACK
    if trigger == "fork":
        return nth_event(FORK, rng.randint(1, FORKS)), _EVENT_TRIGGER_FALLBACK
    if trigger == "clock":
        return None, rng.uniform(0.1, 0.6)
    if trigger == "apply":  # the worker kills itself; the clock only if it never applies
        return None, 2 * _EVENT_TRIGGER_FALLBACK
    return None, rng.uniform(0.0, 0.2)
