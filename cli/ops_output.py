"""What the operating commands share: the DIR argument, `--json`, tables, progress, staleness.

Human output goes to stdout, warnings and progress to stderr; with `--json`, stdout holds
exactly one JSON object (errors included, see `WbcacheGroup`), so `| jq` always works.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import click

from wbcache import DirectorySnapshot
from wbcache.cli import WbcacheGroup

F = TypeVar("F", bound=Callable[..., Any])


def _remember(key: str) -> Callable[[click.Context, click.Parameter, Any], Any]:
    def callback(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
        ctx.meta[key] = value
        return value
    return callback


def directory_argument(function: F) -> F:
    """The DIR argument. Checked by `wbcache.maintenance`, not click, so every problem with it is
    one line with the documented exit code."""
    argument = click.argument("directory", metavar="DIR",
                              callback=_remember(WbcacheGroup.DIR_META))
    return argument(function)


def json_option(function: F) -> F:
    return click.option(
        "--json", "as_json", is_flag=True, callback=_remember(WbcacheGroup.JSON_META),
        help="Print one JSON object instead of text: the same figures under stable "
             "snake_case names; an error is {\"ok\": false, \"exit_code\": N, \"error\": "
             "KIND, \"message\": TEXT}.",
    )(function)


def emit_json(document: dict[str, Any]) -> None:
    click.echo(json.dumps(document, indent=2))


def number(value: int) -> str:
    return f"{value:,}"


def count(value: int, noun: str, plural: str | None = None) -> str:
    """`3 segments`, `1 segment`."""
    return f"{value:,} {noun if value == 1 else plural or noun + 's'}"


def rows(items: Sequence[tuple[str, str, str]], indent: int = 2) -> None:
    """Print (label, value, note) rows: labels left, values right-aligned in one column."""
    width = max(len(label) for label, _, _ in items)
    values = max(len(value) for _, value, _ in items)
    for label, value, note in items:
        line = f"{' ' * indent}{label:<{width}}  {value:>{values}}"
        click.echo(f"{line}  {note}" if note else line)


def table(header: Sequence[str], body: Sequence[Sequence[str]], *, right: set[int]) -> None:
    """Columns sized to fit; the columns in `right` right-aligned."""
    widths = [max([len(header[i])] + [len(row[i]) for row in body]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(cell.rjust(widths[i]) if i in right else cell.ljust(widths[i])
                         for i, cell in enumerate(cells)).rstrip()

    click.echo(line(header))
    for row in body:
        click.echo(line(row))


def warn_if_stale(snapshot: DirectorySnapshot) -> None:
    """Read-only commands run on a directory a live cache owns, but say what that means."""
    if snapshot.live_owner:
        owner = f" (pid {snapshot.owner_pid})" if snapshot.owner_pid is not None else ""
        click.echo(f"warning: {snapshot.path} is in use by a live cache{owner}; this view may "
                   f"be stale", err=True)


def owner_fields(snapshot: DirectorySnapshot) -> dict[str, Any]:
    return {"live_owner": snapshot.live_owner, "owner_pid": snapshot.owner_pid}


class LogProgress:
    """A progress bar on stderr while the log is read, only on a terminal and never with
    --json. `update(done, estimate)` fits `wbcache.maintenance.Progress`; the estimate of the
    total may be revised as records are read."""

    def __init__(self, *, as_json: bool, label: str) -> None:
        self.enabled = not as_json and sys.stderr.isatty()
        self._label = label
        self._bar: Any = None
        self._shown = 0

    def update(self, done: int, estimate: int) -> None:
        if not self.enabled or (self._bar is None and done == 0):
            return  # the bar appears with the first report (65,536 records): long logs only
        if self._bar is None:
            self._bar = click.progressbar(length=max(estimate, 1), label=self._label,
                                          file=sys.stderr, show_pos=True, show_eta=True)
            self._bar.__enter__()
        self._bar.length = max(estimate, done, 1)
        self._bar.update(done - self._shown)
        self._shown = done

    def finish(self, done: int) -> None:
        """The log is read: `done` records in all, so the bar ends full."""
        if self._bar is not None:
            self._bar.length = max(done, 1)
            self._bar.update(done - self._shown)
            self._shown = done

    def __enter__(self) -> LogProgress:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """End the bar's line (before a prompt, or when done); further updates are ignored."""
        if self._bar is not None:
            self._bar.__exit__(None, None, None)
            self._bar = None
        self.enabled = False
