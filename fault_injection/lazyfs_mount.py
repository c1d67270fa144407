"""`LazyfsMount`: one LazyFS file system the harness mounts, cuts and unmounts itself.

LazyFS (INESC TEC, MIT; the tool Jepsen uses) is a FUSE file system with a page cache of its
own: a byte written through it reaches the backing directory only when its file is fsync'd (or
written with O_DSYNC), and the command `lazyfs::clear-cache` drops every byte that never was:
what a power cut does to the page cache, for the log's files and LMDB's alike. It applies
creates, unlinks and renames to the backing directory at once, so a missing DIRECTORY fsync is
invisible to it (the trace-based power-loss mode covers that).

Everything lives under one base directory the caller owns (the run's scratch space, never a
shared path such as /tmp/lazyfs-mnt):

    base/root/    the backing directory: what survives a cut
    base/mnt/     the mount point: what processes under test see
    base/state/   config.toml, the fault FIFOs, LazyFS's log and output

The harness starts the `lazyfs` process itself (in the foreground, so the pid it holds is the
file system's own) and ends only that process, by that pid; `unmount` runs even when a cycle
failed (use the mount as a context manager).

LazyFS reads its fault FIFO 100 bytes at a time and a command must fit in one read. A torn
write armed while a process runs (`arm_torn`: the next write to a file) names the file, so
LazyFS is given the backing directory through a short symbolic link, /tmp/wl-<6 hex digits>
(made at the first mount, removed by `close`): the names it uses and reports are under that
link (`lazyfs_path`). Faults known before the process starts are given in config.toml as
`[[injection]]` tables at mount time (lazyfs_config.py, `Injection`).
"""

from __future__ import annotations

import errno
import os
import re
import secrets
import select
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from wbcache.fault_injection.lazyfs_config import Injection, toml_value

MOUNT_TIMEOUT = 20.0  # s for the mount point to appear
COMMAND_TIMEOUT = 60.0  # s for LazyFS to carry out a command (clearing a large cache)
UNMOUNT_TIMEOUT = 20.0  # s for the process to leave after its file system is unmounted
FIFO_COMMAND_MAX = 100  # bytes LazyFS reads from its FIFO per command (main.cpp MAX_READ_CHUNK)
CACHE_SIZE = "256MB"  # LazyFS's cache (allocated at mount: 1GB takes 0.7 s); a cycle writes a
#                      few MB, and `Report.cache_usage` shows it never fills (a full cache
#                      writes through, and a cut would then drop less than a real one)

_REPORT_FILE = re.compile(r"=> file: '(.*)'")
_USAGE = re.compile(r"cache usage \(%pages\) is ([0-9.]+)%")
_REPORT_END = ("report: all data blocks are synced!", "report: total number of bytes un-fsynced")


class LazyfsError(Exception):
    """A LazyFS file system did not mount, unmount or answer a command as expected."""


@dataclass
class Report:
    """LazyFS's `unsynced-data-report`: the files holding bytes no fsync has covered."""

    files: list[str] = field(default_factory=list)  # as LazyFS names them (backing paths)
    unsynced_bytes: int = 0
    cache_usage: float | None = None  # percent of LazyFS's cache pages in use at the cut


