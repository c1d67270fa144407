"""Memory of `memory_entries` entries: a wbcache against a plain dict holding the same values.

Each side runs in a fresh Python process (nothing else the benchmark allocated can blur it),
which imports everything, reads its resident set size, builds the keys and str values, stores
them (a dict; or a cache filled with put_many of 1,000, default options, then flushed so every
entry is clean and in memory), drops its own lists, collects garbage and reads RSS again. The
difference is what holding the entries costs the process. Both hold the very same key and
value objects; wbcache's share adds its LRU map, and whatever LMDB and the log keep resident.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from bench.config import BenchConfig
from bench.measurement import Measurement, Sample
from bench.workload import Scratch, key_of, str_value_of

SECTION_BASE = "baselines"
SECTION = "wbcache"

_CHILD = ("import sys; sys.path.insert(0, sys.argv[1]); "
          "from bench.memory import child_main; child_main(sys.argv[2:])")


def measurements(config: BenchConfig, scratch: Scratch,
                 sections: tuple[str, ...]) -> list[Measurement]:
    count = config.memory_entries
    rows = []
    if "baselines" in sections:
        rows.append(Measurement("memory_dict", SECTION_BASE,
                                f"plain dict of {count:,} str values (RSS delta)",
                                _trial("dict", count, scratch), unit="bytes", better="lower",
                                big=True))
    if "wbcache" in sections:
        rows.append(Measurement("memory", SECTION, f"memory, {count:,} entries (RSS delta)",
                                _trial("wbcache", count, scratch), unit="bytes",
                                better="lower", baseline="memory_dict", big=True))
    return rows


def _trial(kind: str, count: int, scratch: Scratch) -> Callable[[], Sample]:
    def trial() -> Sample:
        with scratch.directory(f"memory-{kind}") as path:
            bench_parent = str(Path(__file__).resolve().parent.parent)
            done = subprocess.run(
                [sys.executable, "-c", _CHILD, bench_parent, kind, str(count), str(path / "c")],
                capture_output=True, text=True, timeout=300, check=False)
            if done.returncode != 0:
                raise RuntimeError(f"memory child failed: {done.stderr.strip()[-300:]}")
            found = json.loads(done.stdout.strip().splitlines()[-1])
            return Sample(float(found["bytes"]),
                          note=f"{found['bytes'] / count:,.0f} bytes per entry")
    return trial


def _rss() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def child_main(argv: list[str]) -> None:
    """In the child: measure one side, print {"bytes": RSS delta} as JSON."""
    import msgpack  # noqa: F401  (imported before the first reading, as wbcache imports it)

    import wbcache

    kind, count, path = argv[0], int(argv[1]), argv[2]
    gc.collect()
    before = _rss()
    keys = [key_of(i) for i in range(count)]
    values = [str_value_of(i) for i in range(count)]
    cache: wbcache.Cache | None = None
    if kind == "dict":
        holder = dict(zip(keys, values, strict=True))
    else:
        cache = wbcache.open(path, capacity=max(count, 1_000_000))
        for start in range(0, count, 1_000):
            cache.put_many(zip(keys[start:start + 1_000], values[start:start + 1_000], strict=True))
        cache.flush()
        if cache.stats()["cached"] != count:
            raise SystemExit(f"expected {count} entries in memory, found {cache.stats()['cached']}")
    del keys, values
    gc.collect()
    after = _rss()
    print(json.dumps({"bytes": after - before}))
    if cache is not None:
        cache.close()
    else:
        del holder
