"""`wbcache inspect` and `verify`: what a cache directory's logs and database hold, read-only.

Each reads through `wbcache.maintenance.open_snapshot`, which changes no byte of a
single-owner directory and runs beside live caches (saying the view may be stale). A shared
directory is shown per lane (`lanes` in JSON); a directory that flushes into PostgreSQL is
read through the database given by --backend or WBCACHE_BACKEND.
"""

from __future__ import annotations

import os
from typing import Any

import click

from wbcache.cli import EXIT_DAMAGE, WbcacheGroup
from wbcache.cli.ops_output import (
    backend_option,
    count,
    directory_argument,
    emit_json,
    json_option,
    lane_fields,
    lane_owner,
    number,
    open_directory,
    owner_fields,
    rows,
    table,
    totals,
    warn_if_stale,
)
from wbcache.maintenance import DirectorySnapshot, LogView, QuarantinedFile
from wbcache.recovery.verify import LogSurvey, SegmentReport


@click.command()
@directory_argument
@backend_option
@json_option
def inspect(directory: str, backend: str | None, as_json: bool) -> None:
    """Show the checkpoint, every log segment, the pending records, the database and the owner.

    Pending records are those newer than the database checkpoint: what `wbcache recover` (or
    opening the cache) would replay. Reads only; on a directory a live cache owns it still
    runs, and says the view may be stale. A shared directory (many processes, a lane each)
    is shown lane by lane: owner (a live pid, or free), checkpoint, pending records, then
    every lane's segments.

    \b
    Examples:
      wbcache inspect /var/lib/myapp/cache
      WBCACHE_BACKEND=postgresql://app@db/app?table=cache wbcache inspect /var/lib/myapp/cache

    \b
    Exit status: 0; 1 when a log is damaged (each problem is listed); 2 usage error, not a
    cache directory, or a PostgreSQL directory without --backend.
    """
    with open_directory(directory, backend) as snapshot:
        warn_if_stale(snapshot, reads_live_lanes=True)
        surveys = [(log, snapshot.survey(log)) for log in snapshot.logs]
        lanes = [_log_document(snapshot, log, survey) for log, survey in surveys]
        problems = [problem for lane in lanes for problem in lane["problems"]]
        document: dict[str, Any] = {
            "ok": not problems,
            "path": snapshot.path,
            "cache_id": snapshot.cache_id(),
            **owner_fields(snapshot, backend),
            "database_entries": snapshot.database_entries(),
            "database_file_bytes": snapshot.database_file_bytes(),
        }
        if snapshot.shared:
            document.update(totals(lanes, ("pending_records", "wal_segments", "wal_bytes",
                                            "torn_bytes")),
                            problems=problems,
                            vanished=[path for lane in lanes for path in lane["vanished"]],
                            lanes=lanes)
        else:
            document.update({key: value for key, value in lanes[0].items()
                             if key not in ("lane", "path", "cache_id", "in_use", "owner_pid")})
    if as_json:
        emit_json(document)
    elif snapshot.shared:
        _print_shared_inspection(document, surveys)
    else:
        _print_inspection(document, surveys[0][1])
    if problems:
        raise click.exceptions.Exit(EXIT_DAMAGE)


def _log_document(snapshot: DirectorySnapshot, log: LogView, survey: LogSurvey
                  ) -> dict[str, Any]:
    return {
        **lane_fields(log),
        "checkpoint_lsn": survey.checkpoint,
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
                       for item in snapshot.quarantine(log)],
    }



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


def _database_rows(document: dict[str, Any]) -> list[tuple[str, str, str]]:
    entries = number(document["database_entries"])
    if document["database_url"] is None:
        return [("database entries", entries,
                 f"data.mdb {number(document['database_file_bytes'] or 0)} bytes")]
    return [("database", document["database_kind"], document["database_url"]),
            ("database entries", entries, "the whole table: every cache that shares it")]


