"""`wbcache inspect`, `verify` and `stats`: what a cache directory holds, read-only.

Each reads through `wbcache.maintenance.open_snapshot`, which changes no byte of the directory
and runs beside a live cache (saying the view may be stale).
"""

from __future__ import annotations

from typing import Any

import click

from wbcache import DatabaseCheck, DirectorySnapshot, QuarantinedFile, open_snapshot
from wbcache.cli import EXIT_DAMAGE, WbcacheGroup
from wbcache.cli.ops_output import (
    count,
    directory_argument,
    emit_json,
    json_option,
    number,
    owner_fields,
    rows,
    table,
    warn_if_stale,
)
from wbcache.recovery.pending import PendingSummary
from wbcache.recovery.verify import LogSurvey, SegmentReport


@click.command()
@directory_argument
@json_option
def inspect(directory: str, as_json: bool) -> None:
    """Show the checkpoint, every log segment, the pending records, the database and the owner.

    Pending records are those newer than the database checkpoint: what `wbcache recover` (or
    opening the cache) would replay. Reads only; on a directory a live cache owns it still
    runs, and says the view may be stale.

    \b
    Example:
      wbcache inspect /var/lib/myapp/cache

    \b
    Exit status: 0; 1 when the log is damaged (each problem is listed); 2 usage error or not a
    cache directory.
    """
    with open_snapshot(directory) as snapshot:
        warn_if_stale(snapshot)
        survey = snapshot.survey()
        entries = snapshot.database_entries()
        document = {
            "ok": not survey.problems,
            "path": snapshot.path,
            "cache_id": snapshot.cache_id(),
            **owner_fields(snapshot),
            "checkpoint_lsn": survey.checkpoint,
            "database_entries": entries,
            "database_file_bytes": snapshot.database_file_bytes(),
            "last_lsn": survey.last_lsn,
            "next_lsn": None if survey.problems else max(survey.checkpoint, survey.last_lsn) + 1,
            "pending_records": survey.pending,
            "wal_segments": len(survey.segments),
            "wal_bytes": survey.size,
            "torn_bytes": survey.torn_bytes,
            "segments": [_segment_document(segment) for segment in survey.segments],
            "problems": [str(problem) for problem in survey.problems],
            "vanished": survey.vanished,
            "quarantine": [{"path": item.path, "size": item.size}
                           for item in snapshot.quarantine()],
        }
    if as_json:
        emit_json(document)
    else:
        _print_inspection(document, survey)
    if survey.problems:
        raise click.exceptions.Exit(EXIT_DAMAGE)


def _segment_document(segment: SegmentReport) -> dict[str, Any]:
    return {
        "name": segment.name,
        "size": segment.size,
        "first_lsn": segment.first_lsn,
        "last_lsn": segment.last_lsn,
        "records": segment.records,
        "pending": segment.pending,
        "torn_bytes": segment.torn_bytes,
        "damage": None if segment.damage is None else {"offset": segment.damage.offset,
                                                      "reason": segment.damage.reason},
    }


def _print_inspection(document: dict[str, Any], survey: LogSurvey) -> None:
    if not document["live_owner"]:
        owner, owner_note = "none", "not in use"
    else:
        owner = f"pid {document['owner_pid']}" if document["owner_pid"] else "live"
        owner_note = "a live cache holds the lock: this view may be stale"
    next_lsn = document["next_lsn"]
    cache_id = f"  (cache id {document['cache_id']})" if document["cache_id"] else ""
    click.echo(f"{document['path']}{cache_id}")
    rows([
        ("owner", owner, owner_note),
        ("checkpoint LSN", number(document["checkpoint_lsn"]),
         "every record up to it is in the database"),
        ("database entries", number(document["database_entries"]),
         f"data.mdb {number(document['database_file_bytes'])} bytes"),
        ("log segments", number(document["wal_segments"]),
         f"{number(document['wal_bytes'])} bytes"),
        ("pending records", number(document["pending_records"]),
         "newer than the checkpoint: replayed by recover or open"),
        ("torn tail bytes", number(document["torn_bytes"]),
         "a write cut off by a crash; recovery drops it" if document["torn_bytes"] else ""),
        ("next LSN", number(next_lsn) if next_lsn is not None else "-",
         "" if next_lsn is not None else "the log is damaged: opening refuses it"),
    ])
    if survey.segments:
        click.echo("")
        table(("segment", "bytes", "first LSN", "last LSN", "records", "pending", "state"),
              [(segment.name, number(segment.size), number(segment.first_lsn),
                number(segment.last_lsn) if segment.records else "-", number(segment.records),
                number(segment.pending), _segment_state(segment))
               for segment in survey.segments],
              right={1, 2, 3, 4, 5})
    if survey.problems:
        click.echo("\nproblems:")
        for problem in survey.problems:
            click.echo(f"  {problem}")
    _print_quarantine([QuarantinedFile(item["path"], item["size"])
                       for item in document["quarantine"]])


