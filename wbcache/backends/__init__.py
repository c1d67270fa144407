"""Database backends: the protocol and the embedded LMDB default."""

from __future__ import annotations

from wbcache.backends.base import Backend, Key
from wbcache.backends.lmdb import LmdbBackend

__all__ = ["Backend", "Key", "LmdbBackend"]
