"""`wbcache demo`: kill -9 a writing process and show that no acknowledged write was lost.

The child (this module run with `python -m`) opens the cache and writes from several threads;
each thread writes keys `t<thread>:<seq>` = seq in order, and reports `<thread> <seq>` on stdout
only after `put` has returned. The parent SIGKILLs it, reads what the database and the log hold,
reopens the directory (which replays the log) and checks every acknowledged write.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

import click

import wbcache
from wbcache.cli import Seconds, WholeNumber, new_directory
from wbcache.recovery import RecoveryReport

_READY = b"ready\n"


def _child(path: str, threads: int) -> None:
    cache = wbcache.open(path, flush_interval=0.5)
    out_lock = threading.Lock()

    def write(thread: int) -> None:
        seq = 0
        while True:
            cache.put(f"t{thread}:{seq}", seq)
            with out_lock:  # one unbuffered write per ack: nothing waits in a Python buffer
                os.write(1, f"{thread} {seq}\n".encode())
            seq += 1

    os.write(1, _READY)
    for thread in range(threads):
        threading.Thread(target=write, args=(thread,), daemon=True).start()
    threading.Event().wait()  # until killed


@click.command()
@click.argument("directory", required=False, type=click.Path(file_okay=False))
@click.option("--seconds", default=3.0, show_default=True, type=Seconds(0.1, 600),
              help="How long the child writes before it is killed.")
@click.option("--threads", default=8, show_default=True, type=WholeNumber(1, 256),
              help="Writer threads in the child.")
def demo(directory: str | None, seconds: float, threads: int) -> None:
    """Write from a child process, kill -9 it, reopen, and check every acknowledged write.

    DIRECTORY must be new or empty; without it a temporary directory is used and removed.

    Example: wbcache demo /tmp/wbcache-demo --seconds 5
    """
    if directory is not None:
        new_directory(directory)
    path = directory or tempfile.mkdtemp(prefix="wbcache-demo-")
    try:
        # Made here first: a directory open() refuses (not ours, writable by others) is
        # refused in one line, not by the child's traceback.
        wbcache.open(path).close()
        acked = _run_and_kill(path, threads, seconds)
        sources = _sources_before_recovery(path, acked)
        with wbcache.open(path) as cache:
            recovered = [key for key, seq in acked.items() if cache.get(key) == seq]
            report = cache.recovery
        _print_report(acked, recovered, sources, report, threads, seconds)
        lost = len(acked) - len(recovered)
    finally:
        if directory is None:
            shutil.rmtree(path, ignore_errors=True)
    if lost:
        raise click.ClickException(f"{lost} acknowledged writes were lost")


def _run_and_kill(path: str, threads: int, seconds: float) -> dict[str, int]:
    """Run the child for `seconds`, SIGKILL it, return {key: value} of its acknowledged writes."""
    child = subprocess.Popen([sys.executable, "-m", "wbcache.cli.demo", path, str(threads)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert child.stdout is not None and child.stderr is not None
    if child.stdout.readline() != _READY:
        child.wait()
        raise click.ClickException(f"the writer failed to start: {child.stderr.read().decode()}")
    acked: dict[str, int] = {}

    def collect() -> None:  # reads to EOF: acks already in the pipe when the kill lands count too
        for line in child.stdout:  # type: ignore[union-attr]
            thread, seq = line.split()
            acked[f"t{int(thread)}:{int(seq)}"] = int(seq)

    reader = threading.Thread(target=collect)
    reader.start()
    try:
        time.sleep(seconds)  # the demo's run time, not a synchronisation
    finally:  # a Ctrl-C too: the child never outlives the demo
        child.send_signal(signal.SIGKILL)
        child.wait()
        reader.join()
    child.stdout.close()
    child.stderr.close()
    return acked


def _sources_before_recovery(path: str, acked: dict[str, int]) -> dict[str, str | None]:
    """Before the directory is reopened: where each acknowledged key's value will come from
    ("database", "log", or None if absent), read without changing a byte."""
    with wbcache.open_snapshot(path) as snapshot:
        return {key: snapshot.get(key)[1] for key in acked}


def _print_report(acked: dict[str, int], recovered: list[str], sources: dict[str, str | None],
                  report: RecoveryReport, threads: int, seconds: float) -> None:
    from_db = sum(1 for key in recovered if sources[key] == "database")
    lost = len(acked) - len(recovered)
    rows = [
        ("writes acknowledged before kill -9", len(acked)),
        ("recovered after reopening", len(recovered)),
        ("  already in the database", from_db),
        ("  replayed from the log", len(recovered) - from_db),
        ("log records replayed on open", report.replayed),
        ("torn tail bytes dropped", report.torn_bytes),
        ("lost", lost),
    ]
    click.echo(f"wrote from {threads} threads for {seconds:g} s, then SIGKILLed the writer\n")
    width = max(len(label) for label, _ in rows)
    for label, value in rows:
        click.echo(f"  {label:<{width}}  {value:>10,}")
    verdict = "no acknowledged write lost" if not lost else f"{lost} ACKNOWLEDGED WRITES LOST"
    click.echo(f"\nverdict: {verdict}")


if __name__ == "__main__":
    _child(sys.argv[1], int(sys.argv[2]))