def _segment_state(segment: SegmentReport) -> str:
    if segment.damage is not None:
        return f"DAMAGED at byte {segment.damage.offset:,}"
    if segment.torn_bytes:
        return f"torn tail, {segment.torn_bytes:,} bytes"
    return "ok"


def _print_quarantine(files: list[QuarantinedFile]) -> None:
    if files:
        click.echo("\nquarantine (set aside by `wbcache recover --salvage`, never read again):")
        for item in files:
            click.echo(f"  {item.path}  {item.size:,} bytes")


@click.command()
@directory_argument
@json_option
def verify(directory: str, as_json: bool) -> None:
    """Read every log segment and every database entry, and report each problem on its own line.

    Changes nothing. The log is judged exactly as opening the cache judges it: a torn tail at
    the end of the last segment is not damage (recovery drops it); a bad record anywhere else,
    or missing records, is. Every database value must decode.

    \b
    Example:
      wbcache verify /var/lib/myapp/cache && echo clean

    \b
    Exit status: 0 clean; 1 damage found; 2 usage error or not a cache directory.
    """
    with open_snapshot(directory) as snapshot:
        warn_if_stale(snapshot)
        survey = snapshot.survey()
        database = snapshot.check_database()
        document = {
            "ok": not survey.problems and not database.problems,
            "path": snapshot.path,
            **owner_fields(snapshot),
            "problems": [{"where": "log", "message": str(problem), "segment": problem.path,
                          "offset": problem.offset, "reason": problem.reason}
                         for problem in survey.problems]
                        + [{"where": "database", "message": message, "segment": None,
                            "offset": None, "reason": message}
                           for message in database.problems],
            "wal_segments": len(survey.segments),
            "records": survey.records,
            "pending_records": survey.pending,
            "torn_bytes": survey.torn_bytes,
            "checkpoint_lsn": survey.checkpoint,
            "database_entries": database.entries,
            "vanished": survey.vanished,
        }
    if as_json:
        emit_json(document)
    else:
        _print_verification(document, survey)
    if not document["ok"]:
        raise click.exceptions.Exit(EXIT_DAMAGE)


def _print_verification(document: dict[str, Any], survey: LogSurvey) -> None:
    torn = document["torn_bytes"]
    click.echo(f"log       {count(document['wal_segments'], 'segment')}, "
               f"{count(document['records'], 'record')} "
               f"({number(document['pending_records'])} newer than the checkpoint)"
               + (f", torn tail of {number(torn)} bytes (recovery drops it)" if torn else ""))
    entries = count(document["database_entries"], "entry", "entries")
    click.echo(f"database  {entries}, checkpoint LSN {number(document['checkpoint_lsn'])}")
    for path in document["vanished"]:
        click.echo(f"note: {path} was deleted by the live cache while it was read", err=True)
    if document["ok"]:
        click.echo("ok: no damage found")
        return
    for problem in document["problems"]:
        click.echo(f"DAMAGED: {problem['message']}")
    directory = click.get_current_context().meta.get(WbcacheGroup.DIR_META, "DIR")
    click.echo(f"{count(len(document['problems']), 'problem')} found; nothing was changed.",
               err=True)
    if survey.problems:
        click.echo(f"`wbcache recover --salvage {directory}` replays the log up to the first "
                   f"damage and moves the damaged segment and any after it into "
                   f"{directory}/quarantine/ (preview with --dry-run).", err=True)


