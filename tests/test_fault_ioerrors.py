"""I/O errors on the Nth write, fsync, open, directory fsync, unlink and rename of a short run
(and database errors during flushes): no acknowledgement without a successful fsync, the log
refuses writes once it failed, truncation waits for the commit, a reopen recovers everything
acknowledged."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import msgpack
import pytest

from wbcache.fault_injection.campaign import Settings
from wbcache.fault_injection.ioerrors import FaultySyscalls, InjectedIOError, run_ioerrors
from wbcache.fault_injection.logfile import write_sample_log
from wbcache.wal.format import encode_frame, encode_header
from wbcache.wal.syscalls import SYSCALLS

SEED = int(os.environ.get("WBCACHE_TORTURE_SEED", "4"))


def _frame(lsn: int) -> bytes:
    return encode_frame(msgpack.packb([[lsn, 1, "k", msgpack.packb(lsn)]]))


@pytest.fixture
def segment_fd(tmp_path: Path):  # type: ignore[no-untyped-def]
    faulty = FaultySyscalls(kind="fdatasync", nth=2, err=errno.EIO)
    faulty.install()
    try:
        fd = SYSCALLS.open(str(tmp_path / "00000000000000000001.log"),
                           os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        SYSCALLS.write(fd, encode_header())
        yield faulty, fd
        os.close(fd)
    finally:
        faulty.uninstall()


def test_the_ledger_flags_an_acknowledgement_no_fsync_covered(segment_fd) -> None:  # type: ignore[no-untyped-def]
    faulty, fd = segment_fd
    SYSCALLS.write(fd, _frame(1))
    faulty.check_ack(1, "before fsync")
    assert len(faulty.violations) == 1 and "before any fsync" in faulty.violations[0]
    SYSCALLS.fdatasync(fd)
    faulty.check_ack(1, "after fsync")
    assert len(faulty.violations) == 1


def test_after_a_failed_fsync_nothing_counts_as_covered(segment_fd) -> None:  # type: ignore[no-untyped-def]
    faulty, fd = segment_fd
    SYSCALLS.fdatasync(fd)  # the 1st succeeds
    SYSCALLS.write(fd, _frame(1))
    with pytest.raises(InjectedIOError):
        SYSCALLS.fdatasync(fd)  # the 2nd fails: the kernel may have dropped the pages
    SYSCALLS.fdatasync(fd)  # a retry "succeeds", and proves nothing
    faulty.check_ack(1, "after a failed fsync")
    assert len(faulty.violations) == 1


def test_the_guard_flags_a_segment_deleted_before_the_database_had_it(tmp_path: Path) -> None:
    sample = write_sample_log(SEED)
    name, data = sample.segments[0]
    path = tmp_path / name
    path.write_bytes(data)
    faulty = FaultySyscalls(committed=lambda: 1)
    faulty.install()
    try:
        SYSCALLS.unlink(str(path))
    finally:
        faulty.uninstall()
    assert not path.exists()
    assert len(faulty.violations) == 1 and "deleted while the database had only 1" in (
        faulty.violations[0])


def test_every_failing_call_of_a_short_run_keeps_every_acknowledged_write(
        ram_path: Path) -> None:
    outcome = run_ioerrors(Settings(workdir=str(ram_path), seed=SEED, cycles=50))
    assert outcome.tally.violations == 0, "\n".join(outcome.tally.messages)
    runs, fired = outcome.rows["I/O error runs (fired)"].replace(",", "").replace(
        "(", "").replace(")", "").split()
    assert int(runs) >= 150 and int(fired) == int(runs)
    assert outcome.tally.recovered == outcome.tally.acknowledged > 1_000


@pytest.mark.soak
def test_soak_20_rounds_of_io_errors(tmp_path: Path) -> None:
    outcome = run_ioerrors(Settings(workdir=str(tmp_path), seed=SEED, cycles=1_000))
    assert outcome.ok, "\n".join(outcome.tally.messages)
