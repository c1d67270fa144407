"""One node of the multi-node campaign: a worker process writing shared counters until killed.

    WBCACHE_NODE_URL=<URL> python -m wbcache.fault_injection.node_worker '<NodeConfig as JSON>'

It opens its cache directory over the shared database (recovering whatever its last kill
left), reports READY, then runs `threads` writer threads of the counter workload (counters.py).
Each thread first reads its marker and reports it (MARKER: what recovery kept of that thread),
then journals START before each write and ACK after the batch returned, each one unbuffered
write, so the journal holds every acknowledgement made before the SIGKILL. With `record`, the
backend is wrapped in a `JournaledBackend`, so the harness can kill while a flush commits or
right after (while the log is truncated). It never stops by itself: the harness kills it.
"""

from __future__ import annotations

import json
import os
import sys
import threading
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

import wbcache
from wbcache.fault_injection.backends import JournaledBackend
from wbcache.fault_injection.counters import marker_key, write
from wbcache.fault_injection.journal import ACK, ERROR, MARKER, READY, START, Journal

# The database URL reaches the worker in its environment, not on its command line, which any
# local user can read (ps): the URL may hold a password.
URL_VARIABLE = "WBCACHE_NODE_URL"


@dataclass
class NodeConfig:
    module: ClassVar[str] = "wbcache.fault_injection.node_worker"

    directory: str
    url: str  # the shared database: a postgresql:// URL naming the campaign's table
    node: int
    threads: int = 8
    options: dict[str, Any] = field(default_factory=dict)
    record: bool = False  # journal each database commit (DB_BEGIN, DB_DONE), without data

    def to_json(self) -> str:
        """Everything but the URL (see `environment`)."""
        fields = asdict(self)
        del fields["url"]
        return json.dumps(fields)

    @classmethod
    def from_json(cls, text: str) -> NodeConfig:
        return cls(url=os.environ[URL_VARIABLE], **json.loads(text))

    def environment(self) -> dict[str, str]:
        """What the worker's environment must hold besides `to_json()` on its command line."""
        return {URL_VARIABLE: self.url}


def run(config: NodeConfig) -> None:
    journal = Journal(1)
    backend: Any = wbcache.PostgresBackend.from_url(config.url)
    if config.record:
        backend = JournaledBackend(backend, journal, with_data=False)
    cache = wbcache.open(config.directory, backend=backend, **config.options)
    serve(cache, journal, config.node, config.threads)


def serve(cache: wbcache.Cache, journal: Journal, node: int, threads: int) -> None:
    """Report READY with what the open recovered, then count from `threads` threads until
    killed (shared_node_worker.py serves a shared directory the same way)."""
    report = cache.recovery
    journal.emit(READY, os.getpid(), report.replayed, report.torn_bytes, report.checkpoint_after)
    writers = [threading.Thread(target=count_until_error, args=(cache, journal, node, thread),
                                daemon=True) for thread in range(threads)]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join()
    os._exit(1)  # every thread stopped on an error (journaled): the harness reports it


def count_until_error(cache: wbcache.Cache, journal: Journal, node: int, thread: int) -> None:
    """One writer thread: from its marker on, one journaled batch after another, until an
    error (journaled) or the kill. shared_node_worker.py runs the same over a shared
    directory."""
    try:
        n = cache.get(marker_key(node, thread), 0)  # what the database (or the log) kept
    except Exception as exc:  # reported, then this thread stops: the parent judges it
        journal.emit(ERROR, thread, 0, type(exc).__name__, str(exc))
        return
    journal.emit(MARKER, thread, n)
    while True:
        n += 1
        journal.emit(START, thread, n)
        try:
            with cache.batch() as batch:
                write(batch, node, thread, n)
        except Exception as exc:  # reported, then this thread stops: the parent judges it
            journal.emit(ERROR, thread, n, type(exc).__name__, str(exc))
            return
        journal.emit(ACK, thread, n, None)


if __name__ == "__main__":
    run(NodeConfig.from_json(sys.argv[1]))
