"""A worker process for the shared-directory tests: threads incrementing shared counters in one
shared directory until killed.

Each increment is a batch of two operations, `incr(counter)` and `put(marker, 1)` with a marker
key no other increment uses, so after any crash the markers that survived say exactly which
increments did (a batch is one record: both or neither). Every acknowledged increment is also
appended to the worker's acknowledgement file (one unbuffered write each), so the test knows a
lower bound that no crash may break.

    python tests/shared_worker.py DIR WORKER INCARNATION THREADS COUNTERS ACKFILE [OPTION=VALUE...]
"""

from __future__ import annotations

import os
import random
import sys
import threading

import wbcache


def counter_key(index: int) -> str:
    return f"counter:{index:03d}"


def marker_key(worker: int, incarnation: int, thread: int, seq: int, counter: int) -> str:
    return f"marker:{worker}:{incarnation}:{thread}:{seq}:{counter:03d}"


def main() -> None:
    directory, worker, incarnation, threads, counters, ackfile = sys.argv[1:7]
    options = {name: float(value) for name, value in
               (arg.split("=", 1) for arg in sys.argv[7:])}
    cache = wbcache.open(directory, shared=True, **options)
    acks = os.open(ackfile, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    os.write(acks, b"open\n")

    def count(thread: int) -> None:
        rng = random.Random(f"{worker}:{incarnation}:{thread}")
        seq = 0
        while True:
            index = rng.randrange(int(counters))
            with cache.batch() as batch:
                batch.incr(counter_key(index))
                batch.put(marker_key(int(worker), int(incarnation), thread, seq, index), 1)
            os.write(acks, f"{index}\n".encode())
            seq += 1

    for thread in range(int(threads)):
        threading.Thread(target=count, args=(thread,), daemon=True).start()
    threading.Event().wait()  # until killed


if __name__ == "__main__":
    main()
