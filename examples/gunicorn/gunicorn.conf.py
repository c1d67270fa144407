"""gunicorn settings for app.py: 4 sync workers sharing one wbcache directory.

preload_app opens the cache once in the master, at import; every worker, right after gunicorn
forks it, calls `cache.reopen()`, which gives the worker a lane of its own in the shared
directory (a worker that used the inherited cache without reopening would get
ForkedCacheError). A worker that dies leaves its lane to the next one, or to any live worker's
sweep: nothing it acknowledged is lost.
"""

from __future__ import annotations

from typing import Any

bind = "127.0.0.1:8000"
workers = 4
preload_app = True


def post_fork(server: Any, worker: Any) -> None:
    from app import cache

    cache.reopen()
