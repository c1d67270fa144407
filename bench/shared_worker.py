"""A worker process of the shared-directory rows (bench/shared_rows.py), which starts a few
of them with the benchmark's own interpreter from the repository's root, `python -m
bench.shared_worker`, and gives each trial's work to as many as it needs.

A worker talks to the benchmark through its stdin and stdout, one JSON object per line:

  {"open": DIR, "index": i, "options": {...}, "job": JOB, "args": [...]}
        opens DIR with `shared=True` (so it claims a lane of its own) and the options, does
        JOB's setup if a job is named, and prints {"ready"}:
    acks THREADS   THREADS threads that put small values to keys no other put uses. After
                   {"ready"}, on {"start", "warmup", "seconds"} (start: a time.monotonic()
                   reading, one clock for every process of the machine) the threads run until
                   the window [start + warmup, start + warmup + seconds) is over (widened if
                   no put of this process ended in it: `WIDEN_LIMIT`); then it prints how many
                   puts ended in the window, the window's length, their latencies, and the
                   process's CPU time and voluntary context switches over it.
    flush ENTRIES  puts ENTRIES dirty entries (the options given hold the flusher back); after
                   {"ready"}, on {"go"} calls flush() and prints when it started and ended.
  {"put": key, "value": v}
        put, then print the monotonic time the put returned
  {"watch": key, "value": v, "poll": s, "timeout": s}
        get(key) once, print {"watching"}, then get it every `poll` seconds until it returns
        `value` (or `timeout` passed); print when the first get that returned it ended, and
        every get's latency
  {"loop": keys, "warmup": s, "seconds": s}
        get the keys in turn for warmup + seconds (or until a get ended in the counting
        window, as acks widens it); print the gets that ended in the window, its length and
        their latencies
  {"stats": true}     print cache.stats()
  {"close": true}     close the cache (it flushes what is dirty), print {"closed"}

The processes are synchronised by these messages only: a worker does nothing timed until told.
At end of input it closes its cache, if one is open, and exits. A worker is reused from trial
to trial (starting a Python process costs more than a smoke run's whole trial), but every trial
opens a fresh directory: nothing but the interpreter carries over.
"""

from __future__ import annotations

import json
import resource
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import wbcache
from bench.harness import ended_in

WIDEN_LIMIT = 30.0
"""Seconds past its end a counting window may be widened, at most, until a call has ended in
it. A --smoke trial counts for 0.04 s: on a loaded machine (load 9 on 2 cores) a worker can be
scheduled too late to end a single durable put in that window, or read its "start" after the
window is over, and a row that measured nothing failed ("no put ended within the 0.04 s
window"). As the in-process harness does (bench/harness.py, run_threads), the window then
widens until a put of this process has ended in it, and the rate is taken over the widened
window, so a smoke row still proves that puts are acknowledged and reports a rate, rather than
failing on the machine's load (a larger smoke window would only move the threshold, and slow
every smoke run). A full or quick trial (0.45 s and more) is practically never widened, and
the row's note says so when it is. Bounded (well under the benchmark's REPORT_TIMEOUT), so
that puts that never return still fail the row ("no put ended within ..."), not hang it."""


def key_for(worker: int, thread: int, seq: int) -> str:
    return f"w{worker}:t{thread}:{seq:09d}"


def value_for(seq: int) -> dict[str, Any]:
    """About 50 bytes encoded, as the benchmark's other write rows."""
    return {"id": seq, "name": f"user-{seq:08d}", "score": seq / 2, "tags": ["a", "b"]}


