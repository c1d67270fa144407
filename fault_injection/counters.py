"""The shared-counter workload of the multi-node campaign (nodes.py): keys, and what a write is.

Every write is ONE batch, so it is all or nothing, and recovery keeps a prefix of the log:

    write n of thread t on node i = incr c<counter_of(i, t, n)>       (one of 100 counters
                                                                        that every node shares)
                                    put  seq:<i>:<t> = n                (the thread's marker)
                                    and, when n % PUT_EVERY == 0,
                                    put  v:<i>:<t>:<n % SLOTS> = {"n": n, ...}

So the marker says exactly which of the thread's writes the database holds: 1..n, no more, no
fewer. A thread that starts reads its marker and goes on from n + 1. From the markers alone the
checker computes what every counter must hold and what every `v` key must be.
"""

from __future__ import annotations

from typing import Any

COUNTERS = 100  # counters shared by every node and thread
PUT_EVERY = 4  # every 4th write also puts a value
SLOTS = 16  # v keys per thread: later puts overwrite earlier ones (coalesced)
_PAD = "x" * 40


def counter_of(node: int, thread: int, n: int) -> str:
    """The counter that write `n` of `thread` on `node` increments."""
    return f"c{(node * 31 + thread * 7 + n) % COUNTERS}"


def marker_key(node: int, thread: int) -> str:
    return f"seq:{node}:{thread}"


def value_key(node: int, thread: int, n: int) -> str:
    return f"v:{node}:{thread}:{n % SLOTS}"


def value_of(n: int) -> dict[str, Any]:
    return {"n": n, "pad": _PAD}


def write(batch: Any, node: int, thread: int, n: int) -> None:
    """Write `n` of (node, thread) into `batch` (a `wbcache.Batch`)."""
    batch.incr(counter_of(node, thread, n))
    batch.put(marker_key(node, thread), n)
    if n % PUT_EVERY == 0:
        batch.put(value_key(node, thread, n), value_of(n))


def expected_values(node: int, thread: int, marker: int) -> dict[str, dict[str, Any]]:
    """The `v` keys of (node, thread) once its writes 1..marker are applied: per slot, the
    newest put."""
    newest: dict[str, int] = {}
    for n in range(PUT_EVERY, marker + 1, PUT_EVERY):
        newest[value_key(node, thread, n)] = n
    return {key: value_of(n) for key, n in newest.items()}


def expected_counters(markers: dict[tuple[int, int], int]) -> dict[str, int]:
    """Every counter's total once each (node, thread) has its writes 1..marker applied."""
    totals = dict.fromkeys((f"c{i}" for i in range(COUNTERS)), 0)
    for (node, thread), marker in markers.items():
        for n in range(1, marker + 1):
            totals[counter_of(node, thread, n)] += 1
    return totals
