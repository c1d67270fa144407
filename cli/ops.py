"""Operating a cache directory: `recover`, `inspect`, `verify`, `stats`, `dump`, `get`.

The commands live in `ops_recover.py`, `ops_inspect.py`, `ops_stats.py` and `ops_data.py`;
they are thin over `wbcache.maintenance` (which comes into a directory through
`wbcache.directory`: layout, locks, the backend registry) and `wbcache.recovery`.
`ops_output.py` holds what they share (the DIR argument, --json, progress, tables) and
`ops_encoding.py` the JSON encoding of keys and values. Documented in docs/cli.md.
"""

from __future__ import annotations

import click

from wbcache.cli.ops_data import dump, get
from wbcache.cli.ops_inspect import inspect, verify
from wbcache.cli.ops_recover import recover
from wbcache.cli.ops_stats import stats

COMMANDS: list[click.Command] = [recover, inspect, verify, stats, dump, get]
