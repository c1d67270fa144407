"""Operating a cache directory: recover, inspect, verify, dump, get, stats (issue #3).

Placeholder while the commands are built: it registers none.
"""

from __future__ import annotations

import click

COMMANDS: list[click.Command] = []
