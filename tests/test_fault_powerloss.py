"""Simulated power loss: the disk model drops what was never fsync'd, and 200 states rebuilt
from real worker traces all recover every acknowledged write."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

import wbcache
from wbcache.fault_injection.campaign import Settings
from wbcache.fault_injection.journal import (
    DB_BEGIN,
    DB_DONE,
    DIR_SYNC,
    OPEN,
    SYNC,
    UNLINK,
    WRITE,
)
from wbcache.fault_injection.powerloss import DiskModel, run_powerloss

SEED = int(os.environ.get("WBCACHE_TORTURE_SEED", "4"))
SEGMENT = "wal/00000000000000000001.log"


@pytest.fixture
def base(tmp_path: Path) -> str:
    path = tmp_path / "base"
    wbcache.open(path).close()
    for name in os.listdir(path / "wal"):
        os.unlink(path / "wal" / name)
    return str(path)


def _materialize(model: DiskModel, base: str, tmp_path: Path, seed: int,
                 tear: str | None = None) -> tuple[str, object]:
    dest = tmp_path / f"state{seed}-{tear}"
    choices = model.materialize(random.Random(seed), base, str(dest), tear)
    return str(dest), choices


def _written(model_events: list[list[object]]) -> DiskModel:
    model = DiskModel({})
    for event in model_events:
        model.apply(event)
    return model


def _read(dest: str, path: str = SEGMENT) -> bytes | None:
    full = os.path.join(dest, path)
    if not os.path.exists(full):
        return None
    with open(full, "rb") as file:
        return file.read()


SYNCED, UNSYNCED = b"S" * 100, b"U" * 5000
EVENTS = [[OPEN, 5, SEGMENT, True, True], [WRITE, 5, SYNCED], [SYNC, 5], [DIR_SYNC, "wal"],
          [WRITE, 5, UNSYNCED]]


def test_bytes_never_fsynced_are_dropped_kept_or_torn_but_fsynced_ones_stay(
        base: str, tmp_path: Path) -> None:
    model = _written(EVENTS)
    assert _read(_materialize(model, base, tmp_path, 1, "drop")[0]) == SYNCED
    assert _read(_materialize(model, base, tmp_path, 1, "keep")[0]) == SYNCED + UNSYNCED
    for seed in range(20):
        for tear in ("prefix", "garbage", "zeros", "pages"):
            data = _read(_materialize(model, base, tmp_path, seed, tear)[0])
            assert data is not None and data.startswith(SYNCED)
            if tear == "prefix":
                assert (SYNCED + UNSYNCED).startswith(data)
            if tear == "pages":  # whole pages of the unsynced bytes, each there or zeroed
                assert len(data) == len(SYNCED + UNSYNCED)
                assert set(data[100:4096]) <= {0, ord("U")} and len(set(data[100:4096])) == 1


def test_a_file_whose_directory_was_never_fsynced_may_vanish(base: str, tmp_path: Path) -> None:
    model = _written(EVENTS[:3])  # created, written, fsync'd; its directory not
    present = {_read(_materialize(model, base, tmp_path, seed)[0]) is not None
               for seed in range(20)}
    assert present == {True, False}
    model.apply([DIR_SYNC, "wal"])
    assert all(_read(_materialize(model, base, tmp_path, 100 + seed)[0]) == SYNCED
               for seed in range(20))


def test_an_unlink_whose_directory_was_not_fsynced_may_be_undone(base: str,
                                                                 tmp_path: Path) -> None:
    model = DiskModel({SEGMENT: SYNCED})
    model.apply([UNLINK, SEGMENT])
    found = {_read(_materialize(model, base, tmp_path, seed)[0]) for seed in range(20)}
    assert found == {SYNCED, None}
    model.apply([DIR_SYNC, "wal"])
    assert all(_read(_materialize(model, base, tmp_path, 100 + seed)[0]) is None
               for seed in range(20))


def test_a_database_commit_counts_once_returned_and_may_go_either_way_in_flight(
        base: str, tmp_path: Path) -> None:
    model = DiskModel({})
    model.apply([DB_BEGIN, 7, [["k", b"\x01"]], [], []])

    def checkpoint(dest: str) -> int:
        backend = wbcache.LmdbBackend(os.path.join(dest, "db"))
        try:
            return backend.checkpoint()
        finally:
            backend.close()

    seen = {checkpoint(_materialize(model, base, tmp_path, seed)[0]) for seed in range(12)}
    assert seen == {0, 7}
    model.apply([DB_DONE, 7])
    assert all(checkpoint(_materialize(model, base, tmp_path, 100 + seed)[0]) == 7
               for seed in range(5))


def test_100_power_loss_states_keep_every_acknowledged_write(tmp_path: Path) -> None:
    # On the disk, not in RAM: the worker's trace must hold real fsync latency, so that cuts
    # land between a write and its fsync (in RAM the ack-before-fsync mutant went uncaught).
    outcome = run_powerloss(Settings(workdir=str(tmp_path), seed=SEED, cycles=100))
    assert outcome.tally.violations == 0, "\n".join(outcome.tally.messages)
    assert outcome.tally.cycles == 100
    assert outcome.tally.recovered == outcome.tally.acknowledged > 10_000
    with_unsynced = int(outcome.rows["  states with unsynced bytes (torn)"].split()[0])
    assert with_unsynced >= 10  # power was cut while bytes were unsynced, often


@pytest.mark.soak
def test_soak_10000_power_loss_states(tmp_path: Path) -> None:
    outcome = run_powerloss(Settings(workdir=str(tmp_path), seed=SEED, cycles=10_000))
    assert outcome.ok, "\n".join(outcome.tally.messages)
