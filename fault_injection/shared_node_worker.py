"""One process of a shared directory (`wbcache.open(dir, shared=True)`) counting until killed.

    python -m wbcache.fault_injection.shared_node_worker '<SharedDirConfig as JSON>'

The shared-directory half of lazyfs_multi.py: the node worker's workload (counters.py: each
write one batch of `incr` on a counter every process shares, the thread's marker, and now and
then a value) and its journal (READY, MARKER, START, ACK, ERROR; node_worker.py), but over a
shared directory, where each process writes through a lane of its own into one LMDB database,
instead of over PostgreSQL. The keys name the process by `node`, as a node's do, so the
multi-node ledger (ledger.py) judges both campaigns alike.

Each thread first reads its marker (what the database or an adopted lane kept of that thread)
and goes on from there. It never stops by itself: the harness kills it.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

import wbcache
from wbcache.fault_injection.journal import Journal
from wbcache.fault_injection.node_worker import serve


@dataclass
class SharedDirConfig:
    module: ClassVar[str] = "wbcache.fault_injection.shared_node_worker"

    directory: str  # the shared directory
    node: int  # this process's number in the keys (the harness gives each run a new one)
    threads: int = 4
    options: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> SharedDirConfig:
        return cls(**json.loads(text))


def run(config: SharedDirConfig) -> None:
    journal = Journal(1)
    cache = wbcache.open(config.directory, shared=True, **config.options)
    serve(cache, journal, config.node, config.threads)


if __name__ == "__main__":
    run(SharedDirConfig.from_json(sys.argv[1]))
