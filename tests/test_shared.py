"""Shared directories: many processes on one machine, one LMDB database, a lane per open cache.

The counting tests run real worker processes (tests/shared_worker.py) that increment shared
counters from 8 threads each and are SIGKILLed at random; each increment carries a marker
written in the same record, so after any crash the markers say exactly which increments
survived, and each counter must equal its markers: counted exactly once, never lost, never
twice.

Over 500 lines (some 570): what many processes on one directory see of each other (lanes,
counters read back after a flush, staleness) is one story, told in one file.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from controlled import flush_writing_meanwhile, wait_until

import wbcache
from wbcache import ForkedCacheError, InvalidDirectoryError
from wbcache.flusher import REBASE_PER_FLUSH
from wbcache.lanes import lane_roots

WORKER = Path(__file__).with_name("shared_worker.py")
COUNTERS = 100


def start(directory: Path, worker: int, incarnation: int, acks: Path,
          **options: float) -> subprocess.Popen[bytes]:
    args = [sys.executable, str(WORKER), str(directory), str(worker), str(incarnation), "8",
            str(COUNTERS), str(acks), *(f"{name}={value}" for name, value in options.items())]
    return subprocess.Popen(args, cwd=Path(__file__).parent, stderr=subprocess.PIPE)


def acked(acks: Path) -> list[str]:
    try:
        return acks.read_text().splitlines()
    except FileNotFoundError:
        return []


def kill(process: subprocess.Popen[bytes]) -> None:
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, process.stderr.read() if process.stderr else ""


def check_counters(directory: Path, ack_files: list[Path]) -> dict[str, int]:
    """Open the directory afresh (adopting every orphan lane) and check each counter against
    the markers and the acknowledgements; return the counters."""
    with wbcache.open(directory, shared=True) as cache:
        stored = dict(cache.items())
    counters = {key: value for key, value in stored.items() if key.startswith("counter:")}
    markers = Counter(key.rsplit(":", 1)[1] for key in stored if key.startswith("marker:"))
    acknowledged = Counter(line for path in ack_files for line in acked(path) if line != "open")
    for index in range(COUNTERS):
        key = f"counter:{index:03d}"
        value = counters.get(key, 0)
        assert value == markers[f"{index:03d}"], (key, value, markers[f"{index:03d}"])
        assert value >= acknowledged[str(index)], (key, value, acknowledged[str(index)])
    return counters


def test_four_processes_count_exactly_through_kills_and_lanes_never_restarted(
        tmp_path: Path) -> None:
    """4 processes x 8 threads on 100 counters; each SIGKILLed and restarted, two of them
    never restarted after their last kill: a fresh open adopts their lanes, and every
    counter equals exactly the increments that survived (and at least those acknowledged)."""
    directory = tmp_path / "shared"
    rng = random.Random(20261202)
    incarnations = [0, 0, 0, 0]
    ack_files: list[Path] = []
    processes: dict[int, subprocess.Popen[bytes]] = {}

    def launch(worker: int) -> None:
        acks = tmp_path / f"acks-{worker}-{incarnations[worker]}"
        ack_files.append(acks)
        processes[worker] = start(directory, worker, incarnations[worker], acks,
                                  flush_interval=rng.choice([0.02, 0.2, 3600]))
        wait_until(lambda: len(acked(acks)) > 50, timeout=30, what=f"worker {worker} counting")

    for worker in range(4):
        launch(worker)
    for _ in range(6):
        worker = rng.randrange(4)
        kill(processes[worker])
        incarnations[worker] += 1
        launch(worker)
    for worker in range(4):  # the last kill of each; 2 and 3 are never restarted
        kill(processes[worker])
    for worker in (0, 1):
        incarnations[worker] += 1
        launch(worker)
        kill(processes[worker])
    total = sum(check_counters(directory, ack_files).values())
    assert total > 1000  # the workers really counted
    assert len(lane_roots(str(directory))) <= 5  # lanes are reused, not one per process
    for lane in lane_roots(str(directory)):  # every orphan's log was emptied
        assert [name for name in os.listdir(Path(lane) / "wal")
                if os.path.getsize(Path(lane) / "wal" / name) > 32] == []


def test_a_dead_processs_lane_is_adopted_by_a_live_one_without_any_restart(
        tmp_path: Path) -> None:
    directory = tmp_path / "shared"
    live = wbcache.open(directory, shared=True, adopt_interval=0.1, read_ttl=0.01)
    try:
        acks = tmp_path / "acks"
        worker = start(directory, 1, 0, acks, flush_interval=3600)  # never flushes by itself
        wait_until(lambda: len(acked(acks)) > 200, timeout=30, what="the worker counting")
        kill(worker)  # its increments are only in its lane's log now
        counted = Counter(line for line in acked(acks) if line != "open")
        started = time.monotonic()

        dead_lanes = [lane for lane in lane_roots(str(directory))
                      if Path(lane) != Path(live._layout.root)]
        assert dead_lanes

        def adopted() -> bool:
            # the adopter deletes a lane's log only after the database's commit covering it,
            # so the values become readable a moment before the log is gone: wait for both
            return (all(live.get(f"counter:{int(index):03d}", 0) >= times
                        for index, times in counted.items())
                    and all(os.listdir(Path(lane) / "wal") == [] for lane in dead_lanes))

        wait_until(adopted, timeout=10, what="the live cache adopting the dead one's lane")
        elapsed = time.monotonic() - started
        assert elapsed < 0.1 + 2.0  # the adopt interval, plus a generous margin for load
    finally:
        live.close()
    check_counters(directory, [acks])


def test_caches_of_one_process_on_a_shared_directory_add_up_and_see_each_other(
        tmp_path: Path) -> None:
    directory = tmp_path / "shared"
    first = wbcache.open(directory, shared=True, read_ttl=0.01, flush_interval=3600)
    second = wbcache.open(directory, shared=True, read_ttl=0.01, flush_interval=3600)
    try:
        assert len(lane_roots(str(directory))) == 2
        for _ in range(5):
            first.incr("n")
            second.incr("n", 10)
        first.put("k", "from first")
        first.flush()
        second.flush()
        wait_until(lambda: second.get("k") == "from first", timeout=5)
        wait_until(lambda: first.get("n") == 55, timeout=5)  # the database's total
    finally:
        first.close()
        second.close()
    with wbcache.open(directory, shared=True) as cache:
        assert cache.get("n") == 55
        assert len(lane_roots(str(directory))) == 2  # a free lane was reused


def test_a_counter_incremented_during_every_flush_still_shows_the_others_increments(
        tmp_path: Path) -> None:
    """A counter flushed as increments becomes clean and is read again; one incremented
    again while its flush ran stays dirty, and a dirty entry is never read again. So a worker
    that kept counting hits never saw another worker's (12 s and more, in an outside hunt,
    with flush_interval=1). It is now rebased on the database's total after each flush."""
    directory = tmp_path / "shared"
    mine = wbcache.open(directory, shared=True, flush_interval=3600)
    other = wbcache.open(directory, shared=True, flush_interval=3600)
    try:
        assert mine.incr("hits") == 1  # on the database's 0
        other.incr("hits", 1_000_000)
        other.flush()
        for flushes in range(1, 4):
            flush_writing_meanwhile(mine, lambda cache: cache.incr("hits"))
            assert mine.get("hits") == 1_000_001 + flushes
        assert mine.incr("hits") == 1_000_005  # incr returns the rebased view too
        flush_writing_meanwhile(mine, lambda cache: cache.put("hits", 7))
        assert mine.get("hits") == 7  # a put since the flush is this cache's newest state
        flush_writing_meanwhile(mine, lambda cache: cache.incr("hits", 2))
        assert mine.get("hits") == 9  # its total, 7, and the 2 still to flush
        mine.flush()
    finally:
        mine.close()
        other.close()
    with wbcache.open(directory, shared=True) as cache:
        assert cache.get("hits") == 9


