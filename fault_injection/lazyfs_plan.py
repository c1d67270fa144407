"""What one LazyFS cycle does: its kind, the cache options, when the power goes, and which of
LazyFS's own faults are armed.

Kinds (each ends in a power cut, then a remount and the oracle's check):

    cut          SIGKILL the writing worker on a trigger (below), then clear LazyFS's cache
    db-fsync     LazyFS crashes itself just BEFORE the k-th fsync of LMDB's data.mdb (a
                 `clear-cache` injection with crash=true): a commit cut between writing its
                 pages and making them durable
    log-unlink   LazyFS crashes itself just before, or just after, the first unlink of a log
                 segment (the flusher's, or the open's recovery's if a log is left): after a
                 commit, the log it covers half gone
    torn-op      one write to the log's first segment torn: some of its parts reach the disk,
                 the others not, then LazyFS crashes
    torn-seq     fsync="interval": unsynced pages written back out of order. That mode writes
                 the log through a memory map (wal/writer.py): little reaches the file system
                 between two fsyncs, and each fsync writes the dirty pages back, a run of them
                 in one write. One of those writes is torn in 2 to 4 parts, the last kept, the
                 first not (the others at random), then LazyFS crashes.
                 Both tear the first write to the segment once the worker has had `after_acks`
                 writes acknowledged: the fault is armed then (`LazyfsMount.arm_torn`), not
                 counted from the mount, as the open's own writes (the header, and the zeros
                 that reserve the first window: as many writes as FUSE cuts them into) would
                 otherwise take the count, and the cut would come before any write.
    recovery     a log-heavy writer is cut; then the power goes again DURING the next open's
                 recovery (mid-replay commit, after it, mid-deletion, at data.mdb's fsync)
    recover-cli  the same, during `wbcache recover DIR` (the command line tool)

Triggers of a `cut` (as kill mode's): the Nth acknowledgement, the Nth database commit started
(`flush`) or returned (`commit`), the Nth segment deleted (`unlink`) or created (`rotate`), the
Nth acknowledgement after the first segment deletion (`settled`: both a flush the log no longer
backs and writes only the log holds are then at stake), a random time after the worker is
ready (`clock`), or very early, during start-up or the open (`startup`).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from wbcache.fault_injection.journal import ACK, DB_BEGIN, DB_DONE, OPEN, READY, UNLINK

Decision = Callable[[list[Any], float], bool]  # (journal event, when it was read) -> cut now?

KINDS = ("cut", "db-fsync", "log-unlink", "torn-op", "torn-seq", "recovery", "recover-cli")
# The first cycles run each kind once (so a 10-cycle slice covers all of them), then at random;
# the first two are the sharpest: a cut right after a flush deleted log segments (so a commit
# that was not durable loses data), and a crash right after a segment's unlink.
FIRST = ("cut", "log-unlink", "torn-seq", "db-fsync", "recovery", "torn-op", "recover-cli")
WEIGHTS = (("cut", 40), ("db-fsync", 12), ("log-unlink", 10), ("torn-op", 10),
           ("torn-seq", 10), ("recovery", 9), ("recover-cli", 9))
TRIGGERS = ("acks", "flush", "commit", "unlink", "settled", "rotate", "clock", "startup")
RECOVERY_CUTS = ("begin", "done", "unlink", "db-fsync", "log-unlink", "clock")
RECOVER_CLI_CUTS = ("db-fsync", "log-unlink", "clock")
LOG_HEAVY = {"flush_interval": 1000.0, "flush_threshold": 10_000_000}  # nothing flushed
BIG_SEGMENT = 1 << 20  # torn cycles: the first segment holds every write until the fault


@dataclass
class CyclePlan:
    kind: str
    options: dict[str, Any]  # cache options of the (first) writing worker
    trigger: str = ""  # cut: what kills the worker
    trigger_at: float = 0.0  # its N (acks, events) or seconds (clock, startup)
    async_tasks: int = 0
    db_fsync: int = 0  # db-fsync: crash before fsync number db_fsync + 1 of data.mdb
    unlink_after_ready: bool = False  # log-unlink: arm once the worker is ready
    unlink_timing: str = "before"  # log-unlink: crash "before" or "after" the unlink
    torn_op: dict[str, Any] = field(default_factory=dict)  # after_acks, parts, persist
    torn_seq: dict[str, Any] = field(default_factory=dict)  # after_acks, parts, persist
    acks_before_cut: int = 0  # recovery kinds: the log-heavy writer's acknowledgements
    second_cut: str = ""  # recovery kinds: how the power goes during the recovery
    second_at: float = 0.0  # its seconds (clock) or fsync number (db-fsync)

    def describe(self) -> str:
        if self.kind == "cut":
            return f"cut [{self.trigger}]"
        if self.kind in ("recovery", "recover-cli"):
            return f"{self.kind} [{self.second_cut}]"
        if self.kind == "log-unlink":
            return f"log-unlink [{self.unlink_timing}]"
        return self.kind


def plan_cycle(rng: random.Random, cycle: int) -> CyclePlan:
    kind = FIRST[cycle] if cycle < len(FIRST) else _weighted(rng, WEIGHTS)
    options = busy_options(rng)
    plan = CyclePlan(kind, options, async_tasks=rng.choice([0, 0, 0, 2]))
    if kind == "cut":
        plan.trigger = "settled" if cycle == 0 else rng.choice(TRIGGERS)
        if cycle == 0:
            options["segment_size"] = 4096
        plan.trigger_at = _trigger_at(rng, plan.trigger)
    elif kind == "db-fsync":
        plan.db_fsync = rng.randint(1, 12)  # 2 per commit: data pages, then the meta page
    elif kind == "log-unlink":
        plan.unlink_after_ready = cycle < len(FIRST) or rng.random() < 0.6
        plan.unlink_timing = "after" if cycle < len(FIRST) else rng.choice(("before", "after"))
    elif kind == "torn-op":
        options["segment_size"] = BIG_SEGMENT
        parts = rng.randint(2, 4)
        kept = sorted(rng.sample(range(1, parts + 1), rng.randint(1, parts - 1)))
        plan.torn_op = {"after_acks": rng.randint(1, 60), "parts": parts, "persist": kept}
    elif kind == "torn-seq":
        options.update(fsync="interval", segment_size=BIG_SEGMENT,
                       fsync_interval=rng.choice([0.005, 0.02, 0.05]))
        parts = rng.randint(2, 4)
        middle = rng.sample(range(2, parts), rng.randint(0, parts - 2))
        # After the open's writes, one write (or a few) per fsync: the next write-back
        plan.torn_seq = {"after_acks": rng.randint(1, 300), "parts": parts,
                         "persist": sorted({*middle, parts})}
    else:  # recovery, recover-cli: a long log first
        options.update(LOG_HEAVY, segment_size=rng.choice([4096, 8192]))
        plan.acks_before_cut = rng.randint(300, 3000)
        plan.second_cut = rng.choice(RECOVERY_CUTS if kind == "recovery" else RECOVER_CLI_CUTS)
        plan.unlink_timing = rng.choice(("before", "after"))  # for second_cut "log-unlink"
        if plan.second_cut == "clock":
            # From the start of the process: an interpreter starts in about 0.2 s, and the
            # recovery of a few thousand records takes tens of milliseconds more.
            plan.second_at = rng.uniform(0.15, 0.5)
        elif plan.second_cut == "db-fsync":
            plan.second_at = rng.randint(1, 2)  # the replay commit's data or meta fsync
    return plan


def busy_options(rng: random.Random) -> dict[str, Any]:
    """Options that keep flushes and segment deletions in flight: small segments, short
    flush intervals; both fsync modes."""
    return {
        "fsync": "always" if rng.random() < 0.65 else "interval",
        "fsync_interval": rng.choice([0.005, 0.02, 0.05]),
        "segment_size": rng.choice([4096, 8192, 16384]),
        "flush_interval": rng.choice([0.005, 0.02, 0.05]),
        "flush_threshold": rng.choice([20, 200, 2000]),
    }


def _trigger_at(rng: random.Random, trigger: str) -> float:
    if trigger == "acks":
        return rng.randint(1, 3000)
    if trigger in ("flush", "commit"):
        return rng.randint(1, 6)
    if trigger == "unlink":
        return rng.randint(1, 4)
    if trigger == "settled":
        return rng.randint(20, 200)
    if trigger == "rotate":
        return rng.randint(1, 5)
    if trigger == "clock":
        return rng.uniform(0.05, 1.5)
    return rng.uniform(0.0, 0.5)  # startup: from the worker's start, often inside the open


def _weighted(rng: random.Random, weights: tuple[tuple[str, int], ...]) -> str:
    roll = rng.randrange(sum(weight for _, weight in weights))
    for name, weight in weights:
        if roll < weight:
            return name
        roll -= weight
    raise AssertionError("unreachable")


def counting(tag: str, n: float, *, after_ready: bool = True) -> Decision:
    """Decide at the `n`th event tagged `tag` (those after READY only, if `after_ready`;
    OPEN counts only files the open created)."""
    seen = 0
    ready = not after_ready

    def decide(event: list[Any], _now: float) -> bool:
        nonlocal seen, ready
        if event[0] == READY:
            ready = True
        elif ready and event[0] == tag and (tag != OPEN or event[3]):
            seen += 1
        return seen >= n

    return decide


def acks_after_unlink(n: float) -> Decision:
    """Decide at the `n`th acknowledgement after the first segment deletion of a flush (not
    of the open's recovery, which deletes the log it replayed before READY)."""
    seen = 0
    ready = deleted = False

    def decide(event: list[Any], _now: float) -> bool:
        nonlocal seen, ready, deleted
        if event[0] == READY:
            ready = True
        elif ready and event[0] == UNLINK:
            deleted = True
        elif deleted and event[0] == ACK:
            seen += 1
        return seen >= n

    return decide


def after_ready(seconds: float) -> Decision:
    started: float | None = None

    def decide(event: list[Any], now: float) -> bool:
        nonlocal started
        if event[0] == READY:
            started = now
        return started is not None and now - started >= seconds

    return decide


def never(_event: list[Any], _now: float) -> bool:
    return False


DECISIONS: dict[str, Callable[[float], Decision]] = {
    "acks": lambda n: counting(ACK, n, after_ready=False),
    "flush": lambda n: counting(DB_BEGIN, n),
    "commit": lambda n: counting(DB_DONE, n),
    "unlink": lambda n: counting(UNLINK, n),
    "settled": acks_after_unlink,
    "rotate": lambda n: counting(OPEN, n),
    "clock": after_ready,
}
