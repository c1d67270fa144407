"""`python -m bench`: the same click command as `wbcache bench`, options and all."""

from __future__ import annotations

from wbcache.cli.bench import bench

if __name__ == "__main__":
    bench(prog_name="python -m bench")