def counting_gets(cache: wbcache.Cache) -> list[Any]:
    """The keys `cache` reads from its database from now on, in order."""
    reads: list[Any] = []
    backend = cache._backend
    get = backend.get

    def counting_get(key: Any) -> Any:
        reads.append(key)
        return get(key)

    backend.get = counting_get  # type: ignore[method-assign]
    return reads


def test_counters_past_one_flushs_read_back_wait_for_the_next_and_close_reads_none(
        tmp_path: Path) -> None:
    """At most REBASE_PER_FLUSH counters are read back after a flush; the rest wait, the
    longest waiting first after the next flush, but only those still written by increments
    alone (one flushed clean meanwhile is read again by read_ttl, not here; nor kept). The
    last flush of close() reads none back: nothing reads memory after it, and a database
    gone by then would hold close for its whole timeout."""
    directory = tmp_path / "shared"
    cache = wbcache.open(directory, shared=True, flush_interval=3600)
    keys = [f"c{i}" for i in range(REBASE_PER_FLUSH + 10)]
    left, again = keys[REBASE_PER_FLUSH:REBASE_PER_FLUSH + 5], keys[REBASE_PER_FLUSH + 5:]

    def count(cache: wbcache.Cache, which: list[str]) -> None:
        for key in which:
            cache.incr(key)

    try:
        count(cache, keys)
        reads = counting_gets(cache)
        flush_writing_meanwhile(cache, lambda cache: count(cache, keys))
        assert reads == keys[:REBASE_PER_FLUSH]
        reads.clear()
        flush_writing_meanwhile(cache, lambda cache: count(cache, keys[:REBASE_PER_FLUSH] + again))
        assert reads == again + keys[:REBASE_PER_FLUSH - len(again)]  # `left`: clean, dropped
        assert cache._sequencer._rebase.keys() == set(keys[REBASE_PER_FLUSH - len(again):
                                                           REBASE_PER_FLUSH])
        reads.clear()
    finally:
        cache.close()
    assert reads == []
    with wbcache.open(directory, shared=True) as cache:
        assert {key: cache.get(key) for key in keys} == {key: 2 if key in left else 3
                                                        for key in keys}


