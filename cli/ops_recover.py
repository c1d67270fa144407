"""`wbcache recover`: replay the log into the database, as opening the cache would, from outside.

Thin over `wbcache.maintenance.recover_directory`; this module only asks, prints and maps the
outcome to an exit code.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import click

from wbcache import RecoverOutcome, recover_directory
from wbcache.cli import CommandFailed
from wbcache.cli.ops_output import (
    LogProgress,
    directory_argument,
    emit_json,
    json_option,
    number,
    rows,
)
from wbcache.recovery.salvage import SalvageReport


@click.command()
@directory_argument
@click.option("--dry-run", is_flag=True,
              help="Read the whole log and report what would be done; change nothing.")
@click.option("--salvage", is_flag=True,
              help="If the log is damaged: replay it up to the damage and move the damaged "
                   "segment and every one after it into DIR/quarantine/ (never deleted).")
@click.option("--yes", "-y", is_flag=True,
              help="With --salvage: set segments aside without asking first.")
@json_option
def recover(directory: str, dry_run: bool, salvage: bool, yes: bool, as_json: bool) -> None:
    """Replay into the database every log record it lacks, then delete the log.

    Does what opening the cache does, without opening it: afterwards `wbcache.open` replays
    nothing. A torn tail (a write cut off by a crash, never acknowledged) is dropped and
    counted. Running it twice is safe: the second run replays nothing.

    Damage anywhere else in the log is refused (exit 1, naming the segment and byte offset)
    and nothing is changed; --salvage then keeps everything before the damage and sets the
    rest aside in DIR/quarantine/.

    \b
    Examples:
      wbcache recover /var/lib/myapp/cache
      wbcache recover --dry-run --json /var/lib/myapp/cache
      wbcache recover --salvage --dry-run /var/lib/myapp/cache

    \b
    Exit status: 0 recovered (or nothing to do); 1 damaged log (nothing changed) or another
    failure; 2 usage error or not a cache directory; 3 the directory is in use by a live cache
    (also for --dry-run).
    """

    if yes and not salvage:
        raise click.UsageError("--yes only answers --salvage's question; without --salvage "
                               "there is nothing to confirm (add --salvage, or drop --yes)")

    def confirm(planned: SalvageReport) -> None:
        if yes:
            return
        progress.close()
        click.echo("the log is damaged; --salvage will set this aside:", err=True)
        _print_set_aside(planned, err=True)
        try:
            confirmed = click.confirm("Recover up to the damage and move these segments into "
                                      "the quarantine?", err=True)
        except click.Abort:  # input ended (no terminal) or was interrupted: no answer
            raise CommandFailed(
                "no confirmation was given (no terminal to ask on, or the input ended): "
                "nothing was changed; run again with --yes to set these segments aside "
                "without asking") from None
        if not confirmed:
            raise CommandFailed("not confirmed: nothing was changed")

    with LogProgress(as_json=as_json, label="reading the log") as progress:
        outcome = recover_directory(directory, dry_run=dry_run, salvage=salvage,
                                    progress=progress.update, confirm=confirm)
        progress.finish(outcome.report.records)
    if as_json:
        emit_json(recover_document(outcome))
    else:
        _print_outcome(outcome)


def recover_document(outcome: RecoverOutcome) -> dict[str, Any]:
    """The --json object: RecoveryReport's fields plus the path, the mode and what was set aside."""
    return {
        "ok": True,
        "path": outcome.path,
        **dataclasses.asdict(outcome.report),
        "salvage": outcome.salvage,
        "set_aside": outcome.set_aside.as_dict() if outcome.set_aside is not None else None,
    }


def _print_outcome(outcome: RecoverOutcome) -> None:
    report = outcome.report
    if report.dry_run:
        click.echo(f"dry run, nothing changed: recovering {outcome.path} would replay "
                   f"{number(report.replayed)} log records")
    else:
        click.echo(f"recovered {outcome.path}: replayed {number(report.replayed)} log records "
                   f"into the database")
    torn_note = (f"end of {os.path.basename(report.torn_segment)}"
                 if report.torn_segment else "")
    rows([
        ("segments read", number(report.segments), ""),
        ("records read", number(report.records), ""),
        ("records replayed", number(report.replayed), "newer than the checkpoint"),
        ("distinct keys", number(report.keys), ""),
        ("torn tail bytes dropped", number(report.torn_bytes), torn_note),
        ("checkpoint before", number(report.checkpoint_before), ""),
        ("checkpoint after", number(report.checkpoint_after), ""),
        ("seconds", f"{report.seconds:.2f}", ""),
    ])
    if outcome.set_aside is not None:
        verb = "would be set aside" if report.dry_run else "set aside"
        where = outcome.set_aside.quarantine_dir
        click.echo(f"\nthe log is damaged; {verb}" + (f" in {where}/:" if where else ":"))
        _print_set_aside(outcome.set_aside, err=False)
    elif outcome.salvage:
        click.echo("\nno damage found: nothing set aside")


def _print_set_aside(report: SalvageReport, *, err: bool) -> None:
    for item in report.segments:
        if item.reason is not None:
            what = f"damaged at byte offset {item.offset:,}: {item.reason}"
        else:
            what = "follows the damage"
        click.echo(f"  {item.name}  {item.size:,} bytes, {what}", err=err)
    lsns = (f"LSNs {report.first_lsn:,}..{report.last_lsn:,}"
            if report.first_lsn is not None and report.last_lsn is not None else "")
    click.echo(f"  records set aside           {report.records_set_aside:>12,}  {lsns}".rstrip(),
               err=err)
    if report.records_unreadable:
        click.echo(f"  records unreadable          {report.records_unreadable:>12,}  "
                   f"(destroyed by the damage)", err=err)
    if report.records_in_database:
        click.echo(f"  ...already in the database  {report.records_in_database:>12,}  "
                   f"(nothing lost)", err=err)
    click.echo(f"  bytes set aside             {report.bytes_set_aside:>12,}", err=err)
