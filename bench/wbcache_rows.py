"""wbcache's own rows. Each trial opens a fresh cache directory and closes it afterwards
(opening and closing are not timed); options are the defaults unless the row says otherwise.

  put_t{N}        put() from N threads, fsync="always": durable acks/s, ack latency, and the
                  CPU time and voluntary context switches of the whole process per put
  put_t{N}_switch the same with the interpreter's switch interval lowered in this process
                  (`lowered_switch_interval`): how much of the latency tail is GIL hand-offs
  async_t{N}      AsyncCache.put() from N asyncio tasks ("not available" without AsyncCache)
  async_t{N}_switch  the same for the target's 64 tasks with the switch interval lowered: how
                  much of it is the commit thread's wait for the GIL that the loop holds
  put_many        put_many() of `put_many_size` entries per call; keys/s
  put_interval    put() from 1 thread, fsync="interval": the write path without an fsync
  get_str/dict    get() hits on str and dict values, every key in memory, keys read in
                  insertion order (as the baselines read theirs)
  get_str_random  the same with the keys read in a fixed random order, as a cache's reads
                  come (informational: the order decides how much of a hit is cache misses)
  flusher         one flush() of `flush_entries` dirty entries into LMDB; entries/s
  hot_keys        `hot_keys` keys x `hot_writes_per_key` writes between flushes: database
                  writes / client writes, from cache.stats()
"""

from __future__ import annotations

import asyncio
import dataclasses
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import wbcache
from bench.baselines import CHUNK, get_chunks, pair_parts
from bench.config import BenchConfig
from bench.harness import AsyncOp, Op, run_chunks, run_tasks, run_threads
from bench.measurement import Measurement, Sample
from bench.peers import cycling_op
from bench.workload import Scratch, Workload

SECTION = "wbcache"

# A cache that must not flush or push back on its own while a row fills it.
HOLD_OPTIONS: dict[str, Any] = {"flush_interval": 3600.0, "fsync": "interval"}


def measurements(config: BenchConfig, workload: Workload, scratch: Scratch) -> list[Measurement]:
    rows = [Measurement(f"put_t{n}", SECTION, f"put, fsync always, {n} thread" + "s" * (n > 1),
                        _put_threads(config, workload, scratch, n), baseline="raw_fsync",
                        series="wbcache put (threads)", concurrency=n)
            for n in config.wbcache_threads]
    most = max(config.wbcache_threads)
    interval = config.lowered_switch_interval
    rows.append(Measurement(
        f"put_t{most}_switch", SECTION,
        f"put, fsync always, {most} threads, sys.setswitchinterval({interval:g}) in the "
        f"benchmark (default {sys.getswitchinterval():g})",
        _put_threads(config, workload, scratch, most, switch_interval=interval),
        baseline="raw_fsync"))
    async_missing = None if hasattr(wbcache, "open_async") else "not available"
    rows += [Measurement(f"async_t{n}", SECTION, f"AsyncCache put, {n} task" + "s" * (n > 1),
                         None if async_missing else _async_tasks(config, workload, scratch, n),
                         baseline="raw_fsync", series="wbcache AsyncCache (tasks)",
                         concurrency=n, unavailable=async_missing)
             for n in config.async_tasks]
    tasks = 64 if 64 in config.async_tasks else max(config.async_tasks)
    rows.append(Measurement(
        f"async_t{tasks}_switch", SECTION,
        f"AsyncCache put, {tasks} tasks, sys.setswitchinterval({interval:g}) in the benchmark "
        f"(default {sys.getswitchinterval():g})",
        None if async_missing else _async_tasks(config, workload, scratch, tasks,
                                                switch_interval=interval),
        baseline="raw_fsync", unavailable=async_missing))
    size = config.put_many_size
    rows += [
        Measurement("put_many", SECTION, f"put_many of {size:,}, 1 thread (keys/s)",
                    _put_many(config, workload, scratch), unit="keys/s", baseline="raw_fsync",
                    note="latency is per put_many call"),
        Measurement("put_interval", SECTION, 'put, fsync="interval", 1 thread',
                    _put_interval(config, workload, scratch), baseline="dict_msgpack"),
        Measurement("get_str", SECTION, "get hit, str values",
                    _get_hits(config, workload, scratch, workload.str_values, "str"),
                    baseline="dict_get"),
        Measurement("get_dict", SECTION, "get hit, dict values (fresh copy)",
                    _get_hits(config, workload, scratch, workload.dict_values, "dict"),
                    baseline="unpack_get"),
        Measurement("get_str_random", SECTION, "get hit, str values, keys in random order",
                    _get_hits(config, workload, scratch, workload.str_values, "str",
                              order=workload.shuffled_keys),
                    baseline="dict_get_random"),
        Measurement("flusher", SECTION,
                    f"flusher into LMDB, {config.flush_entries:,} dirty entries per flush",
                    _flusher(config, workload, scratch), unit="entries/s",
                    baseline="raw_putmulti", big=True),
        Measurement("hot_keys", SECTION,
                    f"hot keys {config.hot_keys:,} x {config.hot_writes_per_key} writes "
                    "between flushes (db writes / client writes)",
                    _hot_keys(config, scratch), unit="fraction", better="lower", big=True),
    ]
    return rows


