"""`BenchConfig`: how long, how often and how big each measurement is, per mode.

Three modes share every row, they only scale it:
  full   the published run (about 10 minutes): every concurrency level, 1,000,000-record
         recovery and memory rows, the 1,000,000-request eviction traces
  quick  about 1 to 2 minutes: shorter trials, one round, 100,000-record recovery and memory rows
  smoke  under 30 seconds, for CI: proves the benchmark starts and prints its table; its
         numbers mean nothing
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

MODES = ("full", "quick", "smoke")

SECTIONS = ("baselines", "peers", "redis", "wbcache", "shared", "postgres")
"""What `--only` may select. `peers` is LMDB, SQLite and diskcache; `redis` is Redis alone;
`shared` is wbcache's shared directories (many processes, one LMDB database); `postgres` is
wbcache over PostgreSQL against PostgreSQL alone (needs `pg_dsn`)."""


@dataclass(frozen=True, kw_only=True)
class BenchConfig:
    mode: str = "full"
    """full, quick or smoke (see the module docstring)."""

    trial_seconds: float = 1.5
    """Seconds each timed trial counts operations, after `warmup_seconds`."""

    warmup_seconds: float = 0.2
    """Seconds each trial runs before it starts counting (caches, flusher, page cache)."""

    rounds: int = 3
    """Trials per measurement. Rounds are interleaved (every measurement once, then again),
    so a burst of load from another process hurts one trial of many rows, not every trial of
    one row. Throughput keeps the best trial; latency the median of the trials' percentiles."""

    big_rounds: int = 2
    """Trials of the expensive one-shot rows (recovery, flusher); at most `rounds`."""

    key_pool: int = 100_000
    """Distinct keys every write row cycles through (and the get rows read)."""

    wbcache_threads: tuple[int, ...] = (1, 4, 16, 64)
    async_tasks: tuple[int, ...] = (1, 16, 64, 256, 1024)
    peer_clients: tuple[int, ...] = (1, 16, 64)
    """Concurrency of LMDB, SQLite, diskcache and Redis via redis-py (threads, one connection
    each)."""

    redis_benchmark_clients: tuple[int, ...] = (16, 64)
    """Connections of the redis-benchmark rows (Redis driven by its own C client)."""

    lowered_switch_interval: float = 0.0005
    """Seconds: the interpreter's switch interval (default 0.005) in the rows that repeat the
    64-thread put and the 64-task `AsyncCache` put with it lowered, in this benchmark process
    only: what the GIL's hand-offs add to the threads' latency tail, and what `AsyncCache`
    gains when its commit thread, back from a fdatasync, waits less for the GIL the event loop
    holds (a reading of the difference between the two rows, not a measurement of the wait)."""

    put_many_size: int = 1_000
    """Entries per `put_many` call."""

    flush_entries: int = 100_000
    """Dirty entries the flusher row writes into LMDB in one flush."""

    recovery_records: int = 1_000_000
    """Records in the log the recovery row replays."""

    recovery_keys: int = 100_000
    """Distinct keys those records cycle through (10 writes per key); at most `key_pool`."""

    recover_rss_records: int = 1_000_000
    """Records, each a put of a key of its own, in the log `wbcache recover` replays in the
    peak-memory row."""

    memory_entries: int = 1_000_000
    """Entries the memory row holds, in a wbcache and in a plain dict."""

    eviction_requests: int = 1_000_000
    eviction_keys: int = 100_000
    eviction_capacity: int = 10_000
    zipf_exponent: float = 0.99
    """The hit-ratio rows: `eviction_requests` reads of `eviction_keys` keys with Zipf
    popularity, through a cache of `eviction_capacity` entries."""

    scan_every: int = 80_000
    scan_length: int = 20_000
    """The scan-heavy trace: after every `scan_every` Zipf reads, one scan of `scan_length`
    keys read once and never again."""

    hot_keys: int = 1_000
    hot_writes_per_key: int = 100
    hot_cycles: int = 3
    """The hot-key row: `hot_keys` keys written `hot_writes_per_key` times each between two
    flushes, `hot_cycles` times over."""

    shared_processes: tuple[int, ...] = (1, 2, 4)
    shared_threads: int = 16
    """The shared-directory put rows: each of `shared_processes` processes x `shared_threads`
    threads on one shared directory, against 1 process with as many threads as the largest of
    them has in all (4 x 16 = 64)."""

    shared_flush_lanes: int = 4
    shared_flush_entries: int = 50_000
    """The shared flush rows: `shared_flush_lanes` processes (and 1) flushing
    `shared_flush_entries` dirty entries each into the shared database at once."""

    shared_read_keys: int = 1_000
    """Keys the shared get rows read in another process than the one that wrote them."""

    shared_staleness_samples: int = 30
    staleness_flush_interval: float = 1.0
    """The staleness row: writes timed from the writer's ack to the first read in another
    process that sees them, with both processes flushing every `staleness_flush_interval` s
    (the default flush_interval; shorter in a smoke run, whose numbers mean nothing)."""

    pg_dsn: str | None = None
    """The PostgreSQL server of the `postgres` section (a libpq DSN or postgresql:// URL);
    None: its rows say "not configured". The run works in a schema of its own, dropped after."""

    pg_threads: int = 16
    """Client threads of the PostgreSQL write-back and write-through rows (the same in both)."""

    pg_flush_entries: int = 10_000
    """Dirty entries each PostgreSQL flush row writes in one flush."""

    far_delay: float = 0.001
    """Seconds the far-link proxy holds every chunk, each way (1 ms: a round trip of 2 ms)."""

    far_threads: tuple[int, ...] = (1, 16)
    """Client threads of the far-link write-through and write-back rows."""

    far_hot_keys: int = 100
    """Keys the far-link hot-key rows cycle through (16 threads)."""

    scratch_parent: Path | None = None
    """Where the benchmark's temporary directory goes (None: chosen on the repo's filesystem)."""

    only: tuple[str, ...] = SECTIONS
    """Sections to run."""

    @classmethod
    def for_mode(cls, mode: str, **overrides: object) -> BenchConfig:
        """The settings of `mode`, with `overrides` (None values are ignored)."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
        base = {"full": {}, "quick": _QUICK, "smoke": _SMOKE}[mode]
        settings = {**base, **{k: v for k, v in overrides.items() if v is not None}}
        config = cls(mode=mode, **settings)  # type: ignore[arg-type]
        return dataclasses.replace(config, big_rounds=min(config.big_rounds, config.rounds))

    def scaled(self, full_value: int, actual: int) -> str:
        """' (quick: 100,000)' when a size differs from the full run's, else ''."""
        return "" if actual == full_value else f" ({self.mode}: {actual:,})"


