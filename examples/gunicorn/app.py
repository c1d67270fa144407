"""A tiny WSGI app counting hits in a shared wbcache directory, for gunicorn with several
workers (see gunicorn.conf.py beside it, and README.md, "Running under gunicorn").

    POST /hit/<key>     count one hit; answers 200 with the new count only once it is durable
                        (right-aligned in 20 characters: load tools compare body lengths)
    GET  /count/<key>   this worker's view of the count (the database has the exact total)

The directory is $WBCACHE_EXAMPLE_DIR (default /tmp/wbcache-gunicorn-example).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import Any

import wbcache

# Opened at import: with preload_app the master opens it, and each worker reopens it on a lane
# of its own right after the fork (gunicorn.conf.py, post_fork).
cache = wbcache.open(os.environ.get("WBCACHE_EXAMPLE_DIR", "/tmp/wbcache-gunicorn-example"),
                     shared=True)


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    method, path = environ["REQUEST_METHOD"], environ.get("PATH_INFO", "")
    if method == "POST" and path.startswith("/hit/") and len(path) > 5:
        count = cache.incr(path[5:])  # durable when it returns; only then the 200
        return _answer(start_response, "200 OK", f"{count:>20}\n")  # one length for every answer
    if method == "GET" and path.startswith("/count/") and len(path) > 7:
        return _answer(start_response, "200 OK", f"{cache.get(path[7:], 0)}\n")
    return _answer(start_response, "404 Not Found", "POST /hit/<key> or GET /count/<key>\n")


def _answer(start_response: Callable[..., Any], status: str, text: str) -> list[bytes]:
    body = text.encode()
    start_response(status, [("Content-Type", "text/plain"),
                            ("Content-Length", str(len(body)))])
    return [body]
