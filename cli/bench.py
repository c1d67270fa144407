"""`wbcache bench` (issue #5). Placeholder while it is built."""

from __future__ import annotations

import click


@click.command()
def bench() -> None:
    """Benchmarks (not built yet)."""
    raise click.ClickException("wbcache bench is not built yet")
