"""`wbcache torture` (issue #4). Placeholder while it is built."""

from __future__ import annotations

import click


@click.command()
def torture() -> None:
    """Fault-injection torture test (not built yet)."""
    raise click.ClickException("wbcache torture is not built yet")
