"""The torture workload: the operations every writer thread of a worker performs.

Each operation is derived from (seed, cycle, thread, seq) alone, so the parent regenerates
exactly what the worker did from the journal's start and ack events; the worker never has to
send keys or values. The keys are laid out so the oracle can check the guarantee per thread:

    c<cycle>.t<thread>.k<seq>       written by operation <seq> alone (a put); a later operation
                                    of the same thread may delete it
    c<cycle>.t<thread>.k<seq>.<i>   written by batch or put_many <seq> alone and never deleted:
                                    the batch's witnesses, all present or all absent
    c<cycle>.t<thread>.n            the thread's own counter (incr, and inside batches)
    c<cycle>.shared                 one counter that every thread increments

A key is a str or, for about one key in five, the same text as bytes (wbcache keeps the two
key spaces apart). Every value is written once, under a key nobody else writes, so a recovered
value that differs from it is a value that was never written.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any

import wbcache

Key = Any  # str | bytes


class _Deleted:
    """In an operation's effects: the key is deleted."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "<deleted>"


DELETED: Any = _Deleted()

# Operation kinds and how often a thread picks each (percent; a delete needs a live key).
KINDS = (("put", 38), ("big_put", 5), ("delete", 12), ("incr", 15), ("incr_shared", 5),
         ("put_many", 12), ("batch", 13))
_BIG_VALUE = (1_000, 6_000)  # bytes: a big put crosses 4 KiB segment boundaries


@dataclass(frozen=True)
class Op:
    """One operation of one thread, with the effects the oracle expects of it."""

    thread: int
    seq: int
    kind: str
    puts: tuple[tuple[Key, Any], ...] = ()  # in call order
    delete: Key | None = None  # key deleted (by a delete, or inside a batch)
    delta: int = 0  # added to the thread's counter (incr, or inside a batch)
    as_mapping: bool = False  # put_many gets a dict (else a list of pairs)
    counter_key: str = ""
    shared_key: str = ""
    counter_after: int | None = None  # the thread's counter after this op, if it changes it
    # Final (key, value | DELETED) effects on the thread's own keys, one per key.
    writes: tuple[tuple[Key, Any], ...] = ()
    witnesses: tuple[Key, ...] = ()  # keys only this op writes and nothing deletes

    @property
    def shared_delta(self) -> int:
        return 1 if self.kind == "incr_shared" else 0

    @property
    def returns_lsn(self) -> bool:
        return self.kind not in ("incr", "incr_shared")


def cycle_prefix(cycle: int) -> str:
    return f"c{cycle}."


def thread_prefix(cycle: int, thread: int) -> str:
    return f"c{cycle}.t{thread}."


def shared_key(cycle: int) -> str:
    return f"c{cycle}.shared"


_OWNER = re.compile(r"c(\d+)\.(?:t(\d+)\.|shared$)")


def owner(key: Key) -> tuple[int, int | None] | None:
    """(cycle, thread) of a workload key; thread None for the shared counter; None if foreign."""
    text = key.decode("ascii", "replace") if type(key) is bytes else key
    match = _OWNER.match(text)
    if match is None:
        return None
    return int(match.group(1)), (int(match.group(2)) if match.group(2) is not None else None)


class ThreadWorkload:
    """The operations of writer `thread` in worker cycle `cycle`, in order."""

    def __init__(self, seed: int, cycle: int, thread: int) -> None:
        # A str seed is hashed with SHA-512: the same in every process, whatever PYTHONHASHSEED.
        self._rng = random.Random(f"wbcache-torture/{seed}/{cycle}/{thread}")
        self._thread = thread
        self._prefix = thread_prefix(cycle, thread)
        self._counter_key = self._prefix + "n"
        self._shared_key = shared_key(cycle)
        self._live: list[Key] = []  # keys of puts not yet deleted
        self._counter = 0
        self._seq = 0

    def __iter__(self) -> Iterator[Op]:
        while True:
            yield self.next()

    def take(self, count: int) -> list[Op]:
        return [self.next() for _ in range(count)]

    def next(self) -> Op:
        rng, seq = self._rng, self._seq
        self._seq += 1
        kind = self._pick_kind()
        make = partial(Op, self._thread, seq, kind, counter_key=self._counter_key,
                       shared_key=self._shared_key)
        if kind in ("put", "big_put"):
            key = self._key(f"k{seq}")
            value = _value(rng, seq, 0, big=kind == "big_put")
            self._live.append(key)
            return make(puts=((key, value),), writes=((key, value),))
        if kind == "delete":
            key = self._take_live()
            return make(delete=key, writes=((key, DELETED),))
        if kind == "incr":
            delta = rng.randint(1, 1000)
            self._counter += delta
            return make(delta=delta, counter_after=self._counter,
                      writes=((self._counter_key, self._counter),))
        if kind == "incr_shared":
            return make()
        puts = tuple((self._key(f"k{seq}.{i}"), _value(rng, seq, i, big=False))
                     for i in range(rng.randint(2, 6)))
        writes: dict[Key, Any] = dict(puts)
        if kind == "put_many":
            return make(puts=puts, as_mapping=rng.random() < 0.5,
                      writes=tuple(writes.items()), witnesses=tuple(writes))
        delete = self._take_live() if self._live and rng.random() < 0.5 else None
        if delete is not None:
            writes[delete] = DELETED
        delta, counter_after = 0, None
        if rng.random() < 0.6:
            delta = rng.randint(1, 1000)
            self._counter += delta
            counter_after = self._counter
            writes[self._counter_key] = counter_after
        return make(puts=puts, delete=delete, delta=delta, counter_after=counter_after,
                  writes=tuple(writes.items()), witnesses=tuple(key for key, _ in puts))

    def _pick_kind(self) -> str:
        roll = self._rng.randrange(100)
        for kind, weight in KINDS:
            if roll < weight:
                return "put" if kind == "delete" and not self._live else kind
            roll -= weight
        raise AssertionError("weights add up to 100")

    def _key(self, name: str) -> Key:
        text = self._prefix + name
        return text.encode() if self._rng.random() < 0.2 else text

    def _take_live(self) -> Key:
        index = self._rng.randrange(len(self._live))
        self._live[index], self._live[-1] = self._live[-1], self._live[index]
        return self._live.pop()


