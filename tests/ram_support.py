"""Where tests may keep files in RAM: /dev/shm when it is a tmpfs (see conftest.ram_path).

Only for tests whose claims are about bytes and logic, not about the disk: recovery of
damaged logs, faults injected in this process, crashes and power loss simulated in this
process. Each open of a cache costs several fsyncs that prove nothing there, and on a busy
disk they were most of such a test's time. Tests of durability on the real disk (strace,
LazyFS, SIGKILLed processes) keep tmp_path.
"""

from __future__ import annotations


def _tmpfs(path: str) -> bool:
    try:
        with open("/proc/self/mounts") as mounts:
            return any(line.split()[1:3] == [path, "tmpfs"] for line in mounts)
    except OSError:
        return False


RAM_DIR: str | None = "/dev/shm" if _tmpfs("/dev/shm") else None  # None: the default tmp
