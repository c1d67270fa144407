"""Hit ratio of wbcache's eviction policy against exact LRU, on the same request traces.

Two traces, seeded (the same in every run):
  zipf  `eviction_requests` reads of `eviction_keys` keys whose popularity follows
        Zipf(`zipf_exponent`): the i-th most popular key is read with probability
        proportional to 1 / i ** exponent
  scan  the same kind of Zipf reads, interrupted after every `scan_every` of them by a scan:
        `scan_length` keys read once each and never again (a report, a backup, a crawler)

  lru_{trace}    the baseline: exact LRU, simulated with an OrderedDict of `eviction_capacity`
                 entries (a hit moves the key to the end, a miss inserts it and drops the
                 oldest beyond capacity)
  clock_{trace}  wbcache itself: a real `Cache` of that capacity, read with `get`, over a
                 backend that knows every key (a dict lookup: nothing on disk, so a miss costs
                 only wbcache's own miss path). Hits and misses come from `cache.stats()`, so
                 what decides is the real code: the hit path's note of the hit, and the miss
                 path's read, keep-as-clean and CLOCK eviction (wbcache/memory.py)

Both sides start empty and see every request; the ratio is wbcache's hit ratio over LRU's. A
hit ratio depends only on the trace, not on the machine, so each row runs once.
"""

from __future__ import annotations

import bisect
import itertools
import random
from collections import OrderedDict
from collections.abc import Callable, Collection, Iterator, Sequence
from typing import Any

import msgpack

import wbcache
from bench.config import BenchConfig
from bench.measurement import Measurement, Sample
from bench.workload import Scratch
from wbcache import CheckpointTokens

SECTION_BASE = "baselines"
SECTION = "wbcache"
SEED = 20_240_531
TRACES = ("zipf", "scan")


def measurements(config: BenchConfig, scratch: Scratch,
                 sections: tuple[str, ...]) -> list[Measurement]:
    traces = Traces(config)
    size = (f"{config.eviction_requests:,} reads of {config.eviction_keys:,} keys, capacity "
            f"{config.eviction_capacity:,}")
    titles = {"zipf": f"Zipf({config.zipf_exponent:g}), {size}",
              "scan": f"Zipf + one-time scans of {config.scan_length:,} keys, {size}"}
    rows = []
    for name in TRACES:
        if "baselines" in sections:
            rows.append(Measurement(
                f"lru_{name}", SECTION_BASE, f"hit ratio, exact LRU (OrderedDict): {titles[name]}",
                _lru_trial(traces, name, config.eviction_capacity), unit="fraction", once=True))
        if "wbcache" in sections:
            rows.append(Measurement(
                f"clock_{name}", SECTION, f"hit ratio, wbcache (CLOCK): {titles[name]}",
                _clock_trial(traces, name, config.eviction_capacity, scratch),
                unit="fraction", baseline=f"lru_{name}", once=True))
    return rows


class Traces:
    """The two traces, built at the first trial that needs them (a list of keys each)."""

    def __init__(self, config: BenchConfig) -> None:
        self._config = config
        self._built: dict[str, list[str]] = {}

    def trace(self, name: str) -> list[str]:
        if name not in self._built:
            config = self._config
            reads = zipf_reads(config.eviction_keys, config.zipf_exponent, random.Random(SEED))
            if name == "scan":
                reads = with_scans(reads, config.scan_every, config.scan_length)
            self._built[name] = list(itertools.islice(reads, config.eviction_requests))
        return self._built[name]


def zipf_reads(keys: int, exponent: float, rng: random.Random) -> Iterator[str]:
    """Endless reads of `keys` keys with Zipf(`exponent`) popularity. Popularity rank and key
    name are unrelated (a random permutation), as in a real key space."""
    names = [f"key:{i:08d}" for i in range(keys)]
    rng.shuffle(names)
    cumulative = list(itertools.accumulate(1 / rank ** exponent for rank in range(1, keys + 1)))
    total = cumulative[-1]
    uniform = rng.random
    while True:  # in blocks: one bisect per read, no per-read function call beyond it
        for _ in range(10_000):
            yield names[bisect.bisect(cumulative, uniform() * total)]


def with_scans(reads: Iterator[str], every: int, length: int) -> Iterator[str]:
    """`reads`, with a scan of `length` never-repeated keys after every `every` of them."""
    for scan in itertools.count():
        yield from itertools.islice(reads, every)
        yield from (f"scan:{scan:05d}:{i:08d}" for i in range(length))


def lru_hit_ratio(trace: Sequence[str], capacity: int) -> float:
    """Exact LRU over `trace`: the fraction of reads that were hits."""
    entries: OrderedDict[str, None] = OrderedDict()
    move, pop = entries.move_to_end, entries.popitem
    hits = 0
    for key in trace:
        if key in entries:
            move(key)
            hits += 1
        else:
            entries[key] = None
            if len(entries) > capacity:
                pop(last=False)
    return hits / len(trace)


def _lru_trial(traces: Traces, name: str, capacity: int) -> Callable[[], Sample]:
    def trial() -> Sample:
        trace = traces.trace(name)
        return Sample(lru_hit_ratio(trace, capacity), note=_distinct(trace))
    return trial


def _clock_trial(traces: Traces, name: str, capacity: int,
                 scratch: Scratch) -> Callable[[], Sample]:
    def trial() -> Sample:
        trace = traces.trace(name)
        with scratch.directory(f"eviction-{name}") as path, \
                wbcache.open(path / "c", backend=EveryKeyBackend(), capacity=capacity,
                             flush_interval=3600.0) as cache_:
            get = cache_.get
            for key in trace:
                get(key)
            stats = cache_.stats()
        if stats["hits"] + stats["misses"] != len(trace):
            raise RuntimeError(f"{stats['hits']:,} hits + {stats['misses']:,} misses for "
                               f"{len(trace):,} reads")
        return Sample(stats["hits"] / len(trace),
                      note=f"{stats['evictions']:,} evictions; {_distinct(trace)}")
    return trial


def _distinct(trace: Sequence[str]) -> str:
    return f"{len(set(trace)):,} distinct keys read"


class EveryKeyBackend:
    """A database that holds a value for every key and is never written: `get` is a constant
    answer, so a miss costs only wbcache's own path. Satisfies the `Backend` protocol."""

    kind = "bench-every-key"
    applies_increments = False
    default_read_ttl: float | None = None
    max_key_size = 511
    VALUE = msgpack.packb("v")

    def __init__(self) -> None:
        self._checkpoint = 0

    def attach(self, cache_id: str, tokens: CheckpointTokens | None = None) -> None:
        pass

    def get(self, key: Any) -> bytes | None:
        return self.VALUE

    def apply(self, puts: Collection[tuple[Any, bytes]], deletes: Sequence[Any],
              checkpoint: int, increments: Sequence[tuple[Any, int]] = ()) -> None:
        self._checkpoint = checkpoint

    def checkpoint(self) -> int:
        return self._checkpoint

    def count(self) -> int:
        return 0

    def items(self) -> Iterator[tuple[Any, bytes]]:
        return iter(())

    def close(self) -> None:
        pass
