"""`python -m bench`, from the repository's root: see bench/cli.py and `python -m bench --help`."""

from __future__ import annotations

from bench.cli import bench

if __name__ == "__main__":
    bench(prog_name="python -m bench")