def _put_threads(config: BenchConfig, workload: Workload, scratch: Scratch, threads: int, *,
                 switch_interval: float | None = None) -> Callable[[], Sample]:
    def trial() -> Sample:
        with scratch.directory(f"put-{threads}") as path, wbcache.open(path / "c") as cache:
            ops: list[Op] = [cycling_op(cache.put, *workload.slice_for(worker, threads))
                             for worker in range(threads)]
            default = sys.getswitchinterval()
            if switch_interval is not None:  # this process only, never the library's business
                sys.setswitchinterval(switch_interval)
            try:
                sample = run_threads(ops, config.trial_seconds, config.warmup_seconds)
            finally:
                sys.setswitchinterval(default)
            return _with_batch_note(cache.stats(), sample)
    return trial


def _with_batch_note(stats: dict[str, Any], sample: Sample) -> Sample:
    per_fsync = stats["writes"] / stats["fsyncs"] if stats["fsyncs"] else 0.0
    note = f"{per_fsync:.1f} writes per fsync"
    if sample.usage is not None:
        note += f"; {sample.usage.per_op()}"
    return dataclasses.replace(sample, note=note)


def _async_tasks(config: BenchConfig, workload: Workload, scratch: Scratch, tasks: int, *,
                 switch_interval: float | None = None) -> Callable[[], Sample]:
    async def measure(path: Path) -> Sample:
        cache = await wbcache.open_async(path)  # type: ignore[attr-defined]
        try:
            ops: list[AsyncOp] = []
            for worker in range(tasks):
                keys, values = workload.slice_for(worker, tasks)
                ops.append(_async_cycling_put(cache, keys, values))
            sample = await run_tasks(ops, config.trial_seconds, config.warmup_seconds)
            return _with_batch_note(await cache.stats(), sample)
        finally:
            await cache.close()

    def trial() -> Sample:
        with scratch.directory(f"async-{tasks}") as path:
            default = sys.getswitchinterval()
            if switch_interval is not None:  # this process only, as in `_put_threads`
                sys.setswitchinterval(switch_interval)
            try:
                return asyncio.run(measure(path / "c"))
            finally:
                sys.setswitchinterval(default)
    return trial


def _async_cycling_put(cache: Any, keys: list[str], values: list[Any]) -> AsyncOp:
    pairs = list(zip(keys, values, strict=True))
    index = [0]
    size = len(pairs)
    put = cache.put

    def op() -> Any:
        i = index[0]
        index[0] = i + 1 if i + 1 < size else 0
        return put(*pairs[i])
    return op


