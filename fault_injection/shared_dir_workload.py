"""The workload of the shared-directory campaign (shared_dir.py): what a write is, and the
register check.

A write is the multi-node one (counters.py: incr one of 100 shared counters, put the thread's
marker, every 4th write a value of the thread's own) plus, every REGISTER_EVERY-th write, a put
of one of a few registers that every writer of every process overwrites:

    reg:<i> = "<node>.<thread>.<n>"      (i = register_of(node, thread, n))

all in ONE batch, so the marker says exactly which of a thread's writes the database holds.
A writer is a (node, thread) pair; a node is one process run (or one child it forked), never
reused: a restarted process writes under a new node number, so no run ever has to read what an
earlier one left to know where to go on.

Registers are last-flush-wins across processes, so their final value is not one fixed write;
but a lane's log is replayed (by its owner or an adopter) in order, so a writer's later put
always lands after its earlier ones. The final value of a register must therefore be the LAST
surviving put of some writer to it, and a register some surviving write put must be present.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from wbcache.fault_injection.counters import write as counter_write
from wbcache.fault_injection.oracle import Tally

REGISTERS = 8
REGISTER_EVERY = 3
_REGISTER_PREFIX = "reg:"


def register_of(node: int, thread: int, n: int) -> str | None:
    """The register write `n` of (node, thread) puts, if any."""
    if n % REGISTER_EVERY:
        return None
    return f"{_REGISTER_PREFIX}{(node * 13 + thread * 5 + n // REGISTER_EVERY) % REGISTERS}"


def register_value(node: int, thread: int, n: int) -> str:
    return f"{node}.{thread}.{n}"


def is_register(key: Any) -> bool:
    return type(key) is str and key.startswith(_REGISTER_PREFIX)


def write(batch: Any, node: int, thread: int, n: int) -> None:
    """Write `n` of (node, thread) into `batch` (a `wbcache.Batch`)."""
    counter_write(batch, node, thread, n)
    register = register_of(node, thread, n)
    if register is not None:
        batch.put(register, register_value(node, thread, n))


def _parse(value: Any) -> tuple[int, int, int] | None:
    if type(value) is not str:
        return None
    parts = value.split(".")
    if len(parts) != 3 or not all(part.isdigit() for part in parts):
        return None
    node, thread, n = (int(part) for part in parts)
    return node, thread, n


def check_registers(state: Mapping[Any, Any], markers: Mapping[tuple[int, int], int],
                    label: str) -> Tally:
    """Every register of `state` against the writes the markers say survived."""
    tally = Tally()
    last: dict[str, dict[tuple[int, int], int]] = {}  # register -> writer -> its last n
    for writer, marker in markers.items():
        for n in range(REGISTER_EVERY, marker + 1, REGISTER_EVERY):
            register = register_of(*writer, n)
            assert register is not None
            last.setdefault(register, {})[writer] = n
    for key in sorted({key for key in state if is_register(key)} | set(last)):
        value, finals = state.get(key), last.get(key, {})
        write_ = _parse(value)
        if value is None:
            tally.lost += 1
            tally.note(f"{label}: register {key!r} is absent, yet {len(finals)} writer(s) "
                       f"put it in writes the markers say survived")
        elif write_ is None or register_of(*write_) != key:
            tally.phantom += 1
            tally.note(f"{label}: register {key!r} holds {value!r}, which no write put there")
        elif write_[2] > markers.get(write_[:2], 0):
            tally.partial += 1
            tally.note(f"{label}: register {key!r} holds {value!r}, from a write whose marker "
                       f"did not survive ({markers.get(write_[:2], 0)}): a batch half applied")
        elif finals.get(write_[:2]) != write_[2]:
            tally.inconsistent += 1
            tally.note(f"{label}: register {key!r} holds {value!r}, which its writer had "
                       f"overwritten with write {finals.get(write_[:2])}")
    return tally