def test_a_single_owner_cache_reads_no_counter_back(tmp_path: Path) -> None:
    """Its database is written by this cache alone: a counter flushed as a value holds
    nothing memory lacks, so no read follows a flush, and nothing waits for one."""
    cache = wbcache.open(tmp_path / "c", flush_interval=3600)
    try:
        cache.incr("n")
        reads = counting_gets(cache)
        flush_writing_meanwhile(cache, lambda cache: cache.incr("n"))
        cache.flush()
        assert reads == [] and not cache._sequencer._rebase
    finally:
        cache.close()
    with wbcache.open(tmp_path / "c") as cache:
        assert cache.get("n") == 2


def test_a_write_by_another_process_is_visible_within_flush_interval_plus_read_ttl(
        tmp_path: Path) -> None:
    directory = tmp_path / "shared"
    reader = wbcache.open(directory, shared=True)
    try:
        assert reader.get("k") is None  # cached as absent? no: absence is read every time
        script = (f"import wbcache; c = wbcache.open({str(directory)!r}, shared=True, "
                  f"flush_interval=0.05); c.put('k', 'v'); c.close()")
        subprocess.run([sys.executable, "-c", script], check=True)
        written = time.monotonic()
        wait_until(lambda: reader.get("k") == "v", timeout=5)
        assert time.monotonic() - written < reader.read_ttl + 1.0
    finally:
        reader.close()