def _print_inspection(document: dict[str, Any], survey: LogSurvey) -> None:
    if not document["live_owner"]:
        owner, owner_note = "none", "not in use"
    else:
        owner = f"pid {document['owner_pid']}" if document["owner_pid"] else "live"
        owner_note = "a live cache holds the lock: this view may be stale"
    next_lsn = document["next_lsn"]
    cache_id = f"  (cache id {document['cache_id']})" if document["cache_id"] else ""
    click.echo(f"{document['path']}{cache_id}")
    database = _database_rows(document)
    rows([
        *database[:-1],
        ("owner", owner, owner_note),
        ("checkpoint LSN", number(document["checkpoint_lsn"]),
         "every record up to it is in the database"),
        database[-1],
        ("log segments", number(document["wal_segments"]),
         f"{number(document['wal_bytes'])} bytes"),
        ("pending records", number(document["pending_records"]),
         "newer than the checkpoint: replayed by recover or open"),
        ("torn tail bytes", number(document["torn_bytes"]),
         "a write cut off by a crash; recovery drops it" if document["torn_bytes"] else ""),
        ("next LSN", number(next_lsn) if next_lsn is not None else "-",
         "" if next_lsn is not None else "the log is damaged: opening refuses it"),
    ])
    _print_segments([(None, segment) for segment in survey.segments])
    _print_problems(document["problems"])
    _print_quarantine([QuarantinedFile(item["path"], item["size"])
                       for item in document["quarantine"]], "")


def _print_shared_inspection(document: dict[str, Any],
                             surveys: list[tuple[LogView, LogSurvey]]) -> None:
    lanes = document["lanes"]
    in_use = sum(lane["in_use"] for lane in lanes)
    click.echo(f"{document['path']}  (shared directory: {count(len(lanes), 'lane')}, "
               f"one LMDB database)")
    rows([
        *_database_rows(document),
        ("lanes", number(len(lanes)), f"{number(in_use)} in use by a live cache, "
                                      f"{number(len(lanes) - in_use)} free"),
        ("pending records", number(document["pending_records"]),
         "newer than their lane's checkpoint: a free lane's are replayed by recover or the "
         "next open"),
        ("torn tail bytes", number(document["torn_bytes"]), ""),
    ])
    if lanes:
        click.echo("")
        table(("lane", "owner", "checkpoint LSN", "segments", "log bytes", "pending",
               "next LSN"),
              [(lane["lane"], lane_owner(log), number(lane["checkpoint_lsn"]),
                number(lane["wal_segments"]), number(lane["wal_bytes"]),
                number(lane["pending_records"]),
                number(lane["next_lsn"]) if lane["next_lsn"] is not None else "-")
               for lane, (log, _) in zip(lanes, surveys, strict=True)],
              right={2, 3, 4, 5, 6})
    _print_segments([(log.lane, segment) for log, survey in surveys
                     for segment in survey.segments])
    _print_problems(document["problems"])
    for lane in lanes:
        _print_quarantine([QuarantinedFile(item["path"], item["size"])
                           for item in lane["quarantine"]], f" of lane {lane['lane']}")


def _print_segments(segments: list[tuple[str | None, SegmentReport]]) -> None:
    if not segments:
        return
    shared = segments[0][0] is not None
    click.echo("")
    header = ("segment", "bytes", "first LSN", "last LSN", "records", "pending", "state")
    body = [(segment.name, number(segment.size), number(segment.first_lsn),
             number(segment.last_lsn) if segment.records else "-", number(segment.records),
             number(segment.pending), _segment_state(segment)) for _, segment in segments]
    if shared:
        table(("lane", *header), [(lane or "", *row) for (lane, _), row in
                                  zip(segments, body, strict=True)], right={2, 3, 4, 5, 6})
    else:
        table(header, body, right={1, 2, 3, 4, 5})


def _print_problems(problems: list[str]) -> None:
    if problems:
        click.echo("\nproblems:")
        for problem in problems:
            click.echo(f"  {problem}")


