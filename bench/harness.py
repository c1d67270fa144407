"""Timing loops: N threads, N asyncio tasks, or one thread running chunks of a tight loop.

Every loop runs `warmup + seconds` and counts only the operations that finished inside the
counting window, so start-up (threads being scheduled, caches warming) is not measured and no
operation is counted twice. Per-call latency is taken around each call with `perf_counter`
(two clock reads and two list appends, about 0.2 µs: noise next to an fsync; the tight loops
of the in-memory rows take no per-call time at all).
"""

from __future__ import annotations

import asyncio
import resource
import threading
import time
from collections.abc import Awaitable, Callable, Sequence

from bench.measurement import Sample, Usage

Op = Callable[[], object]
AsyncOp = Callable[[], Awaitable[object]]


def percentile(sorted_values: Sequence[float], fraction: float) -> float:
    """The nearest-rank percentile of already sorted values."""
    if not sorted_values:
        raise ValueError("no values")
    index = min(len(sorted_values) - 1, max(0, round(fraction * len(sorted_values)) - 1))
    return sorted_values[index]


class UsageMeter:
    """getrusage of the whole process (every thread) between `start()` and `stop()`."""

    def __init__(self) -> None:
        self._first: resource.struct_rusage | None = None
        self._last: resource.struct_rusage | None = None

    def start(self) -> None:
        self._first = resource.getrusage(resource.RUSAGE_SELF)

    def stop(self) -> None:
        self._last = resource.getrusage(resource.RUSAGE_SELF)

    def usage(self, operations: int) -> Usage | None:
        first, last = self._first, self._last
        if first is None or last is None:
            return None
        return Usage(last.ru_utime + last.ru_stime - first.ru_utime - first.ru_stime,
                     last.ru_nvcsw - first.ru_nvcsw, last.ru_nivcsw - first.ru_nivcsw,
                     operations)


def _window_sample(ends: list[list[float]], latencies: list[list[float]], start: float,
                   stop: float, per_call: int, meter: UsageMeter | None = None) -> Sample:
    """ops/s (times `per_call` items per call), latency percentiles and resource use of the
    calls ending in [start, stop)."""
    kept = sorted(lat for worker_ends, worker_lats in zip(ends, latencies, strict=True)
                  for end, lat in zip(worker_ends, worker_lats, strict=True)
                  if start <= end < stop)
    if not kept:
        raise RuntimeError(f"no call finished within the {stop - start:.2f} s window")
    return Sample(len(kept) * per_call / (stop - start), percentile(kept, 0.50),
                  percentile(kept, 0.99), percentile(kept, 0.999),
                  usage=None if meter is None else meter.usage(len(kept) * per_call))


def run_threads(ops: Sequence[Op], seconds: float, warmup: float, *, per_call: int = 1) -> Sample:
    """Run each of `ops` in a loop in its own thread; return throughput and call latency."""
    count = len(ops)
    ends: list[list[float]] = [[] for _ in range(count)]
    latencies: list[list[float]] = [[] for _ in range(count)]
    errors: list[BaseException] = []
    running = threading.Event()
    running.set()
    barrier = threading.Barrier(count + 1)

    def worker(index: int) -> None:
        op, clock = ops[index], time.perf_counter
        end_of, lat_of = ends[index].append, latencies[index].append
        try:
            barrier.wait()
            while running.is_set():
                began = clock()
                op()
                done = clock()
                end_of(done)
                lat_of(done - began)
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)
            running.clear()

    threads = [threading.Thread(target=worker, args=(i,), name=f"bench-{i}", daemon=True)
               for i in range(count)]
    for thread in threads:
        thread.start()
    barrier.wait()
    started = time.perf_counter()
    meter = UsageMeter()
    _sleep_unless_stopped(running, started + warmup)
    meter.start()
    window_end = started + warmup + seconds
    _sleep_unless_stopped(running, window_end)
    # A call slower than the whole window (a far link in a --smoke run on a loaded machine):
    # widen the window until a call has ended in it, rather than measuring nothing.
    while running.is_set() and not ended_in(ends, started + warmup, window_end):
        time.sleep(0.01)
        window_end = time.perf_counter()
    meter.stop()
    running.clear()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return _window_sample(ends, latencies, started + warmup, window_end, per_call, meter)


def ended_in(ends: list[list[float]], start: float, stop: float) -> bool:
    """Whether any call ended in [start, stop) (each list is in time order, appended to by
    its thread meanwhile). Also the shared rows' worker processes' (bench/shared_worker.py)."""
    for worker_ends in ends:
        for end in reversed(worker_ends):
            if end < start:
                break
            if end < stop:
                return True
    return False


def _sleep_unless_stopped(running: threading.Event, deadline: float) -> None:
    """Sleep until `deadline` (perf_counter) or until a worker failed. One wake-up per 50 ms:
    a few dozen context switches per trial, noise next to the workers' own."""
    while running.is_set():
        left = deadline - time.perf_counter()
        if left <= 0:
            return
        time.sleep(min(left, 0.05))


async def run_tasks(ops: Sequence[AsyncOp], seconds: float, warmup: float) -> Sample:
    """Run each of `ops` in a loop in its own asyncio task; return throughput and latency."""
    count = len(ops)
    ends: list[list[float]] = [[] for _ in range(count)]
    latencies: list[list[float]] = [[] for _ in range(count)]
    state = {"running": True}

    async def worker(index: int) -> None:
        op, clock = ops[index], time.perf_counter
        end_of, lat_of = ends[index].append, latencies[index].append
        while state["running"]:
            began = clock()
            await op()
            done = clock()
            end_of(done)
            lat_of(done - began)

    tasks = [asyncio.ensure_future(worker(i)) for i in range(count)]
    started = time.perf_counter()
    meter = UsageMeter()
    loop = asyncio.get_running_loop()
    # Read the counters at the window's edges from the loop itself (call_at), so that they
    # bracket the same calls the window counts.
    loop.call_at(loop.time() + warmup, meter.start)
    loop.call_at(loop.time() + warmup + seconds, meter.stop)
    window_end = started + warmup + seconds
    try:
        pending = set(tasks)
        done, pending = await asyncio.wait(pending, timeout=warmup + seconds,
                                           return_when=asyncio.FIRST_EXCEPTION)
        # A call slower than the whole window (a --smoke run on a loaded machine): widen the
        # window until a call has ended in it, as the threads' harness does.
        while not done and not ended_in(ends, started + warmup, window_end):
            done, pending = await asyncio.wait(pending, timeout=0.01,
                                               return_when=asyncio.FIRST_EXCEPTION)
            window_end = time.perf_counter()
            meter.stop()
    finally:
        state["running"] = False
    await asyncio.gather(*tasks)  # every task finishes its call in flight; errors surface here
    return _window_sample(ends, latencies, started + warmup, window_end, 1, meter)


def run_chunks(chunk: Callable[[], int], seconds: float, warmup: float) -> Sample:
    """Call `chunk()` (a tight loop that returns how many operations it did) until the time
    is up; ops/s over the chunks that ran entirely after the warm-up. No per-call latency."""
    clock = time.perf_counter
    started = clock()
    counting_from = started + warmup
    deadline = counting_from + seconds
    done = 0
    first = None
    now = started
    # A chunk slower than the whole window (a --smoke run on a loaded machine): run on until
    # one chunk has run entirely after the warm-up, rather than measuring nothing.
    while now < deadline or first is None:
        began = now
        ops = chunk()
        now = clock()
        if began >= counting_from:
            if first is None:
                first = began
            done += ops
    return Sample(done / (now - first))
