"""What the operating commands share: the DIR argument, `--json`, `--backend`, tables, progress,
staleness, the fields of a shared directory's lanes.

Human output goes to stdout, warnings and progress to stderr; with `--json`, stdout holds
exactly one JSON object (errors included, see `WbcacheGroup`), so `| jq` always works.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

import click

from wbcache.backends.postgres_secrets import redact
from wbcache.cli import BadBackendUrl, WbcacheGroup
from wbcache.cli.ops_encoding import dumps_json
from wbcache.errors import WbcacheError
from wbcache.maintenance import DirectorySnapshot, LogView, open_snapshot
from wbcache.recovery.replay import PROGRESS_EVERY

F = TypeVar("F", bound=Callable[..., Any])
BACKEND_VARIABLE = "WBCACHE_BACKEND"


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
    """The document, indented; a value in it may nest past the recursion limit (`dumps_json`)."""
    click.echo(dumps_json(document, indent=2))


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


def backend_option(function: F) -> F:
    """--backend URL, or WBCACHE_BACKEND: the database of a directory that does not flush into
    its own LMDB. Never printed but through `redact`."""
    return click.option(
        "--backend", "backend", metavar="URL", envvar=BACKEND_VARIABLE, default=None,
        callback=lambda _ctx, _param, value: value or None,
        help="For a directory that flushes into PostgreSQL: the URL of its database, as the "
             "cache opens it (e.g. postgresql://user@host/db?table=wbcache). The directory "
             f"never stores it. Default: the environment variable {BACKEND_VARIABLE}, which "
             "keeps a password off the command line. Refused for a directory of its own "
             "LMDB.",
    )(function)


@contextmanager
def backend_errors(url: str | None) -> Iterator[None]:
    """Around opening a directory's database by URL: a bad URL is a usage error, a missing
    driver a failure; one line each, the password hidden."""
    try:
        yield
    except ValueError as exc:
        if url is None:
            raise
        raise BadBackendUrl(f"--backend / {BACKEND_VARIABLE}: {redact(str(exc))}") from None
    except ImportError as exc:
        if url is None:
            raise
        raise WbcacheError(redact(str(exc))) from None


def open_directory(directory: str, backend: str | None) -> DirectorySnapshot:
    """The read-only view every read-only command works on (`open_snapshot`)."""
    with backend_errors(backend):
        return open_snapshot(directory, backend=backend)


def warn_if_stale(snapshot: DirectorySnapshot, *, reads_live_lanes: bool) -> None:
    """Read-only commands run beside live caches, but say what that means. In a shared
    directory `reads_live_lanes` says whether a live lane's log is read (inspect, verify) or
    left out of the data shown (stats, dump, get: its cache flushes it)."""
    if not snapshot.live_owner:
        return
    if not snapshot.shared:
        owner = f" (pid {snapshot.owner_pid})" if snapshot.owner_pid is not None else ""
        click.echo(f"warning: {snapshot.path} is in use by a live cache{owner}; this view may "
                   f"be stale", err=True)
        return
    live = [log for log in snapshot.logs if log.in_use]
    names = ", ".join(log.lane + (f" (pid {log.owner_pid})" if log.owner_pid else "")
                      for log in live if log.lane is not None)
    one = len(live) == 1
    if reads_live_lanes:
        what = ("its log is read as it stands" if one else
                "their logs are read as they stand") + ": this view may be stale"
    else:
        what = ("what it has not flushed yet is not shown (its cache flushes it)" if one else
                "what they have not flushed yet is not shown (their caches flush it)")
    lanes = f"lane {names} in use by a live cache" if one else \
        f"lanes {names} in use by live caches"
    click.echo(f"warning: {snapshot.path}: {lanes}; {what}", err=True)


def owner_fields(snapshot: DirectorySnapshot, url: str | None) -> dict[str, Any]:
    """What every read-only command's JSON says about the directory and its database."""
    return {"shared": snapshot.shared, "database_kind": snapshot.kind,
            "database_url": redact(url) if url is not None else None,
            "live_owner": snapshot.live_owner, "owner_pid": snapshot.owner_pid}


def lane_fields(log: LogView) -> dict[str, Any]:
    """The fields every JSON `lanes` row starts with."""
    return {"lane": log.lane, "path": log.layout.root, "cache_id": log.cache_id,
            "in_use": log.in_use, "owner_pid": log.owner_pid,
            "checkpoint_lsn": log.checkpoint}


def totals(lanes: list[dict[str, Any]], names: tuple[str, ...]) -> dict[str, int]:
    """Each of `names` summed over the JSON `lanes` rows given."""
    return {name: sum(lane[name] for lane in lanes) for name in names}


def lane_owner(log: LogView) -> str:
    if not log.in_use:
        return "free"
    return f"pid {log.owner_pid}" if log.owner_pid is not None else "in use"


class LogProgress:
    """A progress bar on stderr while logs are read, only on a terminal and never with --json.
    `update(phase, done, estimate)` fits `wbcache.maintenance.Progress`: a bar per phase
    ("reading": every log read, nothing written; "replaying"), shown from 65,536 records on;
    the estimate may be revised, and each phase ends with a report of its true total."""

    LABELS = {"reading": "reading the log", "replaying": "replaying the log"}

    def __init__(self, *, as_json: bool) -> None:
        self.enabled = not as_json and sys.stderr.isatty()
        self._phase = ""
        self._bar: Any = None
        self._shown = 0

    def update(self, phase: str, done: int, estimate: int) -> None:
        if not self.enabled:
            return
        if phase != self._phase:
            self._end_bar()
            self._phase = phase
        if self._bar is None and done < PROGRESS_EVERY:
            return  # a bar appears with the first report (65,536 records): long logs only
        if self._bar is None:
            self._bar = click.progressbar(length=max(estimate, 1),
                                          label=self.LABELS.get(phase, phase), file=sys.stderr,
                                          show_pos=True, show_eta=True)
            self._bar.__enter__()
            self._shown = 0
        self._bar.length = max(estimate, done, 1)
        self._bar.update(done - self._shown)
        self._shown = done

    def __enter__(self) -> LogProgress:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _end_bar(self) -> None:
        if self._bar is not None:
            self._bar.__exit__(None, None, None)
            self._bar = None

    def close(self) -> None:
        """End the bar's line (before a prompt, or when done); further updates are ignored."""
        self._end_bar()
        self.enabled = False