@click.command()
@directory_argument
@json_option
def stats(directory: str, as_json: bool) -> None:
    """Count what the directory holds: database entries and sizes, pending log records by kind.

    The counters of a running cache (hits, misses, flushes) live in that process:
    `cache.stats()`. These are the numbers on disk, and `entries_after_recovery` is what
    `len(cache)` will be once the directory is opened.

    \b
    Example:
      wbcache stats --json /var/lib/myapp/cache | jq .pending_records

    \b
    Exit status: 0; 1 when the log is damaged (see `wbcache verify`) or a database value
    cannot be decoded; 2 usage error or not a cache directory.
    """
    with open_snapshot(directory) as snapshot:
        warn_if_stale(snapshot)
        pending = snapshot.pending_summary()
        database = snapshot.check_database()
        quarantine = snapshot.quarantine()
        document = _stats_document(snapshot, pending, database, quarantine)
    if as_json:
        emit_json(document)
    else:
        _print_stats(document)
    for problem in database.problems:
        click.echo(f"DAMAGED: {problem}", err=True)
    if database.problems:
        raise click.exceptions.Exit(EXIT_DAMAGE)


def _stats_document(snapshot: DirectorySnapshot, pending: PendingSummary, database: DatabaseCheck,
                    quarantine: list[QuarantinedFile]) -> dict[str, Any]:
    return {
        "ok": not database.problems,
        "path": snapshot.path,
        **owner_fields(snapshot),
        "checkpoint_lsn": snapshot.checkpoint(),
        "last_lsn": pending.last_lsn,
        "entries_after_recovery": snapshot.entries_after_recovery(pending.state),
        "database_entries": database.entries,
        "database_str_keys": database.str_keys,
        "database_bytes_keys": database.bytes_keys,
        "database_value_bytes": database.value_bytes,
        "database_largest_value": database.largest_value,
        "database_file_bytes": snapshot.database_file_bytes(),
        "wal_segments": pending.segments,
        "wal_bytes": pending.wal_bytes,
        "torn_bytes": pending.torn_bytes,
        "pending_records": pending.records,
        "pending_keys": len(pending.state),
        "pending_puts": pending.puts,
        "pending_deletes": pending.deletes,
        "pending_incrs": pending.incrs,
        "pending_batches": pending.batches,
        "quarantine_files": len(quarantine),
        "quarantine_bytes": sum(item.size for item in quarantine),
    }


def _print_stats(document: dict[str, Any]) -> None:
    click.echo(document["path"])
    rows([
        ("entries after recovery", number(document["entries_after_recovery"]),
         "len(cache) once opened"),
        ("database entries", number(document["database_entries"]),
         f"{number(document['database_str_keys'])} str keys, "
         f"{number(document['database_bytes_keys'])} bytes keys"),
        ("database value bytes", number(document["database_value_bytes"]),
         f"largest {number(document['database_largest_value'])}"),
        ("database file bytes", number(document["database_file_bytes"]), "data.mdb"),
        ("checkpoint LSN", number(document["checkpoint_lsn"]), ""),
        ("log segments", number(document["wal_segments"]),
         f"{number(document['wal_bytes'])} bytes"),
        ("pending records", number(document["pending_records"]),
         f"{number(document['pending_batches'])} of them batches"),
        ("  puts", number(document["pending_puts"]), ""),
        ("  deletes", number(document["pending_deletes"]), ""),
        ("  increments", number(document["pending_incrs"]), ""),
        ("pending keys", number(document["pending_keys"]), "distinct keys those touch"),
        ("torn tail bytes", number(document["torn_bytes"]), ""),
        ("quarantine files", number(document["quarantine_files"]),
         f"{number(document['quarantine_bytes'])} bytes"),
    ])
