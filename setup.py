"""The one thing pyproject.toml cannot declare: the reader's optional C fast path.

`wal/_walk.c` is built when a C compiler, the Python headers and zlib's headers are there;
without them the build goes on and wbcache reads its log in Python alone, with the same
results, more slowly (wal/reader.py, `_scan`). WBCACHE_REQUIRE_C=1 makes a failed build an
error (mutants/ builds its copies so: a mutation that does not compile must not pass for one
that tests miss)."""

import os

from setuptools import Extension, setup

setup(ext_modules=[Extension("wbcache.wal._walk", ["wal/_walk.c"], libraries=["z"],
                             optional=os.environ.get("WBCACHE_REQUIRE_C") != "1")])