class LazyfsMount:
    """A LazyFS file system over `base`/root, mounted at `base`/mnt (module docstring)."""

    def __init__(self, binary: str, base: str) -> None:
        self.binary = binary
        self.base = os.path.abspath(base)
        self.root = os.path.join(self.base, "root")
        # How LazyFS names `root` (module docstring): short, so a command naming a file fits
        self.link = os.path.join("/tmp", f"wl-{secrets.token_hex(3)}")
        self.mnt = os.path.join(self.base, "mnt")
        self.state = os.path.join(self.base, "state")
        self._faults = os.path.join(self.state, "faults.fifo")
        self._completed = os.path.join(self.state, "faults-done.fifo")
        self._config = os.path.join(self.state, "config.toml")
        self.log_path = os.path.join(self.state, "lazyfs.log")
        self._process: subprocess.Popen[bytes] | None = None
        self._completed_fd: int | None = None
        self.mounts = 0

    # ------------------------------------------------------------------ paths

    def lazyfs_path(self, path: str) -> str:
        """The name LazyFS gives `path` (under the mount point) in its injections and reports:
        the backing path (its `subdir` module prefixes every path with the backing root)."""
        relative = os.path.relpath(os.path.abspath(path), self.mnt)
        if relative.startswith(os.pardir):
            raise ValueError(f"{path} is not under the mount point {self.mnt}")
        return os.path.normpath(os.path.join(self.link, relative))

    def backing_path(self, path: str) -> str:
        """Where the bytes of `path` (under the mount point) are kept."""
        relative = os.path.relpath(self.lazyfs_path(path), self.link)
        return os.path.normpath(os.path.join(self.root, relative))

    # ------------------------------------------------------------------ lifecycle

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    @property
    def mounted(self) -> bool:
        """Whether the mount point is mounted, a dead one (its process crashed) included:
        `os.path.ismount` cannot tell, since stat() of a dead FUSE mount fails."""
        return is_mount_point(self.mnt)

    def alive(self) -> bool:
        """Whether the LazyFS process is still running (a crash fault ends it)."""
        return self._process is not None and self._process.poll() is None

    def ended_within(self, seconds: float) -> bool:
        """Whether the LazyFS process ends within `seconds` (one that is killing itself at a
        crash fault has closed its FIFOs before it can be waited for)."""
        if self._process is None:
            return True
        try:
            self._process.wait(seconds)
        except subprocess.TimeoutExpired:
            return False
        return True

    def evidence(self) -> list[str]:
        """The files worth keeping when something went wrong (never the FIFOs)."""
        return [self._config, self.log_path, os.path.join(self.state, "lazyfs.out")]

    def mount(self, injections: Sequence[Injection] = ()) -> None:
        """Start LazyFS with these injections and wait until the mount point is live."""
        if self._process is not None:
            raise LazyfsError(f"{self.mnt}: already mounted by this harness")
        if self.mounted:
            raise LazyfsError(f"{self.mnt} is already a mount point (not ours): refusing")
        if "," in self.root:
            raise ValueError(f"LazyFS cannot be backed by {self.root}: FUSE splits its "
                             f"options at commas")
        for path in (self.root, self.mnt, self.state):
            os.makedirs(path, mode=0o700, exist_ok=True)
        if os.path.islink(self.link) and os.readlink(self.link) != self.root:
            raise LazyfsError(f"{self.link} exists and is not this harness's link")
        if not os.path.islink(self.link):
            os.symlink(self.root, self.link)  # never follows or replaces what is there
        self._write_config(injections)
        if not os.path.exists(self._completed):
            os.mkfifo(self._completed, 0o600)
        # LazyFS opens the completion FIFO for writing, which blocks until a reader exists:
        # ours is open before it starts, and stays open for as long as it runs.
        self._completed_fd = os.open(self._completed, os.O_RDONLY | os.O_NONBLOCK)
        with open(os.path.join(self.state, "lazyfs.out"), "ab") as out:
            # -f: in the foreground, so this pid is the file system's own process.
            # -s: one FUSE thread. Multi-threaded, LazyFS loses committed writes to a file
            # that several processes write at once, with no cut at all: four processes
            # incrementing counters in one LMDB (sync and metasync on) through it lost 30-160
            # of 40,000 increments, and LMDB pages were reused while live; the same runs were
            # exact on ext4, with data.mdb off the mount, or with -s (docs/lazyfs.md).
            # The config path is given relative to the working directory: LazyFS takes a
            # --config-path containing "-o" (as in ".../w-sync-off/...") for an option.
            self._process = subprocess.Popen(
                [self.binary, self.mnt, "--config-path", os.path.basename(self._config),
                 "-o", "modules=subdir",
                 "-o", f"subdir={self.link}", "-f", "-s"],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, cwd=self.state)
        deadline = time.monotonic() + MOUNT_TIMEOUT
        while not self.mounted:
            if self._process.poll() is not None or time.monotonic() > deadline:
                tail = self._output_tail()
                self.unmount()
                raise LazyfsError(f"LazyFS did not mount at {self.mnt}; its output: {tail}")
            time.sleep(0.01)
        self._wait_for_fifo(deadline)
        self.mounts += 1

    def unmount(self) -> None:
        """Unmount (also a file system whose process died) and end our LazyFS process, by its
        pid. Safe to call at any time, twice included."""
        try:
            if self.mounted and self._process is not None:
                self._fusermount()
        finally:
            process, self._process = self._process, None
            if process is not None:
                _end(process)
            if self._completed_fd is not None:
                os.close(self._completed_fd)
                self._completed_fd = None

    def close(self) -> None:
        """Unmount, and remove the link to the backing directory (module docstring)."""
        try:
            self.unmount()
        finally:
            if os.path.islink(self.link) and os.readlink(self.link) == self.root:
                os.unlink(self.link)

    def __enter__(self) -> LazyfsMount:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ commands

    def cut(self) -> Report:
        """The power cut: report what is unsynced, then drop it (`lazyfs::clear-cache`), and
        wait until LazyFS says it is done. The caller has stopped every writer first."""
        report = self.unsynced_report()
        report.cache_usage = self.cache_usage()
        self._command("lazyfs::clear-cache")
        self._await_completion("finished::clear-cache")
        return report

    def unsynced_report(self) -> Report:
        """LazyFS's list of the files holding unsynced bytes (from its log)."""
        start = self._log_size()
        self._command("lazyfs::unsynced-data-report")
        return _parse_report(self._await_log(start, _REPORT_END, "unsynced-data report"))

    def _await_log(self, start: int, ends: Sequence[str], what: str) -> str:
        """LazyFS's log from offset `start`, once it holds one of `ends` (its fault thread
        answers commands there, and only there)."""
        deadline = time.monotonic() + COMMAND_TIMEOUT
        while True:
            text = self._log_from(start)
            if any(end in text for end in ends):
                return text
            if not self.alive() or time.monotonic() > deadline:
                raise LazyfsError(f"LazyFS gave no {what} within {COMMAND_TIMEOUT} s "
                                  f"(log {self.log_path})")
            time.sleep(0.005)

    def cache_usage(self) -> float:
        """Percent of LazyFS's cache pages in use (`lazyfs::display-cache-usage`)."""
        start = self._log_size()
        self._command("lazyfs::display-cache-usage")
        text = self._await_log(start, ("cache usage",), "cache usage")
        match = _USAGE.search(text)
        if match is None:
            raise LazyfsError(f"LazyFS's cache usage line was not understood: {text[-300:]!r}")
        return float(match.group(1))

    def arm_crash(self, op: str, path_regex: str, timing: str = "before") -> None:
        """Make LazyFS kill itself just `timing` ("before" or "after") the next `op` (fsync,
        unlink, write, ...) on a path matching `path_regex` (`lazyfs::crash`; unsynced bytes
        die with it). Returns once LazyFS has accepted the fault."""
        start = self._log_size()
        self._command(f"lazyfs::crash::timing={timing}::op={op}::from_rgx={path_regex}")
        text = self._await_log(start, ("VALID crash fault",), "answer to a crash fault")
        if "INVALID crash fault" in text:
            raise LazyfsError(f"LazyFS refused the crash fault op={op} from_rgx={path_regex}: "
                              f"{text[-500:]}")

    def arm_torn(self, path: str, parts: int, persist: Sequence[int]) -> None:
        """Make LazyFS tear the next write to `path` (as `lazyfs_path` names it) in `parts`
        equal parts, write only those numbered in `persist` (from 1), and kill itself
        (`lazyfs::torn-op`). Returns once LazyFS has accepted the fault."""
        start = self._log_size()
        self._command(f"lazyfs::torn-op::file={path}::parts={parts}"
                      f"::persist={','.join(str(part) for part in persist)}")
        text = self._await_log(start, ("configured successfully", "INVALID torn-op fault"),
                               "answer to a torn-op fault")
        if "INVALID torn-op fault" in text:
            raise LazyfsError(f"LazyFS refused the torn-op fault on {path}: {text[-500:]}")

    def crash_report(self) -> Report:
        """What LazyFS reported unsynced when a crash fault ended it (it reports first)."""
        text = self._log_from(0)
        at = text.rfind("Triggered fault condition")
        return _parse_report(text[at:]) if at >= 0 else Report()

    def log_text(self) -> str:
        return self._log_from(0)

    def _command(self, command: str) -> None:
        line = (command + "\n").encode()
        if len(line) > FIFO_COMMAND_MAX:
            raise ValueError(f"LazyFS command of {len(line)} bytes: it reads at most "
                             f"{FIFO_COMMAND_MAX} per command ({command!r})")
        if not self.alive():
            raise LazyfsError(f"LazyFS at {self.mnt} is not running; cannot send {command}")
        fd = os.open(self._faults, os.O_WRONLY | os.O_NONBLOCK)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)

    def _await_completion(self, expected: str) -> None:
        assert self._completed_fd is not None
        deadline = time.monotonic() + COMMAND_TIMEOUT
        received = b""
        while expected.encode() not in received:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self.alive():
                raise LazyfsError(f"LazyFS did not confirm {expected!r} within "
                                  f"{COMMAND_TIMEOUT} s (log {self.log_path})")
            ready, _, _ = select.select([self._completed_fd], [], [], min(remaining, 0.5))
            if ready:
                try:
                    received += os.read(self._completed_fd, 4096)
                except BlockingIOError:
                    continue

    # ------------------------------------------------------------------ internals

    def _write_config(self, injections: Sequence[Injection]) -> None:
        text = "\n".join([
            "[faults]",
            f"fifo_path={toml_value(self._faults)}",
            f"fifo_path_completed={toml_value(self._completed)}",
            "[cache]",
            "apply_eviction=false",
            "[cache.simple]",
            f"custom_size={toml_value(CACHE_SIZE)}",
            "blocks_per_page=1",
            "[filesystem]",
            "log_all_operations=false",
            f"logfile={toml_value(self.log_path)}",
            *(injection.toml() for injection in injections),
        ]) + "\n"
        with open(self._config, "w", encoding="utf-8") as config:
            config.write(text)

    def _wait_for_fifo(self, deadline: float) -> None:
        """Wait until LazyFS's fault thread has its FIFO open (a writer then finds a reader)."""
        while True:
            try:
                os.close(os.open(self._faults, os.O_WRONLY | os.O_NONBLOCK))
                return
            except OSError as exc:
                if exc.errno not in (errno.ENXIO, errno.ENOENT):
                    raise
            if not self.alive() or time.monotonic() > deadline:
                tail = self._output_tail()
                self.unmount()
                raise LazyfsError(f"LazyFS at {self.mnt} never opened its fault FIFO: {tail}")
            time.sleep(0.005)

    def _fusermount(self) -> None:
        deadline = time.monotonic() + UNMOUNT_TIMEOUT
        while True:
            done = subprocess.run(["fusermount3", "-u", self.mnt], capture_output=True,
                                  text=True, check=False)
            if done.returncode == 0 or not self.mounted:
                return
            if time.monotonic() > deadline:
                # Busy for too long: detach it lazily, so that nothing is left mounted.
                subprocess.run(["fusermount3", "-u", "-z", self.mnt], capture_output=True,
                               check=False)
                raise LazyfsError(f"{self.mnt} stayed busy for {UNMOUNT_TIMEOUT} s; detached "
                                  f"lazily: {done.stderr.strip()}")
            time.sleep(0.05)

    def _log_size(self) -> int:
        try:
            return os.path.getsize(self.log_path)
        except FileNotFoundError:
            return 0

    def _log_from(self, offset: int) -> str:
        try:
            with open(self.log_path, "rb") as log:
                log.seek(offset)
                return log.read().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""

    def _output_tail(self) -> str:
        try:
            with open(os.path.join(self.state, "lazyfs.out"), "rb") as out:
                return out.read()[-1500:].decode("utf-8", "replace").strip() or "(no output)"
        except FileNotFoundError:
            return "(no output)"


