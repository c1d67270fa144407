"""The one thing pyproject.toml cannot declare: five optional C fast paths.

`wal/_walk.c` (the reader's walk over plain-put frames), `wal/_sync.c` (the group commit's
write and fdatasync in one call), `wal/_pipe.c` (the log written by a thread without the GIL,
under fsync="always"), `wbcache/_hit.c` (a cache hit) and `wbcache/backends/_pairs.c` (a
flush's LMDB puts) are built when a C compiler, the Python headers and zlib's headers are there;
without them the build goes on and wbcache runs in Python alone, with the same results, more
slowly (wal/reader.py, `_scan`; wal/writer.py, `_write_sync`; wal/commit.py, `Pipe`;
wbcache/hit_path.py;
wbcache/backends/lmdb.py, `_PairsInPython`). WBCACHE_REQUIRE_C=1 makes a failed build an error
(mutants/ builds its copies so: a mutation that does not compile must not pass for one that
tests miss)."""

import os

from setuptools import Extension, setup

optional = os.environ.get("WBCACHE_REQUIRE_C") != "1"
setup(ext_modules=[Extension("wbcache.wal._walk", ["wal/_walk.c"], libraries=["z"],
                             optional=optional),
                   Extension("wbcache.wal._sync", ["wal/_sync.c"], optional=optional),
                   Extension("wbcache.wal._pipe", ["wal/_pipe.c"], libraries=["z"],
                             optional=optional),
                   Extension("wbcache._hit", ["wbcache/_hit.c"], optional=optional),
                   Extension("wbcache.backends._pairs", ["wbcache/backends/_pairs.c"],
                             optional=optional)])
