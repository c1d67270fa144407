"""`wbcache recover`: replay the log into the database, as opening the cache would, from outside.

Thin over `wbcache.maintenance.recover_directory`; this module only asks, prints and maps the
outcome to an exit code.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import click

from wbcache.backends.postgres_secrets import redact
from wbcache.cli import EXIT_DAMAGE, EXIT_LOCKED, CommandFailed, WbcacheGroup
from wbcache.cli.ops_output import (
    LogProgress,
    backend_errors,
    backend_option,
    count,
    directory_argument,
    emit_json,
    json_option,
    number,
    rows,
    table,
)
from wbcache.maintenance import RecoverOutcome, recover_directory
from wbcache.recovery import RecoveryReport
from wbcache.recovery.salvage import SalvageReport


@click.command()
@directory_argument
@backend_option
@click.option("--dry-run", is_flag=True,
              help="Read the whole log and report what would be done; change nothing.")
@click.option("--salvage", is_flag=True,
              help="If a log is damaged: replay it up to the damage and move the damaged "
                   "segment and every one after it into the quarantine/ beside that log "
                   "(DIR/quarantine/, or the lane's own), never deleted.")
@click.option("--yes", "-y", is_flag=True,
              help="With --salvage: set segments aside without asking first.")
@json_option
def recover(directory: str, backend: str | None, dry_run: bool, salvage: bool, yes: bool,
            as_json: bool) -> None:
    """Replay into the database every log record it lacks, then delete the log.

    Does what opening the cache does, without opening it: afterwards `wbcache.open` replays
    nothing. A torn tail (a write cut off by a crash, never acknowledged) is dropped and
    counted. Running it twice is safe: the second run replays nothing.

    The whole log is read before anything is written: damage anywhere but a torn tail is
    refused (exit 1, naming the segment and byte offset) and nothing is changed; --salvage
    then keeps everything before the damage and sets the rest aside in DIR/quarantine/.

    A shared directory (many processes, a lane each): every free lane is recovered (its
    records replayed with its own checkpoint, its log deleted), as opening adopts an orphan;
    a lane a live cache holds is left alone and named (exit 3: its process recovers it).
    A directory that flushes into PostgreSQL is recovered into that database: give its URL
    with --backend or WBCACHE_BACKEND.

    \b
    Examples:
      wbcache recover /var/lib/myapp/cache
      wbcache recover --dry-run --json /var/lib/myapp/cache
      wbcache recover --salvage --dry-run /var/lib/myapp/cache

    \b
    Exit status: 0 recovered (or nothing to do); 1 a damaged log (nothing changed) or
    another failure; 2 usage error, not a cache directory, or a PostgreSQL directory without
    --backend; 3 the directory is in use by a live cache (nothing done; also for --dry-run),
    or, in a shared directory, some lanes are (the free ones were recovered).
    """

    if yes and not salvage:
        raise click.UsageError("--yes only answers --salvage's question; without --salvage "
                               "there is nothing to confirm (add --salvage, or drop --yes)")

    def confirm(planned: SalvageReport, lane: str | None) -> None:
        if yes:
            return
        progress.close()
        where = f"lane {lane}'s log" if lane is not None else "the log"
        click.echo(f"{where} is damaged; --salvage will set this aside:", err=True)
        _print_set_aside(planned, err=True)
        try:
            confirmed = click.confirm("Recover up to the damage and move these segments into "
                                      "the quarantine?", err=True)
        except click.Abort:  # input ended (no terminal) or was interrupted: no answer
            raise _refused("no confirmation was given (no terminal to ask on, or the input "
                           "ended): nothing was changed; run again with --yes to set these "
                           "segments aside without asking") from None
        if not confirmed:
            raise _refused("not confirmed: nothing was changed")

    with LogProgress(as_json=as_json) as progress, backend_errors(backend):
        outcome = recover_directory(directory, backend=backend, dry_run=dry_run,
                                    salvage=salvage, progress=progress.update,
                                    confirm=confirm)
    if as_json:
        emit_json(recover_document(outcome))
    elif outcome.lanes is not None:
        _print_shared_outcome(outcome)
    else:
        _print_outcome(outcome, redact(backend) if backend is not None else "the database")
    if outcome.skipped:
        names = ", ".join(lane.lane + (f" (pid {lane.owner_pid})" if lane.owner_pid else "")
                          for lane in outcome.skipped)
        plural = "s" if len(outcome.skipped) > 1 else ""
        click.echo(f"left alone: lane{plural} {names}, in use by a live cache (which recovers "
                   f"and flushes its own lane)", err=True)
        raise click.exceptions.Exit(EXIT_LOCKED)


def recover_document(outcome: RecoverOutcome) -> dict[str, Any]:
    """The --json object. A single-owner directory: RecoveryReport's fields plus the path, the
    mode and what was set aside. A shared one: totals, and a `lanes` list of those per lane."""
    if outcome.lanes is None:
        assert outcome.report is not None
        return {"ok": True, "path": outcome.path, "shared": False,
                **dataclasses.asdict(outcome.report), "salvage": outcome.salvage,
                "set_aside": _set_aside(outcome.set_aside)}
    lanes = [{"lane": lane.lane, "cache_id": lane.cache_id, "in_use": lane.in_use,
              "owner_pid": lane.owner_pid,
              **{name: getattr(lane.report, name) if lane.report is not None else None
                 for name in _REPORT_FIELDS},
              "set_aside": _set_aside(lane.set_aside)}
             for lane in outcome.lanes]
    recovered = [lane.report for lane in outcome.lanes if lane.report is not None]
    return {"ok": not outcome.skipped, "path": outcome.path, "shared": True,
            **{name: sum(getattr(report, name) for report in recovered)
               for name in ("segments", "records", "replayed", "keys", "torn_bytes")},
            "seconds": sum(report.seconds for report in recovered),
            "dry_run": outcome.dry_run, "salvage": outcome.salvage,
            "skipped": [lane.lane for lane in outcome.skipped], "lanes": lanes}


_REPORT_FIELDS = [field.name for field in dataclasses.fields(RecoveryReport)
                  if field.name != "dry_run"]


def _set_aside(report: SalvageReport | None) -> dict[str, Any] | None:
    return report.as_dict() if report is not None else None


def _print_shared_outcome(outcome: RecoverOutcome) -> None:
    assert outcome.lanes is not None
    recovered = [lane for lane in outcome.lanes if lane.report is not None]
    replayed = sum(lane.report.replayed for lane in recovered if lane.report is not None)
    free = count(len(recovered), "free lane")
    if outcome.dry_run:
        click.echo(f"dry run, nothing changed: recovering {outcome.path} would replay "
                   f"{count(replayed, 'log record')} from {free}")
    else:
        click.echo(f"recovered {outcome.path}: replayed {count(replayed, 'log record')} from "
                   f"{free} into the database")
    table(("lane", "state", "segments", "records", "replayed", "torn bytes",
           "checkpoint before", "after"),
          [(lane.lane, "in use" + (f" (pid {lane.owner_pid})" if lane.owner_pid else "")
            + ": left alone", "", "", "", "", "", "") if lane.report is None else
           (lane.lane, "would recover" if outcome.dry_run else "recovered",
            number(lane.report.segments), number(lane.report.records),
            number(lane.report.replayed), number(lane.report.torn_bytes),
            number(lane.report.checkpoint_before), number(lane.report.checkpoint_after))
           for lane in outcome.lanes],
          right={2, 3, 4, 5, 6, 7})
    for lane in outcome.lanes:
        if lane.set_aside is not None:
            verb = "would be set aside" if outcome.dry_run else "set aside"
            where = lane.set_aside.quarantine_dir
            click.echo(f"\nlane {lane.lane}'s log is damaged; {verb}"
                       + (f" in {where}/:" if where else ":"))
            _print_set_aside(lane.set_aside, err=False)


def _print_outcome(outcome: RecoverOutcome, database: str) -> None:
    report = outcome.report
    assert report is not None
    if report.dry_run:
        click.echo(f"dry run, nothing changed: recovering {outcome.path} would replay "
                   f"{count(report.replayed, 'log record')}")
    else:
        click.echo(f"recovered {outcome.path}: replayed {count(report.replayed, 'log record')} "
                   f"into {database}")
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
            what = f"damaged at byte offset {item.offset}: {item.reason}"
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


def _refused(message: str) -> CommandFailed:
    """Salvage not confirmed: exit 1, and with --json the error as JSON on stdout too."""
    return WbcacheGroup._failed(click.get_current_context(), message, "error", EXIT_DAMAGE)
