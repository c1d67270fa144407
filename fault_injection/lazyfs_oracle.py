"""What a power cut on LazyFS may take, given the worker's journal: the acknowledgements that
must survive it, per writer.

Under fsync="always" every acknowledged write must survive. Under fsync="interval" a write is
acknowledged once written, before it is fsync'd, and the guarantee is "power loss may lose at
most the last `fsync_interval` seconds". Two rules, each a floor on what must survive, and the
higher one applies:

  * the sync rule (exact, no margin): every write acknowledged before a fsync of the log
    BEGAN is on disk once it RETURNED. The worker journals both (lazyfs_worker.py), in the
    same ordered journal as the acknowledgements: a write through the mapped segment
    (wal/writer.py) is acknowledged without waiting for a fsync in flight, so one journaled
    while that fsync ran may not be in it. A return with no beginning journaled (the one C
    call, `write_sync`, whose batch no acknowledgement can overtake) covers every
    acknowledgement before it. Likewise every
    write acknowledged before a `cache.sync()` BEGAN, once it returned (SYNCING, SYNCED): the
    library's own promise, which holds even if a bug skipped the system call;
  * the time rule: every write acknowledged more than `fsync_interval` + INTERVAL_MARGIN
    before the cut must survive, whether or not a fsync was journaled: this is what catches a
    syncer that stops or falls behind. The acknowledgement's time is when the parent READ it
    (never earlier than the write's own acknowledgement), and the cut's is when the parent
    decided it, so the rule can only ask for less than the guarantee allows, never more.

INTERVAL_MARGIN covers the syncer's own delays: it sleeps `fsync_interval` after its previous
fsync RETURNED, then waits for the group-commit leader of the moment and the sequencer's lock,
then fsyncs through FUSE; on a shared 2-core machine a thread can also wait this long for the
CPU. The campaign reports the longest acknowledgement-to-fsync wait it saw (the sync rule's
own measure of the same delay), so the margin can be judged against it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from wbcache.fault_injection.journal import ACK, OPEN, SYNC, SYNC_BEGIN, SYNCED, SYNCING
from wbcache.fault_injection.oracle import ThreadJournal, journals_from

INTERVAL_MARGIN = 0.5  # seconds; see the module docstring


@dataclass
class Floor:
    """Per writer, how many of its acknowledged operations must survive; and what the rules
    saw on the way."""

    required: dict[int, int]
    acknowledged: int  # every acknowledgement in the journal
    unsynced: int  # acknowledged but covered by neither rule (fsync="interval": may be lost)
    longest_wait: float  # s, the longest an acknowledgement waited for a journaled fsync


def required_acks(events: Sequence[list[Any]], times: Sequence[float], *, fsync: str,
                  fsync_interval: float, cut_time: float | None) -> Floor:
    """The `Floor` of a worker's journal `events` (read by the parent at `times`; +inf for
    events read after the cut) for a power cut at `cut_time` (None: unknown, the time rule is
    not applied)."""
    journals = journals_from(events)
    acked = {thread: journal.acked for thread, journal in journals.items()}
    total = sum(acked.values())
    if fsync == "always":
        return Floor(dict(acked), total, 0, 0.0)
    deadline = None if cut_time is None else cut_time - fsync_interval - INTERVAL_MARGIN
    so_far: dict[int, int] = {}
    required: dict[int, int] = {}
    log_fds: set[int] = set()
    waiting_since: float | None = None  # when the oldest ack not yet covered by a fsync came
    syncing: dict[int, dict[int, int]] = {}  # a cache.sync() in flight: so_far when it began
    fsyncing: dict[int, dict[int, int]] = {}  # the same, for a fsync of a log descriptor
    longest = 0.0
    for event, at in zip(events, _padded(times, len(events)), strict=True):
        tag = event[0]
        if tag == OPEN:
            fd, path = event[1], event[2]
            if str(path).startswith("wal/"):
                log_fds.add(fd)
            else:
                log_fds.discard(fd)
        elif tag == ACK:
            thread, seq = event[1], event[2]
            so_far[thread] = seq + 1
            if deadline is not None and at <= deadline:
                required[thread] = max(required.get(thread, 0), seq + 1)
            if waiting_since is None:
                waiting_since = at
        elif tag == SYNCING:
            syncing[event[1]] = dict(so_far)
        elif tag == SYNCED:
            for thread, count in syncing.pop(event[1], {}).items():
                required[thread] = max(required.get(thread, 0), count)
        elif tag == SYNC_BEGIN and event[1] in log_fds:
            fsyncing[event[1]] = dict(so_far)
        elif tag == SYNC and event[1] in log_fds:
            for thread, count in fsyncing.pop(event[1], so_far).items():
                required[thread] = max(required.get(thread, 0), count)
            if waiting_since is not None and at != float("inf"):
                longest = max(longest, at - waiting_since)
            waiting_since = None
    required = {thread: min(count, acked.get(thread, 0)) for thread, count in required.items()}
    return Floor(required, total, total - sum(required.values()), longest)


def floor_journals(journals: Mapping[int, ThreadJournal], floor: Floor, *,
                   keep_errors: bool) -> dict[int, ThreadJournal]:
    """The journals the oracle checks: each writer's acknowledgements cut to what must
    survive (the rest count as in flight); its errors kept only if `keep_errors` (a writer
    refused by a file system that crashed on purpose has done nothing wrong)."""
    floored = {}
    for thread, journal in journals.items():
        count = floor.required.get(thread, 0)
        floored[thread] = ThreadJournal(
            started=journal.started, acked=count,
            results={seq: result for seq, result in journal.results.items() if seq < count},
            errors=list(journal.errors) if keep_errors else [])
    return floored


def _padded(times: Sequence[float], count: int) -> list[float]:
    return list(times[:count]) + [float("inf")] * (count - len(times))
