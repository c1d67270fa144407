"""A real multi-process server nobody here wrote: gunicorn with 4 sync workers serving
examples/gunicorn/app.py (`POST /hit/<key>` answers 200 only after `cache.incr(key)` returned),
driven by ApacheBench (`ab`, a real HTTP load tool) while workers are SIGKILLed at random
(gunicorn respawns them) and, once, the whole master. Afterwards the shared directory is
opened again, and every counter must be at least the 200 answers for its key and at most the
requests sent for it.

Needs gunicorn (the test extra) and `ab` (Debian's apache2-utils); without them the test
skips, and CI (WBCACHE_REQUIRE_SERVICES=1) fails instead. The long version runs with --soak.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import require_service
from controlled import wait_until

import wbcache

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "gunicorn"
KEYS = ("home", "about", "cart", "checkout")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def tools() -> tuple[str, str]:
    gunicorn = Path(sys.executable).with_name("gunicorn")
    ab = shutil.which("ab")
    if not gunicorn.exists():
        require_service("gunicorn", "pip install gunicorn (it is in the 'test' extra)")
    if ab is None:
        require_service("ab (ApacheBench)", "apt-get install apache2-utils")
    assert ab is not None
    return str(gunicorn), ab


class Server:
    """gunicorn on the example app, started (and restarted) by this test only."""

    def __init__(self, gunicorn: str, directory: Path, port: int, log: Path) -> None:
        self._command = [gunicorn, "--config", str(EXAMPLE / "gunicorn.conf.py"),
                         "--chdir", str(EXAMPLE), "--bind", f"127.0.0.1:{port}",
                         "--graceful-timeout", "1", "app:app"]
        self._env = {**os.environ, "WBCACHE_EXAMPLE_DIR": str(directory)}
        self._log = log
        self._port = port
        self.master: subprocess.Popen[bytes] | None = None
        self.workers_killed = 0

    def start(self) -> None:
        with self._log.open("ab") as log:
            self.master = subprocess.Popen(self._command, env=self._env, stdout=log,
                                           stderr=subprocess.STDOUT)
        wait_until(lambda: len(self.workers()) == 4 and self._answers(), timeout=30,
                   what="gunicorn serving with 4 workers")

    def _answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self._port), timeout=1):
                return True
        except OSError:
            return False

    def workers(self) -> list[int]:
        assert self.master is not None
        try:
            children = Path(f"/proc/{self.master.pid}/task/{self.master.pid}/children")
            return [int(pid) for pid in children.read_text().split()]
        except FileNotFoundError:
            return []

    def kill_a_worker(self, rng: random.Random) -> None:
        workers = self.workers()
        if workers:
            try:
                os.kill(rng.choice(workers), signal.SIGKILL)
                self.workers_killed += 1
            except ProcessLookupError:
                pass

    def kill_master(self) -> None:
        """SIGKILL the master; its orphaned workers notice and exit (gunicorn checks)."""
        assert self.master is not None
        workers = self.workers()
        self.master.kill()
        self.master.wait()
        for pid in workers:  # they exit by themselves; make sure of it, by their pids
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def stop(self) -> None:
        if self.master is not None and self.master.poll() is None:
            self.master.send_signal(signal.SIGTERM)
            try:
                self.master.wait(30)
            except subprocess.TimeoutExpired:
                self.kill_master()


def ab(ab_path: str, port: int, key: str, requests: int) -> dict[str, int]:
    """Run ApacheBench: `requests` POSTs to /hit/<key>, 4 at a time. Its 200s are counted
    from the response headers it logs (-v 2), one per answer: its summary lines are no ground
    truth here (a refused connection counts as "complete" there, and the first answer of a run
    sets the length every other must have)."""
    done = subprocess.run([ab_path, "-v", "2", "-r", "-n", str(requests), "-c", "4",
                           "-s", "10", "-m", "POST", f"http://127.0.0.1:{port}/hit/{key}"],
                          capture_output=True, text=True, errors="replace")
    out = done.stdout
    answers = re.findall(r"^LOG: header received:\r?\nHTTP/\d\.\d (\d{3})", out, re.MULTILINE)
    assert "Complete requests:" in out, (done.returncode, out[-2000:], done.stderr[-2000:])
    return {"sent": requests, "ok": answers.count("200"), "answers": len(answers)}


def run(tmp_path: Path, *, requests_per_key: int, kill_every: float, seed: int) -> None:
    """Load every key with ab, in chunks, until the chaos plan (3 worker kills, the master
    killed and restarted, then at least one more worker kill) is through AND `requests_per_key`
    requests were sent for each key: the plan never depends on how fast the machine is."""
    gunicorn, ab_path = tools()
    directory, port = tmp_path / "shared", free_port()
    server = Server(gunicorn, directory, port, tmp_path / "gunicorn.log")
    rng = random.Random(seed)
    results: dict[str, dict[str, int]] = {}
    plan_done = threading.Event()
    chunk = min(150, requests_per_key)

    def load(key: str) -> None:
        total = {"sent": 0, "ok": 0, "answers": 0}
        while not (plan_done.is_set() and total["sent"] >= requests_per_key):
            for name, count in ab(ab_path, port, key, chunk).items():
                total[name] += count
        results[key] = total

    server.start()
    master_killed = False
    try:
        loads = [threading.Thread(target=load, args=(key,)) for key in KEYS]
        for thread in loads:
            thread.start()
        while any(thread.is_alive() for thread in loads):
            time.sleep(kill_every)  # the pace of the chaos, not a synchronisation
            if not master_killed and server.workers_killed >= 3:
                server.kill_master()
                master_killed = True
                server.start()
            else:
                server.kill_a_worker(rng)
                if master_killed and server.workers_killed >= 4:
                    plan_done.set()
        for thread in loads:
            thread.join()
    finally:
        plan_done.set()
        server.stop()
    assert server.workers_killed >= 4 and master_killed
    with wbcache.open(directory, shared=True) as cache:
        counted = {key: cache.get(key, 0) for key in KEYS}
    report = {key: (results[key]["sent"], results[key]["ok"], counted[key]) for key in KEYS}
    print(f"\nrequests sent, 200s, counted per key: {report}; workers killed: "
          f"{server.workers_killed}, master killed once")
    for key, (sent, ok, value) in report.items():
        assert ok <= value <= sent, (key, sent, ok, value)  # lost 0, none invented
        assert ok > 0, key


def test_gunicorn_workers_killed_under_load_lose_no_acknowledged_hit(tmp_path: Path) -> None:
    run(tmp_path, requests_per_key=600, kill_every=0.3, seed=1)


@pytest.mark.soak
def test_gunicorn_soak(tmp_path: Path) -> None:
    run(tmp_path, requests_per_key=20_000, kill_every=0.5, seed=2)