def generate(seed: int, cycle: int, thread: int, count: int) -> list[Op]:
    """The first `count` operations of a thread (what a worker with these numbers did)."""
    return ThreadWorkload(seed, cycle, thread).take(count)


def _value(rng: random.Random, seq: int, item: int, *, big: bool) -> Any:
    if big:
        size = rng.randint(*_BIG_VALUE)
        return rng.randbytes(size) if rng.random() < 0.5 else f"{seq}." + "b" * size
    pad = "x" * rng.randint(0, 80)
    kind = rng.randrange(8)
    if kind == 0:
        return rng.randrange(-(1 << 63), 1 << 63)
    if kind == 1:
        return None
    if kind == 2:
        return rng.random() < 0.5
    if kind == 3:
        return f"v{seq}.{item}{pad}"
    if kind == 4:
        return rng.randbytes(rng.randint(0, 80))
    if kind == 5:
        return [seq, item, pad]
    if kind == 6:
        return {"seq": seq, "item": item, "pad": pad}
    return seq + item / 8


def execute(cache: wbcache.Cache, op: Op) -> Any:
    """Perform `op` on `cache`; return what the call returned (an LSN or a counter value)."""
    kind = op.kind
    if kind in ("put", "big_put"):
        key, value = op.puts[0]
        return cache.put(key, value)
    if kind == "delete":
        assert op.delete is not None
        return cache.delete(op.delete)
    if kind == "incr":
        return cache.incr(op.counter_key, op.delta)
    if kind == "incr_shared":
        return cache.incr(op.shared_key, 1)
    if kind == "put_many":
        return cache.put_many(dict(op.puts) if op.as_mapping else list(op.puts))
    with cache.batch() as batch:
        for key, value in op.puts:
            batch.put(key, value)
        if op.delete is not None:
            batch.delete(op.delete)
        if op.delta:
            batch.incr(op.counter_key, op.delta)
    return batch.lsn


def state_after(ops: list[Op], count: int) -> dict[Key, Any]:
    """Every key and value after the first `count` operations of one thread on an empty cache
    (its shared-counter increments included)."""
    state: dict[Key, Any] = {}
    shared = 0
    for op in ops[:count]:
        for key, value in op.writes:
            if value is DELETED:
                state.pop(key, None)
            else:
                state[key] = value
        shared += op.shared_delta
    if shared:
        state[ops[0].shared_key] = shared
    return state


async def execute_async(cache: wbcache.AsyncCache, op: Op) -> Any:
    """`execute` through the asyncio API."""
    kind = op.kind
    if kind in ("put", "big_put"):
        key, value = op.puts[0]
        return await cache.put(key, value)
    if kind == "delete":
        assert op.delete is not None
        return await cache.delete(op.delete)
    if kind == "incr":
        return await cache.incr(op.counter_key, op.delta)
    if kind == "incr_shared":
        return await cache.incr(op.shared_key, 1)
    if kind == "put_many":
        return await cache.put_many(dict(op.puts) if op.as_mapping else list(op.puts))
    async with cache.batch() as batch:
        for key, value in op.puts:
            batch.put(key, value)
        if op.delete is not None:
            batch.delete(op.delete)
        if op.delta:
            batch.incr(op.counter_key, op.delta)
    return batch.lsn