def say(message: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


def listen() -> dict[str, Any] | None:
    """The next message, or None at end of input."""
    line = sys.stdin.readline()
    return json.loads(line) if line else None


def main() -> None:
    cache: wbcache.Cache | None = None
    try:
        while (message := listen()) is not None:
            if "open" in message:
                cache = wbcache.open(message["open"], shared=True, **message["options"])
                job = message.get("job")
                if job is None:
                    say({"ready": True})
                else:
                    JOBS[job](cache, message["index"], *message["args"])
            elif cache is None:
                raise ValueError(f"{message!r} before any open")
            elif "close" in message:
                cache.close()
                cache = None
                say({"closed": True})
            elif "put" in message:
                cache.put(message["put"], message["value"])
                say({"ack": time.monotonic()})
            elif "watch" in message:
                _watch(cache.get, message)
            elif "loop" in message:
                _loop(cache.get, message)
            elif "stats" in message:
                say({"stats": cache.stats()})
            else:
                raise ValueError(f"unknown message {message!r}")
    finally:
        if cache is not None:
            cache.close()


def acks(cache: wbcache.Cache, worker: int, threads: int) -> None:
    ends: list[list[float]] = [[] for _ in range(threads)]
    latencies: list[list[float]] = [[] for _ in range(threads)]
    errors: list[BaseException] = []
    go = threading.Event()
    running = threading.Event()  # cleared when the window is over (or a put failed)
    running.set()

    def run(thread: int) -> None:
        put, clock, more = cache.put, time.monotonic, running.is_set
        end_of, lat_of = ends[thread].append, latencies[thread].append
        values = [value_for(seq) for seq in range(64)]
        go.wait()
        seq = 0
        try:
            while more():
                key, value = key_for(worker, thread, seq), values[seq & 63]
                began = clock()
                put(key, value)
                done = clock()
                end_of(done)
                lat_of(done - began)
                seq += 1
        except BaseException as exc:  # reported to the benchmark
            errors.append(exc)
            running.clear()

    workers = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(threads)]
    for thread in workers:
        thread.start()
    say({"ready": True})
    message = listen()
    if message is None:
        running.clear()
        go.set()
        return
    first = message["start"] + message["warmup"]
    last = first + message["seconds"]
    go.set()
    _sleep_until(first)
    before = resource.getrusage(resource.RUSAGE_SELF)
    _sleep_until(last)
    limit = last + WIDEN_LIMIT
    while running.is_set() and not ended_in(ends, first, last) and last < limit:
        time.sleep(0.01)
        last = time.monotonic()
    after = resource.getrusage(resource.RUSAGE_SELF)
    running.clear()
    for thread in workers:
        thread.join()
    if errors:
        raise errors[0]
    kept = [lat for thread_ends, thread_lats in zip(ends, latencies, strict=True)
            for end, lat in zip(thread_ends, thread_lats, strict=True) if first <= end < last]
    say({"count": len(kept), "seconds": last - first,
         "latencies": [round(lat, 7) for lat in kept],
         "cpu": after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime,
         "voluntary": after.ru_nvcsw - before.ru_nvcsw})


def flush(cache: wbcache.Cache, worker: int, entries: int) -> None:
    values = [value_for(seq) for seq in range(64)]
    chunk = 1_000
    for start in range(0, entries, chunk):
        cache.put_many((key_for(worker, 0, seq), values[seq & 63])
                       for seq in range(start, min(start + chunk, entries)))
    dirty = cache.stats()["dirty"]
    if dirty != entries:
        raise RuntimeError(f"{dirty} dirty entries, not {entries}: the cache flushed on its own")
    say({"ready": True})
    if listen() is None:
        return
    started = time.monotonic()
    cache.flush()
    say({"start": started, "end": time.monotonic()})


def _watch(get: Callable[..., Any], message: dict[str, Any]) -> None:
    key, wanted, poll = message["watch"], message["value"], message["poll"]
    clock = time.monotonic
    get(key)
    say({"watching": True})
    latencies = []
    deadline = clock() + message["timeout"]
    while True:
        began = clock()
        value = get(key)
        done = clock()
        latencies.append(done - began)
        if value == wanted:
            say({"seen": done, "latencies": latencies})
            return
        if done > deadline:
            say({"seen": None, "latencies": latencies})
            return
        time.sleep(poll)  # the polling period: what a reader waiting for news would do


def _loop(get: Callable[..., Any], message: dict[str, Any]) -> None:
    keys, clock = message["loop"], time.monotonic
    first = clock() + message["warmup"]
    last = first + message["seconds"]
    limit = last + WIDEN_LIMIT
    latencies = []
    while True:
        for key in keys:
            began = clock()
            get(key)
            done = clock()
            if done >= last and not latencies and done < limit:
                # No get ended in the window (this process was not scheduled in it, or got
                # the message after it): widen it to this get's end, as acks does.
                last = done + 1e-9
            if first <= done < last:
                latencies.append(done - began)
        if done >= last:
            break
    say({"count": len(latencies), "seconds": last - first,
         "latencies": [round(lat, 8) for lat in latencies]})


def _sleep_until(deadline: float) -> None:
    while (left := deadline - time.monotonic()) > 0:
        time.sleep(min(left, 0.05))


JOBS: dict[str, Callable[..., None]] = {"acks": acks, "flush": flush}

if __name__ == "__main__":
    main()
