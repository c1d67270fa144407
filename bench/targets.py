"""The targets, each a ratio (or a bound) measured in the same run, judged met or MISSED.

A target whose rows did not run (a `--only` run, a peer not installed, no PostgreSQL server)
is reported as "not measured", never as met. A target whose text names a size takes it from
the run's config (`Target.label`), so a --quick or --smoke run's target names the size its row
measured (100,000 distinct keys, not the full run's 1,000,000).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Literal

from bench.config import BenchConfig
from bench.measurement import Result

Results = dict[str, Result]


@dataclass(frozen=True)
class Target:
    row: str
    """The row the verdict belongs to."""
    text: str
    """What is compared, as the targets section prints it (through `label`): a format string
    whose fields, if any, are `BenchConfig` fields, e.g. {recover_rss_records:,}."""
    measured: Callable[[Results], float | None]
    op: Literal[">=", "<="]
    limit: float
    unit: str = "×"

    def label(self, config: BenchConfig) -> str:
        """`text` with the sizes of `config`'s run filled in."""
        return self.text.format(**{f.name: getattr(config, f.name) for f in fields(config)})

    def judge(self, results: Results) -> tuple[float | None, str]:
        """(measured value, verdict): "met", "MISSED (..)" or "not measured"."""
        value = self.measured(results)
        if value is None:
            return None, "not measured"
        if (value >= self.limit) if self.op == ">=" else (value <= self.limit):
            return value, "met"
        if self.op == ">=":
            return value, f"MISSED ({(1 - value / self.limit) * 100:.0f}% short)"
        return value, f"MISSED ({(value / self.limit - 1) * 100:.0f}% over)"

    def limit_text(self) -> str:
        sign = "≥" if self.op == ">=" else "≤"
        if self.unit == "%":
            return f"{sign} {self.limit * 100:g} %"
        if self.unit == "MB":
            return f"{sign} {self.limit / MB:g} MB"
        if self.unit == "per put":
            return f"{sign} {self.limit:g}"
        return f"{sign} {self.limit:g}×"

    def value_text(self, value: float) -> str:
        if self.unit == "%":
            return f"{value * 100:.2f} %"
        if self.unit == "MB":
            return f"{value / MB:.1f} MB"
        if self.unit == "per put":
            return f"{value:.5f}"
        return f"{value:.2f}×"


def ratio(row: str, base: str) -> Callable[[Results], float | None]:
    def measured(results: Results) -> float | None:
        top, bottom = _value(results, row), _value(results, base)
        return None if top is None or bottom is None or bottom == 0 else top / bottom
    return measured


def value_of(row: str) -> Callable[[Results], float | None]:
    return lambda results: _value(results, row)


def extra_of(row: str, name: str) -> Callable[[Results], float | None]:
    """A further number the row's best trial reported (`Sample.extra`)."""
    def measured(results: Results) -> float | None:
        result = results.get(row)
        best = None if result is None else result.best
        return None if best is None else best.extra.get(name)
    return measured


def p99_over_fsync_median(row: str) -> Callable[[Results], float | None]:
    def measured(results: Results) -> float | None:
        put, raw = results.get(row), results.get("raw_fsync")
        if put is None or raw is None or put.p99 is None or not raw.p50:
            return None
        return put.p99 / raw.p50
    return measured


def _value(results: Results, row: str) -> float | None:
    result = results.get(row)
    return None if result is None else result.value


MB = 1e6  # bytes

TARGETS = (
    # durable puts against the physical limit and against Redis (its own C client)
    Target("put_t1", "put, 1 thread, fsync always / raw write+fdatasync loop",
           ratio("put_t1", "raw_fsync"), ">=", 0.8),
    Target("put_t16", "put, 16 threads / Redis always, 16 clients (redis-benchmark)",
           ratio("put_t16", "redis_bench_always_c16"), ">=", 0.9),
    Target("put_t64", "put, 64 threads / raw loop", ratio("put_t64", "raw_fsync"), ">=", 3),
    Target("put_t64", "put, 64 threads / Redis always, 64 clients (redis-benchmark)",
           ratio("put_t64", "redis_bench_always_c64"), ">=", 0.5),
    Target("put_t64", "p99 ack latency, 64 threads / median raw fdatasync latency",
           p99_over_fsync_median("put_t64"), "<=", 5),
    Target("async_t64", "AsyncCache, 64 tasks / Redis always, 64 clients (redis-benchmark)",
           ratio("async_t64", "redis_bench_always_c64"), ">=", 1.2),
    Target("async_t1024", "AsyncCache, 1024 tasks / raw loop",
           ratio("async_t1024", "raw_fsync"), ">=", 10),
    Target("async_t1024", "AsyncCache, 1024 tasks / Redis always, 64 clients (redis-benchmark)",
           ratio("async_t1024", "redis_bench_always_c64"), ">=", 1),
    Target("put_many", "put_many of {put_many_size:,} (keys/s) / raw loop",
           ratio("put_many", "raw_fsync"), ">=", 25),
    # the in-memory paths against the plain-Python equivalent
    Target("put_interval", 'put, fsync="interval", 1 thread / dict + msgpack encode loop',
           ratio("put_interval", "dict_msgpack"), ">=", 0.3),
    Target("get_str", "get hit, str values / one-line d.get(k) function",
           ratio("get_str", "dict_get"), ">=", 0.6),
    Target("get_dict", "get hit, dict values / one-line unpackb(d.get(k)) function",
           ratio("get_dict", "unpack_get"), ">=", 0.7),
    Target("clock_zipf", "hit ratio on the Zipf(0.99) trace / exact LRU's",
           ratio("clock_zipf", "lru_zipf"), ">=", 0.98),
    # the database side, recovery and memory
    Target("flusher", "flusher into LMDB / one raw synced putmulti",
           ratio("flusher", "raw_putmulti"), ">=", 0.5),
    Target("hot_keys", "hot keys: database writes / client writes", value_of("hot_keys"),
           "<=", 0.01, unit="%"),
    Target("recovery", "recovery time / (raw msgpack pass + one putmulti)",
           ratio("recovery", "raw_recovery"), "<=", 3),
    Target("recover_rss", "wbcache recover of {recover_rss_records:,} distinct keys: peak RSS",
           value_of("recover_rss"), "<=", 120 * MB, unit="MB"),
    Target("memory", "memory of the entries / a plain dict of the same values",
           ratio("memory", "memory_dict"), "<=", 2),
    # shared directories: many processes, one LMDB database
    Target("shared_p2_t16", "shared directory: 2 processes x 16 threads / 1 process x 64 threads",
           ratio("shared_p2_t16", "shared_p1_t64"), ">=", 1.4),
    Target("shared_staleness", "shared directory: worst staleness of a read in another process "
           "/ (flush_interval + read_ttl)", extra_of("shared_staleness", "of_bound"), "<=", 1),
    # PostgreSQL over a far link (1 ms each way)
    Target("far_write_back_t1", "far link, 1 thread: write-back / write-through",
           ratio("far_write_back_t1", "far_write_through_t1"), ">=", 10),
    Target("far_write_back_t16", "far link, 16 threads: write-back / write-through",
           ratio("far_write_back_t16", "far_write_through_t16"), ">=", 3),
    Target("far_hot_write_back", "far link, 100 hot keys: database transactions per put",
           extra_of("far_hot_write_back", "txn_per_write"), "<=", 0.01, unit="per put"),
)
