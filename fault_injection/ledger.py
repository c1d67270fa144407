"""The multi-node campaign's oracle: what each node thread was told, against what survived.

A thread's marker is the whole truth about it (counters.py): writes 1..marker are in the
database, no others. So a thread is checked every time its marker is read again, by the
thread itself after a restart (MARKER) and by the harness at the end:

  * lost: an acknowledged write above the marker;
  * phantom: a marker above every write the thread ever started;
  * earlier data changed: a marker below one an earlier recovery had found;
  * unacknowledged, kept: the write in flight at the kill is below the marker (allowed).

At the end, each counter must equal, exactly, the number of writes 1..marker of every thread
that increment it (a write lost or applied twice shows here, whoever made it), and each `v` key
the newest value those writes put (a batch half applied shows here).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from wbcache.fault_injection.counters import (
    expected_counters,
    expected_values,
    marker_key,
)
from wbcache.fault_injection.oracle import Tally, same


@dataclass
class ThreadLedger:
    """One writer thread of one node, across the runs of its node: the marker it last found,
    and the writes it started and had acknowledged since (one at a time, in order)."""

    node: int
    thread: int
    marker: int | None = None  # None: no run of this thread has read its marker yet
    started: int = 0
    acked: int = 0

    @property
    def name(self) -> str:
        return f"node {self.node} thread {self.thread}"

    def start(self, n: int) -> None:
        if self.marker is None or n != self.started + 1 or self.acked != self.started:
            raise ValueError(f"{self.name}: journal out of order: start of write {n} after "
                             f"{self.started} started, {self.acked} acknowledged")
        self.started = n

    def ack(self, n: int) -> None:
        if n != self.started or self.acked != n - 1:
            raise ValueError(f"{self.name}: journal out of order: ack of write {n} after "
                             f"{self.started} started, {self.acked} acknowledged")
        self.acked = n

    def found(self, marker: int, tally: Tally, label: str) -> None:
        """Settle what the thread was told since its last marker against `marker`, read now."""
        previous = self.marker
        if previous is None:  # a fresh table: nothing of this thread can be there yet
            if marker != 0:
                tally.phantom += 1
                tally.note(f"{label}: {self.name} found marker {marker} before it ever wrote")
        else:
            tally.operations += self.started - previous
            tally.acknowledged += self.acked - previous
            lost = max(0, self.acked - max(marker, previous))
            tally.lost += lost
            tally.recovered += self.acked - previous - lost
            if lost:
                tally.note(f"{label}: {self.name}: {lost} acknowledged write(s) lost: its "
                           f"marker is {marker}, write {self.acked} was acknowledged")
            if self.started > self.acked and marker >= self.started:
                tally.inflight_kept += self.started - self.acked
            if marker < previous:
                tally.carried += 1
                tally.note(f"{label}: {self.name}: marker went back from {previous} to {marker}")
            if marker > self.started:
                tally.phantom += 1
                tally.note(f"{label}: {self.name}: marker {marker} but only {self.started} "
                           f"write(s) were ever started")
        self.marker = self.started = self.acked = marker


def check_final(state: Mapping[Any, Any], ledgers: list[ThreadLedger], label: str) -> Tally:
    """Settle every thread against the markers in `state` (every key of the shared table,
    after each node's directory was recovered), then check every counter and value."""
    tally = Tally()
    markers: dict[tuple[int, int], int] = {}
    expected: dict[Any, Any] = {}
    for ledger in ledgers:
        key = marker_key(ledger.node, ledger.thread)
        marker = state.get(key, 0)
        if type(marker) is not int or marker < 0:
            tally.phantom += 1
            tally.note(f"{label}: {ledger.name}: marker {key!r} holds {marker!r}")
            marker = 0
        ledger.found(marker, tally, label)
        markers[(ledger.node, ledger.thread)] = marker
        if marker:
            expected[key] = marker
        expected.update(expected_values(ledger.node, ledger.thread, marker))
    totals = expected_counters(markers)
    _check_counters(tally, state, totals, label)
    for key, value in expected.items():
        if not same(state.get(key), value):
            tally.partial += 1
            tally.note(f"{label}: {key!r} is {state.get(key)!r}, but the markers say the "
                       f"batches applied put {value!r}")
    for key in state:
        if key not in expected and key not in totals:
            tally.phantom += 1
            tally.note(f"{label}: key {key!r} = {state[key]!r} was never written")
    return tally


def _check_counters(tally: Tally, state: Mapping[Any, Any], totals: dict[str, int],
                    label: str) -> None:
    for counter, total in totals.items():
        tally.counters += 1
        value = state.get(counter, 0)
        if not same(value, total):
            tally.counter_mismatches += 1
            tally.note(f"{label}: counter {counter!r} is {value!r}; the markers say exactly "
                       f"{total} increments were applied")

