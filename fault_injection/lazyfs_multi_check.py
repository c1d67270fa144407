"""The check's open after a multi-process power cut (lazyfs_multi.py), in a child process.

    python -m wbcache.fault_injection.lazyfs_multi_check '<RecoveryRequest as JSON>'

After the cut and a fresh mount, every node directory (or the shared directory) is opened once:
recovery replays what each log kept (into PostgreSQL, or, adopting every lane, into the shared
LMDB database), and a shared directory's keys are read back. In a child, because an open that
fails can leave a lock's descriptor (and its flock) behind in the process that tried, and none
may stay in the harness, where it would keep a lane from ever being adopted.

`lazyfs_truncate_artefact` recognises the one failure that is LazyFS's and not the library's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import msgpack

import wbcache
from wbcache.fault_injection.node_worker import URL_VARIABLE
from wbcache.fault_injection.process_group import GROUP_TIMEOUT, SAFE_PATH
from wbcache.fault_injection.runner import worker_env

MODULE = "wbcache.fault_injection.lazyfs_multi_check"


_DIRECT_CAUSE = "\nThe above exception was the direct cause of the following exception:\n"


def _last_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[-1].strip() if lines else ""


def lazyfs_truncate_artefact(stderr: str) -> bool:
    """Whether a process died of LazyFS's spurious truncate error: ENOENT from a truncate of an
    OPEN file, which no real file system returns. LazyFS's `lfs_truncate` (src/lazyfs.cpp)
    ends with `if (res == -1) return -errno;` where `res` is left uninitialised when the file
    is in its cache, so now and then a truncate that worked reports the errno of an earlier
    call. Two places meet it, told apart by the traceback's last lines:

      * `os.ftruncate(...)` raising FileNotFoundError (met in `DirectoryLock.record_owner`
        until it stopped truncating LOCK; any ftruncate of an open file would qualify);
      * `lmdb.open(...)` raising `lmdb.Error: <dir>: No such file or directory` for the
        database directory just made (`os.makedirs`): inside, LMDB's only call that can fail
        so is the ftruncate that sizes lock.mdb (opening with O_CREAT in an existing
        directory cannot). It reaches the caller as the `DatabaseError` raised from it
        (wbcache/backends/lmdb.py, `lmdb_errors`): the traceback of its cause is judged."""
    *causes, last_raised = stderr.split(_DIRECT_CAUSE) or [""]
    if causes and _last_line(last_raised).startswith("wbcache.errors.DatabaseError: "):
        stderr = causes[-1]
    lines = [line.strip() for line in stderr.strip().splitlines()]
    lines = [line for line in lines if line.strip("^~ ")]  # 3.11's carets under the code
    if len(lines) < 2:
        return False
    last, code = lines[-1], lines[-2]
    if last.startswith("FileNotFoundError: [Errno 2]") and "ftruncate(" in code:
        return True
    return (last.startswith("lmdb.Error: ") and last.endswith(": No such file or directory")
            and "lmdb.open(" in code)


@dataclass
class RecoveryRequest:
    """What the check's child process opens (recovering each), and whether it reads the keys
    back (a shared directory; the nodes' keys are read from PostgreSQL, outside LazyFS)."""

    directories: list[str]
    shared: bool = False

    def to_json(self) -> str:
        return json.dumps(asdict(self))


@dataclass
class Recovered:
    replayed: int = 0  # log records replayed by the opens
    state: dict[Any, Any] | None = None  # every key (shared), else None


def recover_directories(request: RecoveryRequest) -> Recovered:
    """Open each directory (recovery replays what its log kept; a shared open also adopts
    every orphan lane), close it; with `shared`, read every key first."""
    recovered = Recovered()
    for directory in request.directories:
        if request.shared:
            with wbcache.open(directory, shared=True) as cache:
                recovered.replayed += cache.recovery.replayed
                recovered.state = dict(cache.items())
        else:
            with wbcache.open(directory, backend=os.environ[URL_VARIABLE]) as cache:
                recovered.replayed += cache.recovery.replayed
    return recovered


def recover_in_child(request: RecoveryRequest, env: Mapping[str, str], scratch: str
                     ) -> tuple[Recovered | None, str]:
    """`recover_directories` in a child process: (what it gave, or None; its stderr)."""
    os.makedirs(scratch, exist_ok=True)
    done = subprocess.run([sys.executable, "-m", MODULE, request.to_json()],
                          capture_output=True, env=worker_env({**SAFE_PATH, **env}),
                          cwd=scratch, timeout=GROUP_TIMEOUT, check=False)
    stderr = done.stderr.decode("utf-8", "replace")
    if done.returncode != 0:
        return None, stderr
    replayed, state = msgpack.unpackb(done.stdout, raw=False, strict_map_key=False)
    return Recovered(replayed, state), stderr


def _main(argv: list[str]) -> None:
    request = RecoveryRequest(**json.loads(argv[1]))
    recovered = recover_directories(request)
    sys.stdout.buffer.write(msgpack.packb([recovered.replayed, recovered.state],
                                          use_bin_type=True))


if __name__ == "__main__":
    _main(sys.argv)
