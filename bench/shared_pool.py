"""The worker processes of the shared-directory rows (bench/shared_rows.py): starting them,
talking to them, and giving a trial's shared directory to as many as it needs.

A worker is `python -m bench.shared_worker` (its messages are listed there), started with the
benchmark's own interpreter from the repository's root. Workers are kept for the run and
reused from trial to trial (a process costs more to start than a smoke run's whole trial);
every trial opens a fresh directory, so nothing but the interpreter carries over.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

import wbcache
from bench.workload import Scratch

REPO_ROOT = Path(__file__).resolve().parent.parent
OPEN_TIMEOUT = 120.0  # seconds a worker may take to open the directory and fill its entries
REPORT_TIMEOUT = 120.0  # seconds past its timed work a worker may take to answer


class Worker:
    """One `bench.shared_worker` process: JSON lines to its stdin, from its stdout; its
    stderr goes to a file, quoted when it fails."""

    def __init__(self, name: str, stderr_path: Path) -> None:
        self.name = name
        self._stderr_path = stderr_path
        with open(stderr_path, "wb") as stderr:
            self._process = subprocess.Popen(
                [sys.executable, "-m", "bench.shared_worker"], cwd=REPO_ROOT,
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr, bufsize=0)
        self._buffer = b""

    @property
    def alive(self) -> bool:
        return self._process.poll() is None

    def send(self, message: dict[str, Any]) -> None:
        stdin: BinaryIO | None = self._process.stdin  # type: ignore[assignment]
        assert stdin is not None
        try:
            stdin.write(json.dumps(message).encode() + b"\n")
        except BrokenPipeError:
            raise RuntimeError(f"{self.name} exited: {self._stderr_tail()}") from None

    def receive(self, timeout: float) -> dict[str, Any]:
        """The worker's next message; RuntimeError if it exits or says nothing in time."""
        assert self._process.stdout is not None
        fd = self._process.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RuntimeError(f"{self.name} said nothing for {timeout:g} s")
            if select.select([fd], [], [], left)[0]:
                chunk = os.read(fd, 1 << 20)
                if not chunk:
                    self._process.wait(timeout=10)
                    raise RuntimeError(f"{self.name} exited ({self._process.returncode}): "
                                       f"{self._stderr_tail()}")
                self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        message: dict[str, Any] = json.loads(line)
        return message

    def expect(self, field: str, timeout: float) -> dict[str, Any]:
        message = self.receive(timeout)
        if field not in message:
            raise RuntimeError(f"{self.name} said {message!r}, not {field!r}")
        return message

    def stats(self) -> dict[str, Any]:
        self.send({"stats": True})
        stats: dict[str, Any] = self.expect("stats", REPORT_TIMEOUT)["stats"]
        return stats

    def stop(self) -> None:
        """End of input: the worker closes its cache, if one is open, and exits (killed if it
        has not within `REPORT_TIMEOUT`)."""
        assert self._process.stdin is not None
        self._process.stdin.close()
        try:
            self._process.wait(timeout=REPORT_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        if self._process.poll() is None:
            self._process.kill()
            self._process.wait()

    def _stderr_tail(self) -> str:
        try:
            return self._stderr_path.read_text(errors="replace").strip()[-400:]
        except OSError:
            return "(no stderr)"


class WorkerPool:
    """The worker processes of the run, started when a trial first needs them and reused by
    the next trials (a worker that died or was killed is replaced); stopped at the end."""

    def __init__(self, stderr_dir: Path) -> None:
        self._stderr_dir = stderr_dir
        self._workers: list[Worker] = []
        self._started = 0

    def take(self, count: int) -> list[Worker]:
        self._workers = [worker for worker in self._workers if worker.alive]
        while len(self._workers) < count:
            self._started += 1
            self._workers.append(Worker(
                f"shared worker {self._started}",
                self._stderr_dir / f"shared-worker-{self._started}.stderr"))
        return self._workers[:count]

    def stop(self) -> None:
        for worker in self._workers:
            worker.stop()
        self._workers = []


class SharedDirectory:
    """A shared directory and the pool's workers one trial uses on it."""

    def __init__(self, root: Path, workers: list[Worker]) -> None:
        self.root = root
        self.workers = workers
        self._opened: list[Worker] = []

    def open(self, index: int, job: str | None = None, *args: object,
             **options: object) -> Worker:
        """Worker `index` opens the directory (with `options`) and starts `job`; when it has
        opened and set up, it says "ready" (not waited for here)."""
        worker = self.workers[index]
        worker.send({"open": str(self.root), "index": index, "options": options, "job": job,
                     "args": list(args)})
        self._opened.append(worker)
        return worker

    def close(self) -> None:
        """Every worker that opened the directory closes it (flushing what is dirty)."""
        for worker in self._opened:
            worker.send({"close": True})
        for worker in self._opened:
            worker.expect("closed", REPORT_TIMEOUT)
        self._opened = []


@contextmanager
def working_on(root: Path, pool: WorkerPool, count: int) -> Iterator[SharedDirectory]:
    """`count` workers of `pool` for one trial on the shared directory `root` (made here, by
    this process, if it does not exist: not by racing first opens). On the way out the workers
    close it, or, if the trial failed, are killed (the pool replaces them)."""
    if not root.exists():
        wbcache.open(root, shared=True).close()
    shared = SharedDirectory(root, pool.take(count))
    try:
        yield shared
    except BaseException:
        for worker in shared.workers:
            worker.kill()
        raise
    shared.close()


@contextmanager
def fresh_directory(scratch: Scratch, pool: WorkerPool, name: str,
                    count: int) -> Iterator[SharedDirectory]:
    """`working_on` a new shared directory, deleted after the trial."""
    with scratch.directory(name) as path, working_on(path / "c", pool, count) as shared:
        yield shared
