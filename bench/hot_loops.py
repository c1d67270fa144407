"""One wbcache path in a loop, for a profiler. Not part of the benchmark's table.

    python -m bench.hot_loops put-interval --seconds 5
    .venv/bin/py-spy record -r 2000 -o put.svg -- .venv/bin/python -m bench.hot_loops put-interval
    .venv/bin/pyinstrument -m bench.hot_loops get-str

Paths: put-interval (1 thread, fsync="interval"), put-always (1 thread), put-threads (16
threads, or --threads N, fsync="always"), put-async (AsyncCache, 64 tasks, or --threads N,
fsync="always"), get-str and get-dict (hits), flush (fill 100,000 dirty entries, flush,
repeat). The same keys and values as the benchmark; files in a temp dir
removed afterwards. (Recovery: profile the command itself, `py-spy record -- wbcache recover
DIR`, on a copy of a log the benchmark's recovery rows write.)
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import wbcache
from bench.workload import Workload

PATHS = ("put-interval", "put-always", "put-threads", "put-async", "get-str", "get-dict",
         "flush")


def _until(seconds: float, step: Callable[[], int]) -> int:
    deadline = time.perf_counter() + seconds
    done = 0
    while time.perf_counter() < deadline:
        done += step()
    return done


def _puts(cache: wbcache.Cache, keys: list[str], values: list[Any]) -> Callable[[], int]:
    put = cache.put

    def step() -> int:
        for k, v in zip(keys, values, strict=True):
            put(k, v)
        return len(keys)
    return step


def _gets(cache: wbcache.Cache, keys: list[str]) -> Callable[[], int]:
    get = cache.get

    def step() -> int:
        for k in keys:
            get(k)
        return len(keys)
    return step


async def _async_puts(directory: Path, seconds: float, tasks: int, keys: list[str],
                      values: list[Any]) -> int:
    counts = [0] * tasks
    deadline = time.perf_counter() + seconds
    async with await wbcache.open_async(directory / "c") as cache:
        async def worker(i: int) -> None:
            mine = list(zip(keys[i::tasks][:500], values[i::tasks][:500], strict=True))
            while time.perf_counter() < deadline:
                for k, v in mine:
                    await cache.put(k, v)
                counts[i] += len(mine)
        await asyncio.gather(*(worker(i) for i in range(tasks)))
    return sum(counts)


def run(path: str, seconds: float, directory: Path, writers: int = 16) -> int:
    workload = Workload(100_000)
    keys, values = workload.keys, workload.dict_values
    if path == "put-async":
        return asyncio.run(_async_puts(directory, seconds, writers, keys, values))
    if path == "put-threads":
        with wbcache.open(directory / "c") as cache:
            counts = [0] * writers

            def worker(i: int) -> None:
                counts[i] = _until(seconds, _puts(cache, keys[i::writers][:500],
                                                  values[i::writers][:500]))
            threads = [threading.Thread(target=worker, args=(i,)) for i in range(writers)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            return sum(counts)
    options: dict[str, Any] = {"fsync": "interval"}
    if path in ("get-str", "get-dict", "flush"):
        options.update(flush_interval=3600.0, flush_threshold=200_000, max_dirty=200_000)
    if path == "put-always":
        options = {}
    with wbcache.open(directory / "c", **options) as cache:
        if path.startswith("put"):
            count = 1000 if path == "put-always" else len(keys)
            return _until(seconds, _puts(cache, keys[:count], values[:count]))
        if path.startswith("get"):
            stored = workload.str_values if path == "get-str" else values
            for start in range(0, len(keys), 1000):
                cache.put_many(zip(keys[start:start + 1000], stored[start:start + 1000],
                                   strict=True))
            cache.flush()
            return _until(seconds, _gets(cache, keys))

        def fill_and_flush() -> int:
            for start in range(0, len(keys), 1000):
                cache.put_many(zip(keys[start:start + 1000], values[start:start + 1000],
                                   strict=True))
            cache.flush()
            return len(keys)
        return _until(seconds, fill_and_flush)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.hot_loops", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path", choices=PATHS)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--threads", type=int, default=None,
                        help="writers of put-threads (16) or tasks of put-async (64)")
    args = parser.parse_args()
    directory = Path(tempfile.mkdtemp(prefix="wbcache-hot-"))
    try:
        started = time.perf_counter()
        writers = args.threads or (64 if args.path == "put-async" else 16)
        done = run(args.path, args.seconds, directory, writers)
        print(f"{args.path}: {done / (time.perf_counter() - started):,.0f} ops/s")
    finally:
        shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
