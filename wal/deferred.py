"""Log lines said where logging is not safe, logged in order from a thread of their own.

A logging handler is the application's code, with a lock of its own, and may use the cache:
run under the sequencer's lock it would stall every writer, or deadlock on that lock; run in
the flusher's thread it may write to a cache whose backpressure only that thread can relieve.
So the log's failure (wal/commit.py) and the flusher's reports (wbcache/flusher.py) are handed
to `log_later`, which queues them; one short-lived thread, started when the queue was empty,
logs them in the order said and ends once it has emptied the queue. It is not a daemon: a
process that exits right after still logs them. Where no thread can be started (interpreter
shutdown, a pids limit) they are logged in place.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import deque

_lock = threading.Lock()  # a leaf: held for a deque operation or a flag, never across a log
_lines: deque[tuple[logging.Logger, int, str, tuple[object, ...]]] = deque()
_running = False  # a thread is logging the queue (or a caller, in place)


def log_later(logger: logging.Logger, level: int, message: str, *args: object) -> None:
    """Log `message % args` at `level` soon, from a thread that holds none of the caller's
    locks; lines said one after another are logged in that order."""
    global _running
    with _lock:
        _lines.append((logger, level, message, args))
        if _running:
            return
        _running = True
    try:
        # daemon=False: not inherited from a daemon caller (the flusher's thread)
        threading.Thread(target=_drain, name="wbcache-log", daemon=False).start()
    except RuntimeError:  # no thread to be had: log here
        _drain()


def _drain() -> None:
    global _running
    while True:
        with _lock:
            if not _lines:
                _running = False
                return
            logger, level, message, args = _lines.popleft()
        try:
            logger.log(level, message, *args)
        except Exception:  # a filter that raises (handlers catch their own): the rest still go
            pass


def _forget_in_child() -> None:
    """A forked child: the lines are the parent's to log, and its lock may be held."""
    global _lock, _running
    _lock = threading.Lock()
    _lines.clear()
    _running = False


os.register_at_fork(after_in_child=_forget_in_child)