def test_a_map_grown_by_another_process_is_adopted_and_reads_and_flushes_go_on(
        tmp_path: Path) -> None:
    # LMDB refuses a process's next transaction (MDB_MAP_RESIZED) once another process has
    # grown the map and the data outgrew its own. It reached the caller: a raw lmdb error from
    # get(), every flush failing, close() raising FlushError, and with max_dirty reached,
    # writers waiting for good.
    directory = tmp_path / "shared"
    cache = wbcache.open(directory, shared=True, map_size=64 * 1024, flush_interval=3600)
    try:
        cache.put("mine", 1)
        cache.flush()
        script = (f"import wbcache; c = wbcache.open({str(directory)!r}, shared=True, "
                  f"map_size=64 * 1024); c.put_many({{f'big{{i}}': 'x' * 2000 "
                  f"for i in range(400)}}); c.close()")  # 800 KB: the map doubles 4 times
        subprocess.run([sys.executable, "-c", script], check=True, timeout=60)
        assert cache.get("big399") == "x" * 2000
        cache.put("mine", 2)
        cache.flush()
        assert cache.stats()["flush_errors"] == 0
        assert len(cache) == 401
    finally:
        cache.close()
    with wbcache.open(directory, shared=True) as reopened:
        assert reopened.get("mine") == 2


def test_opening_a_directory_the_other_way_is_refused_with_the_flag_to_use(
        tmp_path: Path) -> None:
    single, shared = tmp_path / "single", tmp_path / "shared"
    wbcache.open(single).close()
    wbcache.open(shared, shared=True).close()
    with pytest.raises(InvalidDirectoryError, match="without shared=True"):
        wbcache.open(single, shared=True)
    with pytest.raises(InvalidDirectoryError, match="with shared=True"):
        wbcache.open(shared)


@pytest.mark.parametrize("first", ["shared", "single-owner"])
def test_two_first_opens_of_one_directory_one_shared_one_not_cannot_both_succeed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, first: str) -> None:
    """A shared and a single-owner first open of one new directory, the second run inside the
    first's window between its check of the directory's kind and its making of it (`SHARED`,
    or `wal/`): the one interleaving where both could pass the check. Both succeeding left a
    directory of both kinds: single-owner writes that no shared open ever replays. Exactly
    the first must succeed, and the directory must be its kind."""
    import wbcache.directory as directory_module
    import wbcache.lanes as lanes_module

    directory = tmp_path / "new"
    outer_shared = first == "shared"
    module, step = (lanes_module, "mark_shared") if outer_shared else (directory_module,
                                                                      "complete")
    original = getattr(module, step)
    inner: list[BaseException | None] = []

    def interleaved(*args: Any) -> None:
        if not inner:  # the first call only: the inner open may reach this step too
            inner.append(None)
            try:
                wbcache.open(directory, shared=not outer_shared).close()
            except BaseException as error:
                inner[0] = error
        original(*args)

    monkeypatch.setattr(module, step, interleaved)
    wbcache.open(directory, shared=outer_shared).close()
    monkeypatch.undo()
    assert inner, "the interleaving never ran"
    # Refused saying which kind the directory is (not "in use": a retry would say it then).
    assert isinstance(inner[0], InvalidDirectoryError), inner[0]
    assert ("with shared=True" if outer_shared else "without shared=True") in str(inner[0])
    assert (directory / "SHARED").exists() == outer_shared
    assert (directory / "wal").exists() == (not outer_shared)
    wbcache.open(directory, shared=outer_shared).close()  # and it still opens its own way
    with pytest.raises(InvalidDirectoryError):
        wbcache.open(directory, shared=not outer_shared)