_QUICK: dict[str, object] = {
    "trial_seconds": 0.45,
    "warmup_seconds": 0.1,
    "rounds": 1,
    "big_rounds": 1,
    "flush_entries": 50_000,
    "recovery_records": 100_000,
    "recovery_keys": 10_000,
    "recover_rss_records": 100_000,
    "memory_entries": 100_000,
    "hot_cycles": 1,
    "eviction_requests": 300_000,
    "eviction_keys": 30_000,
    "eviction_capacity": 3_000,
    "scan_every": 24_000,
    "scan_length": 6_000,
    "shared_flush_entries": 20_000,
    "shared_staleness_samples": 10,
}

_SMOKE: dict[str, object] = {
    "trial_seconds": 0.04,
    "warmup_seconds": 0.01,
    "rounds": 1,
    "big_rounds": 1,
    "key_pool": 2_000,
    "wbcache_threads": (1, 4),
    "async_tasks": (1, 16),
    "peer_clients": (1,),
    "redis_benchmark_clients": (4,),
    "far_threads": (1, 4),
    "put_many_size": 100,
    "flush_entries": 2_000,
    "recovery_records": 5_000,
    "recovery_keys": 500,
    "memory_entries": 5_000,
    "recover_rss_records": 5_000,
    "eviction_requests": 20_000,
    "eviction_keys": 2_000,
    "eviction_capacity": 200,
    "scan_every": 1_600,
    "scan_length": 400,
    "hot_keys": 100,
    "hot_writes_per_key": 100,
    "hot_cycles": 1,
    "pg_flush_entries": 500,
    "shared_flush_entries": 1_000,
    "shared_read_keys": 100,
    "shared_staleness_samples": 3,
    "staleness_flush_interval": 0.05,
}