def is_mount_point(path: str) -> bool:
    """Whether `path` is listed in /proc/self/mountinfo (the kernel's own list)."""
    target = os.path.realpath(path)
    with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as mounts:
        for line in mounts:
            fields = line.split(" ")
            # Field 5 is the mount point, with space, tab, newline and backslash octal-escaped.
            if len(fields) > 4 and _unescape(fields[4]) == target:
                return True
    return False


def _unescape(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda match: chr(int(match.group(1), 8)), field)


def _end(process: subprocess.Popen[bytes]) -> None:
    """Wait for our LazyFS process to leave after its unmount; else terminate it, by pid."""
    try:
        process.wait(UNMOUNT_TIMEOUT)
        return
    except subprocess.TimeoutExpired:
        pass
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if process.poll() is not None:
            return
        process.send_signal(sig)
        try:
            process.wait(5.0)
            return
        except subprocess.TimeoutExpired:
            continue


def _parse_report(text: str) -> Report:
    report = Report()
    for line in text.splitlines():
        match = _REPORT_FILE.search(line)
        if match and match.group(1) not in report.files:
            report.files.append(match.group(1))
        if "total number of bytes un-fsynced:" in line:
            digits = re.search(r"un-fsynced: (\d+)", line)
            if digits:
                report.unsynced_bytes += int(digits.group(1))
    return report
