"""Database backends: the protocol, and the registry that picks one.

The core never imports a concrete backend: a URL's scheme names one here, and the module that
implements it is imported only then (so `import wbcache` does not load psycopg, and
`import wbcache.wal` loads no database at all). The embedded default is LMDB, in `DIR/db/`.
"""

from __future__ import annotations

import importlib
from typing import Any
from urllib.parse import urlsplit

from wbcache.backends.base import Backend, CheckpointTokens, Key
from wbcache.layout import EMBEDDED_KIND

# kind or URL scheme -> (module, class). A backend class has `from_url(url)` if it has a URL.
_REGISTRY: dict[str, tuple[str, str]] = {
    "lmdb": ("wbcache.backends.lmdb", "LmdbBackend"),
    "postgresql": ("wbcache.backends.postgres", "PostgresBackend"),
    "postgres": ("wbcache.backends.postgres", "PostgresBackend"),
}
EMBEDDED = EMBEDDED_KIND  # the database in DIR/db/


def backend_class(kind: str) -> Any:
    """The class of the backend registered under `kind` (imported now)."""
    module, name = _REGISTRY[kind]
    return getattr(importlib.import_module(module), name)


def backend_from_url(url: str, **options: Any) -> Backend:
    """A backend made from a URL ("postgresql://user@host/db?table=t"), by its scheme, with
    keyword `options` for its class. Raises ValueError (the password never in the message)
    for an unknown scheme."""
    backend: Backend = _url_class(url).from_url(url, **options)
    return backend


def url_target(url: str) -> tuple[str, str | None]:
    """The kind of database `url` names and the table its data would go to (None for a class
    without `url_table`), read from the URL alone: checked against a directory before any
    connection is made (which may create tables). ValueError as `backend_from_url`."""
    cls = _url_class(url)
    url_table = getattr(cls, "url_table", None)
    return cls.kind, None if url_table is None else url_table(url)


def _url_class(url: str) -> Any:
    scheme = urlsplit(url).scheme
    if scheme not in _REGISTRY or scheme == EMBEDDED:
        schemes = ", ".join(f"{name}://" for name in _REGISTRY if name != EMBEDDED)
        raise ValueError(f"backend URL scheme {scheme + '://' if scheme else '(none)'} is not "
                         f"one wbcache knows ({schemes})")
    return backend_class(scheme)


def embedded_backend(path: str, *, map_size: int) -> Backend:
    """The embedded database (LMDB) at `path`."""
    backend: Backend = backend_class(EMBEDDED)(path, map_size=map_size)
    return backend


def __getattr__(name: str) -> Any:
    # `from wbcache.backends import LmdbBackend` keeps working, importing it on first use.
    for kind, (_, class_name) in _REGISTRY.items():
        if class_name == name:
            return backend_class(kind)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["Backend", "CheckpointTokens", "EMBEDDED", "Key", "backend_class", "backend_from_url",
           "embedded_backend"]