def _segment_state(segment: SegmentReport) -> str:
    if segment.damage is not None:
        return f"DAMAGED at byte {segment.damage.offset:,}"
    if segment.torn_bytes:
        return f"torn tail, {segment.torn_bytes:,} bytes"
    return "ok"


def _print_quarantine(files: list[QuarantinedFile], where: str) -> None:
    if files:
        click.echo(f"\nquarantine{where} (set aside by `wbcache recover --salvage`, never read "
                   f"again):")
        for item in files:
            click.echo(f"  {item.path}  {item.size:,} bytes")


@click.command()
@directory_argument
@backend_option
@json_option
def verify(directory: str, backend: str | None, as_json: bool) -> None:
    """Read every log segment and every database entry, and report each problem on its own line.

    Changes nothing. The log is judged exactly as opening the cache judges it: a torn tail at
    the end of the last segment is not damage (recovery drops it); a bad record anywhere else,
    or missing records, is. Every database value must decode. In a shared directory every
    lane's log is read, a live cache's too.

    \b
    Example:
      wbcache verify /var/lib/myapp/cache && echo clean

    \b
    Exit status: 0 clean; 1 damage found; 2 usage error, not a cache directory, or a
    PostgreSQL directory without --backend.
    """
    with open_directory(directory, backend) as snapshot:
        warn_if_stale(snapshot, reads_live_lanes=True)
        surveys = [(log, snapshot.survey(log)) for log in snapshot.logs]
        database = snapshot.check_database()
        lanes = [{**lane_fields(log), "wal_segments": len(survey.segments),
                  "records": survey.records, "pending_records": survey.pending,
                  "torn_bytes": survey.torn_bytes, "problems": len(survey.problems)}
                 for log, survey in surveys]
        log_problems = [{"where": "log", "lane": log.lane, "message": str(problem),
                         "segment": problem.path, "offset": problem.offset,
                         "reason": problem.reason}
                        for log, survey in surveys for problem in survey.problems]
        document: dict[str, Any] = {
            "ok": not log_problems and not database.problems,
            "path": snapshot.path,
            **owner_fields(snapshot, backend),
            "problems": log_problems + [{"where": "database", "lane": None, "message": message,
                                         "segment": None, "offset": None, "reason": message}
                                        for message in database.problems],
            **totals(lanes, ("wal_segments", "records", "pending_records", "torn_bytes")),
            "checkpoint_lsn": None if snapshot.shared else snapshot.checkpoint(),
            "database_entries": database.entries,
            "vanished": [path for _, survey in surveys for path in survey.vanished],
        }
        if snapshot.shared:
            document["lanes"] = lanes
    if as_json:
        emit_json(document)
    else:
        _print_verification(document, bool(log_problems))
    if not document["ok"]:
        raise click.exceptions.Exit(EXIT_DAMAGE)


def _print_verification(document: dict[str, Any], log_damaged: bool) -> None:
    torn = document["torn_bytes"]
    lanes = document.get("lanes")
    where = f"{count(len(lanes), 'lane')}, " if lanes is not None else ""
    newer = "their checkpoints" if lanes is not None else "the checkpoint"
    click.echo(f"log       {where}{count(document['wal_segments'], 'segment')}, "
               f"{count(document['records'], 'record')} "
               f"({number(document['pending_records'])} newer than {newer})"
               + (f", torn tail of {number(torn)} bytes (recovery drops it)" if torn else ""))
    entries = count(document["database_entries"], "entry", "entries")
    checkpoint = ("" if document["checkpoint_lsn"] is None
                  else f", checkpoint LSN {number(document['checkpoint_lsn'])}")
    click.echo(f"database  {entries}{checkpoint}")
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
    if log_damaged:
        into = ("the quarantine/ of its lane" if "lanes" in document
                else os.path.join(document["path"], "quarantine", ""))
        click.echo(f"`wbcache recover --salvage {directory}` replays the log up to the first "
                   f"damage and moves the damaged segment and any after it into {into} "
                   f"(preview with --dry-run).", err=True)
