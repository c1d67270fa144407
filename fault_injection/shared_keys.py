"""The shared-key workload of the interleave campaign: many writers, few keys, kept cold.

The per-thread workload (workload.py) gives each thread keys of its own, written once per
cycle, which never leave memory: it cannot see a race between two writers of one key, nor a
read from the database that a write overtakes. This one is built for exactly that. Every
writer (thread or asyncio task) of a worker, and every worker process that runs on the same
directory after it, works on the same few keys:

    ctr:<i>       a counter (i < COUNTERS): `incr` by +1 (returns the new value), `get`
    reg:<i>       a register (i < REGISTERS // 2, str key): `put`, `get`
    b"reg:<i>"    a register with a bytes key (i >= REGISTERS // 2): a distinct key

A register is written only with values nobody else ever writes (`register_value`:
"c<cycle>.w<writer>.s<seq>." plus padding), so a value read or recovered names the write that
made it. `put_many` writes two or three registers in one atomic record. The campaign keeps
the keys cold (a small `capacity`, the cache closed and reopened between rounds and after
every kill, database reads slowed down), so increments and reads race flushes and evictions
of the same key.

Every operation is derived from (seed, cycle, writer, seq) alone, as in workload.py: the
harness regenerates what a writer did from its journal's START and ACK events.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Any

import wbcache

Key = Any  # str | bytes

COUNTERS = 6
REGISTERS = 8
# Operation kinds and how often a writer picks each (percent).
KINDS = (("incr", 45), ("put", 18), ("put_many", 10), ("get_counter", 13), ("get_register", 14))
_VALUE = re.compile(r"c(\d+)\.w(\d+)\.s(\d+)\.")
_PAD = 60  # at most this many bytes of padding after a register value's name


def counter_key(index: int) -> str:
    return f"ctr:{index}"


def register_key(index: int) -> Key:
    text = f"reg:{index}"
    return text.encode() if index >= REGISTERS // 2 else text


COUNTER_KEYS: tuple[str, ...] = tuple(counter_key(i) for i in range(COUNTERS))
REGISTER_KEYS: tuple[Key, ...] = tuple(register_key(i) for i in range(REGISTERS))
SHARED_KEYS = frozenset(COUNTER_KEYS) | frozenset(REGISTER_KEYS)


def register_value(cycle: int, writer: int, seq: int, pad: int, item: int = 0) -> str:
    """The value that write `seq` of `writer` in `cycle` puts (`item`: its place in a
    put_many), unique to that write."""
    return f"c{cycle}.w{writer}.s{seq}.{item}." + "x" * pad


def write_of(value: Any) -> tuple[int, int, int] | None:
    """(cycle, writer, seq) of the write a register value came from; None if no write of this
    workload can have made it."""
    if type(value) is not str:
        return None
    match = _VALUE.match(value)
    if match is None:
        return None
    return int(match.group(1)), int(match.group(2)), int(match.group(3))


@dataclass(frozen=True)
class SharedOp:
    """One operation of one writer. `puts` holds the (key, value) pairs a put or put_many
    writes; `key` is the key an incr or get touches."""

    writer: int
    seq: int
    kind: str
    key: Key = None
    puts: tuple[tuple[Key, str], ...] = ()

    @property
    def writes(self) -> bool:
        return self.kind in ("incr", "put", "put_many")


class SharedWorkload:
    """The operations of writer `writer` in worker cycle `cycle`, in order."""

    def __init__(self, seed: int, cycle: int, writer: int) -> None:
        # A str seed is hashed with SHA-512: the same in every process.
        self._rng = random.Random(f"wbcache-torture/shared/{seed}/{cycle}/{writer}")
        self._cycle = cycle
        self._writer = writer
        self._seq = 0

    def next(self) -> SharedOp:
        rng, seq = self._rng, self._seq
        self._seq += 1
        kind = _pick(rng)
        if kind == "incr" or kind == "get_counter":
            return SharedOp(self._writer, seq, kind, key=COUNTER_KEYS[rng.randrange(COUNTERS)])
        if kind == "get_register":
            return SharedOp(self._writer, seq, kind, key=REGISTER_KEYS[rng.randrange(REGISTERS)])
        count = 1 if kind == "put" else rng.randint(2, 3)
        keys = rng.sample(REGISTER_KEYS, count)
        return SharedOp(self._writer, seq, kind, puts=tuple(
            (key, register_value(self._cycle, self._writer, seq, rng.randrange(_PAD), item))
            for item, key in enumerate(keys)))

    def take(self, count: int) -> list[SharedOp]:
        return [self.next() for _ in range(count)]


def generate(seed: int, cycle: int, writer: int, count: int) -> list[SharedOp]:
    """The first `count` operations of a writer."""
    return SharedWorkload(seed, cycle, writer).take(count)


def _pick(rng: random.Random) -> str:
    roll = rng.randrange(100)
    for kind, weight in KINDS:
        if roll < weight:
            return kind
        roll -= weight
    raise AssertionError("weights add up to 100")


def execute(cache: wbcache.Cache, op: SharedOp) -> Any:
    """Perform `op`; return what the call returned: the counter's new value (incr), the LSN
    (put, put_many), the value read (None: absent)."""
    if op.kind == "incr":
        return cache.incr(op.key)
    if op.kind == "put":
        key, value = op.puts[0]
        return cache.put(key, value)
    if op.kind == "put_many":
        return cache.put_many(list(op.puts))
    return cache.get(op.key)


async def execute_async(cache: wbcache.AsyncCache, op: SharedOp) -> Any:
    """`execute` through the asyncio API."""
    if op.kind == "incr":
        return await cache.incr(op.key)
    if op.kind == "put":
        key, value = op.puts[0]
        return await cache.put(key, value)
    if op.kind == "put_many":
        return await cache.put_many(list(op.puts))
    return await cache.get(op.key)
