"""The issue's targets (#5), each a ratio measured in the same run, judged met or MISSED.

A target whose rows did not run (e.g. AsyncCache before it exists, or a `--only` run) is
reported as "not measured", never as met.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from bench.measurement import Result

Results = dict[str, Result]


@dataclass(frozen=True)
class Target:
    row: str
    """The row the verdict belongs to."""
    text: str
    """What is compared, as the table prints it."""
    measured: Callable[[Results], float | None]
    op: Literal[">=", "<="]
    limit: float
    unit: str = "×"

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
        return f"{sign} {self.limit:g}×"

    def value_text(self, value: float) -> str:
        if self.unit == "%":
            return f"{value * 100:.2f} %"
        return f"{value:.2f}×"


def ratio(row: str, base: str) -> Callable[[Results], float | None]:
    def measured(results: Results) -> float | None:
        top, bottom = _value(results, row), _value(results, base)
        return None if top is None or bottom is None or bottom == 0 else top / bottom
    return measured


def value_of(row: str) -> Callable[[Results], float | None]:
    return lambda results: _value(results, row)


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


TARGETS = (
    Target("put_t1", "put, 1 thread, fsync always / raw write+fdatasync loop",
           ratio("put_t1", "raw_fsync"), ">=", 0.8),
    Target("put_t64", "put, 64 threads / raw loop", ratio("put_t64", "raw_fsync"), ">=", 3),
    Target("put_t64", "p99 ack latency, 64 threads / median raw fsync latency",
           p99_over_fsync_median("put_t64"), "<=", 5),
    Target("async_t1024", "AsyncCache, 1024 tasks / raw loop",
           ratio("async_t1024", "raw_fsync"), ">=", 10),
    Target("async_t1024", "AsyncCache, 1024 tasks / Redis always, 64 clients",
           ratio("async_t1024", "redis_always_c64"), ">=", 1),
    Target("put_many", "put_many of 1,000 (keys/s) / raw loop",
           ratio("put_many", "raw_fsync"), ">=", 25),
    Target("put_interval", 'put, fsync="interval", 1 thread / dict + msgpack encode loop',
           ratio("put_interval", "dict_msgpack"), ">=", 0.3),
    Target("get_str", "get hit, str values / one-line d.get(k) function",
           ratio("get_str", "dict_get"), ">=", 0.5),
    Target("get_dict", "get hit, dict values / one-line unpackb(d.get(k)) function",
           ratio("get_dict", "unpack_get"), ">=", 0.5),
    Target("flusher", "flusher into LMDB / one raw synced putmulti",
           ratio("flusher", "raw_putmulti"), ">=", 0.5),
    Target("recovery", "recovery time / (raw msgpack pass + one putmulti)",
           ratio("recovery", "raw_recovery"), "<=", 3),
    Target("hot_keys", "hot keys: database writes / client writes", value_of("hot_keys"),
           "<=", 0.01, unit="%"),
    Target("memory", "memory of the entries / a plain dict of the same values",
           ratio("memory", "memory_dict"), "<=", 2),
)