def test_a_shared_first_open_is_not_refused_when_another_marked_the_directory_meanwhile(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Between a shared open's unlocked look for `SHARED` and its shared lock, another shared
    open marks the directory, and a single-owner open holds `DIR/LOCK` for the moment it
    takes to be refused. The directory is shared: the open must go on, not call it
    single-owner."""
    import wbcache.lanes as lanes_module
    from wbcache.layout import Layout
    from wbcache.lock import DirectoryLock

    directory = tmp_path / "new"
    real = lanes_module.is_shared
    held: list[DirectoryLock] = []
    looked: list[bool] = []

    def is_shared(root: str) -> bool:
        answer = real(root)
        if not looked:  # the first look, before any lock
            looked.append(True)
            wbcache.open(directory, shared=True).close()  # another shared first open
            held.append(DirectoryLock.acquire(Layout(str(directory)).lock,
                                              record_owner=False))  # a single-owner open
        return answer

    monkeypatch.setattr(lanes_module, "is_shared", is_shared)
    try:
        wbcache.open(directory, shared=True).close()
    finally:
        held[0].release()
    assert (directory / "SHARED").exists() and not (directory / "wal").exists()


def test_shared_directories_take_no_other_backend(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="PostgreSQL"):
        wbcache.open(tmp_path / "shared", shared=True, backend="postgresql://localhost/x")


def test_a_forked_child_reopens_a_shared_cache_in_place_on_its_own_lane(
        tmp_path: Path) -> None:
    directory = tmp_path / "shared"
    cache = wbcache.open(directory, shared=True)
    cache.incr("n")
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: as in gunicorn's post_fork
        outcome: dict[str, Any] = {}
        try:
            try:
                cache.incr("n")
                outcome["before"] = "accepted"
            except ForkedCacheError as exc:
                outcome["before"] = "reopen()" in str(exc)
            same = cache.reopen()
            outcome["same object"] = same is cache
            for _ in range(10):
                cache.incr("n")
            cache.close()
            outcome["ok"] = True
        except BaseException as exc:  # reported to the parent, which fails the test
            outcome["error"] = repr(exc)
        os.write(write_end, json.dumps(outcome).encode())
        os._exit(0)
    os.close(write_end)
    for _ in range(10):
        cache.incr("n")
    _, status = os.waitpid(pid, 0)
    outcome = json.loads(os.read(read_end, 4096))
    os.close(read_end)
    cache.close()
    assert outcome == {"before": True, "same object": True, "ok": True}
    with wbcache.open(directory, shared=True) as reopened:
        assert reopened.get("n") == 21


def test_reopen_in_a_child_of_a_single_owner_cache_says_to_use_shared(tmp_path: Path) -> None:
    cache = wbcache.open(tmp_path / "single")
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            cache.reopen()
            message = "reopened"
        except ForkedCacheError as exc:
            message = str(exc)
        os.write(write_end, message.encode())
        os._exit(0)
    os.close(write_end)
    os.waitpid(pid, 0)
    message = os.read(read_end, 4096).decode()
    os.close(read_end)
    cache.close()
    assert "shared=True" in message


@pytest.mark.parametrize("seen", ["lanes/ and SHARED", "SHARED while marking"])
def test_an_open_finding_the_shared_mark_makes_it_durable_before_any_write(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, seen: str) -> None:
    """Another first open has made `lanes/` and `SHARED` but not yet fsync'd the directory
    that holds them. An open that found them went on without that fsync: writes it then
    acknowledged would go, lane and all, with those entries in a power cut."""
    from wbcache import lanes
    from wbcache.wal.syscalls import SYSCALLS

    root = tmp_path / "shared"
    root.mkdir(mode=0o700)
    (root / "lanes").mkdir(mode=0o700)
    (root / "SHARED").write_bytes(lanes._MARK)
    if seen == "SHARED while marking":  # found absent first, then there (the O_EXCL create)
        monkeypatch.setattr(lanes, "is_shared", lambda root: False)
    synced: list[str] = []
    real = SYSCALLS.fsync_dir
    monkeypatch.setattr(SYSCALLS, "fsync_dir",
                        lambda path: (synced.append(os.path.realpath(path)), real(path))[1])

    cache = wbcache.open(root, shared=True)
    try:
        assert os.path.realpath(root) in synced  # before the first write can be acknowledged
        cache.put("k", 1)
    finally:
        cache.close()


def test_a_lane_adopted_by_the_sweep_is_logged_by_the_lanes_logger(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """README names the logger of "adopted lane" lines: wbcache.lanes, whether the adoption is
    an open's or a live cache's sweep (whose lines are logged from a thread of their own)."""
    import logging

    directory = tmp_path / "shared"
    with caplog.at_level(logging.INFO, logger="wbcache"):
        live = wbcache.open(directory, shared=True, adopt_interval=0.05)
        try:
            script = (f"import os, wbcache; c = wbcache.open({str(directory)!r}, shared=True, "
                      f"flush_interval=3600); c.put('dead', 1); os._exit(0)")
            subprocess.run([sys.executable, "-c", script], check=True, timeout=60)
            wait_until(lambda: [record for record in caplog.records
                                if record.getMessage().startswith("adopted lane")],
                       what="the sweep's line")
        finally:
            live.close()
    (record,) = [record for record in caplog.records
                 if record.getMessage().startswith("adopted lane")]
    assert record.name == "wbcache.lanes"


def test_an_open_racing_a_first_shared_open_that_marks_the_directory_meanwhile(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The first shared open makes LOCK and lanes/, then SHARED, then claims a lane. Another
    open listing the directory between lanes/ and SHARED, and looking into lanes/ once the
    first had claimed a lane there, refused it as "not a wbcache directory" (a LazyFS run of
    the shared campaign caught it)."""
    from wbcache import lanes, layout

    root = tmp_path / "shared"
    root.mkdir(mode=0o700)
    (root / "LOCK").touch(mode=0o600)
    (root / "lanes").mkdir(mode=0o700)  # listed so: neither a cache directory nor done
    interrupted = layout._interrupted_layout

    def the_first_open_goes_on(root_fd: int, shown: str, names: frozenset[str]) -> bool:
        (root / "SHARED").write_bytes(lanes._MARK)
        (root / "lanes" / "00000001").mkdir(mode=0o700)
        return interrupted(root_fd, shown, names)

    monkeypatch.setattr(layout, "_interrupted_layout", the_first_open_goes_on)
    with wbcache.open(root, shared=True) as cache:
        cache.put("k", 1)


def test_a_single_owner_open_meeting_another_single_owner_first_open_is_not_told_shared(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """B cannot take the lock A (a single-owner first open) holds; by the time B looks at
    who holds it, A has made wal/ and closed. B was told the directory was shared (and
    that shared=True would open it, which is refused), then "in use": it tries again, and
    opens."""
    import wbcache.directory as directory_module
    from wbcache.lock import DirectoryLock

    directory = tmp_path / "new"
    in_complete, go_on, a_done = threading.Event(), threading.Event(), threading.Event()
    complete = directory_module.complete

    def held_complete(layout: Any) -> None:
        in_complete.set()
        assert go_on.wait(30)
        complete(layout)

    def first_open() -> None:
        with wbcache.open(directory) as cache:
            cache.put("a", 1)
        a_done.set()

    monkeypatch.setattr(directory_module, "complete", held_complete)
    a = threading.Thread(target=first_open)
    a.start()
    assert in_complete.wait(30)
    probe = DirectoryLock.acquire_shared.__func__  # type: ignore[attr-defined]

    def probe_once_a_is_done(cls: type, path: str, **options: Any) -> Any:
        monkeypatch.setattr(directory_module, "complete", complete)
        go_on.set()
        assert a_done.wait(30)
        return probe(cls, path, **options)

    monkeypatch.setattr(DirectoryLock, "acquire_shared", classmethod(probe_once_a_is_done))
    try:
        with wbcache.open(directory) as cache:  # B
            assert cache.get("a") == 1
    finally:
        go_on.set()
        a.join(30)
    assert a_done.is_set()