def _put_many(config: BenchConfig, workload: Workload, scratch: Scratch) -> Callable[[], Sample]:
    size = config.put_many_size
    keys, values = workload.keys, workload.dict_values
    batches = [dict(zip(keys[i:i + size], values[i:i + size], strict=True))
               for i in range(0, len(keys), size)]

    def trial() -> Sample:
        with scratch.directory("put-many") as path, wbcache.open(path / "c") as cache:
            op = cycling_op(lambda batch, _: cache.put_many(batch), batches, batches)
            return run_threads([op], config.trial_seconds, config.warmup_seconds, per_call=size)
    return trial


def _put_interval(config: BenchConfig, workload: Workload,
                  scratch: Scratch) -> Callable[[], Sample]:
    def trial() -> Sample:
        with scratch.directory("put-interval") as path, \
                wbcache.open(path / "c", fsync="interval") as cache:
            put = cache.put
            next_part = pair_parts(workload.keys, workload.dict_values)

            def chunk() -> int:  # the same loop as the dict + msgpack baseline
                part = next_part()
                for k, v in part:
                    put(k, v)
                return len(part)
            return run_chunks(chunk, config.trial_seconds, config.warmup_seconds)
    return trial


def _get_hits(config: BenchConfig, workload: Workload, scratch: Scratch, values: list[Any],
              kind: str, order: list[str] | None = None) -> Callable[[], Sample]:
    def trial() -> Sample:
        with scratch.directory(f"get-{kind}") as path, \
                wbcache.open(path / "c", **HOLD_OPTIONS) as cache:
            fill(cache, workload.keys, values)
            cache.flush()  # clean entries, still in memory: every get below is a hit
            sample = run_chunks(get_chunks(cache.get, order or workload.keys),
                                config.trial_seconds, config.warmup_seconds)
            if cache.stats()["misses"]:
                raise RuntimeError("a get missed memory; the row measures hits only")
            return sample
    return trial


def fill(cache: wbcache.Cache, keys: list[str], values: list[Any]) -> None:
    """Put every key's value with put_many of CHUNK entries (fewer log records than puts)."""
    for start in range(0, len(keys), CHUNK):
        cache.put_many(zip(keys[start:start + CHUNK], values[start:start + CHUNK], strict=True))


def _flusher(config: BenchConfig, workload: Workload, scratch: Scratch) -> Callable[[], Sample]:
    count = config.flush_entries
    keys, values = workload.distinct(count)

    def trial() -> Sample:
        with scratch.directory("flusher") as path, \
                wbcache.open(path / "c", **HOLD_OPTIONS, flush_threshold=count + 1,
                             max_dirty=count + 1, capacity=max(count, 1_000_000)) as cache:
            fill(cache, keys, values)
            if cache.stats()["dirty"] != count:
                raise RuntimeError("the cache flushed on its own while being filled")
            started = time.perf_counter()
            cache.flush()
            seconds = time.perf_counter() - started
            return Sample(count / seconds, note=f"{seconds:.3f} s per flush")
    return trial


def _hot_keys(config: BenchConfig, scratch: Scratch) -> Callable[[], Sample]:
    keys = [f"hot:{i:05d}" for i in range(config.hot_keys)]

    def trial() -> Sample:
        with scratch.directory("hot-keys") as path, \
                wbcache.open(path / "c", **HOLD_OPTIONS) as cache:
            before = cache.stats()
            put = cache.put
            for _cycle in range(config.hot_cycles):
                for write in range(config.hot_writes_per_key):
                    for key in keys:
                        put(key, write)
                cache.flush()
            after = cache.stats()
        client = after["writes"] - before["writes"]
        database = after["backend_writes"] - before["backend_writes"]
        return Sample(database / client, note=f"{database:,} db writes for {client:,} puts")
    return trial
