"""Prove from the real system calls that no log segment outlives the database's durability.

A cache deletes a log segment once the database checkpoint covers it (a flush, or recovery at
open). If the database's own commit is not on disk when the segment goes, a power cut loses the
data with the log that held it. LMDB is C code: the power-loss model (powerloss.py) takes its
commits as durable when `apply` returns and cannot see whether LMDB synced at all, so opening
it with `sync=False` or `metasync=False` would pass that model. This module looks instead at
what the process really asked of the kernel: run it under strace with `strace_command`, then
`check_syscall_order` reads the log. What it proves, for every successful unlink of
`DIR/wal/<20 digits>.log`:

  db-not-synced       every change to `DIR/db/data.mdb` that began before the unlink was
                      durable before the unlink began: a write through a descriptor opened
                      with O_DSYNC/O_SYNC had returned, and any other write (pwrite, writev,
                      ftruncate...) had returned before an fsync/fdatasync of the file (or an
                      msync(MS_SYNC) of its map, a sync, a syncfs) that itself returned 0
                      before the unlink. A writable shared map of the file (LMDB's writemap)
                      counts as a write that lasts until it is unmapped: stores to it are
                      invisible to strace, so no order can be proven while it exists.
  checkpoint-behind   the checkpoint of the last commit written before the unlink covers the
                      segment. The checkpoint is read from the bytes LMDB wrote (meta page ->
                      main database -> "meta" database -> key "checkpoint"), the segment's last
                      LSN is the first LSN of the next segment (by name) minus one. Together
                      with db-not-synced: the commit that covers the segment is on disk first.
  db-dir-not-synced   an open of data.mdb with O_CREAT was followed by an fsync of `DIR/db`
                      before any segment unlink (the new file's directory entry is durable).
  wal-dir-not-synced  the unlink itself was followed by an fsync of `DIR/wal` before the next
                      acknowledgement the traced program marks with `acknowledge` (e.g. after
                      flush() or close() returned), and before the trace ends.
  unclassified-db-syscall  a system call on data.mdb this checker does not understand (a new
                      LMDB could write another way): refused rather than guessed.

What LMDB does (0.9.x, seen with strace): a commit writes its pages with pwrite64 or lseek +
writev through its read-write descriptor, fdatasyncs it, then writes the 120-byte tail of the
meta page through a second descriptor opened O_WRONLY|O_DSYNC, and never syncs after that. With
metasync=False the meta page goes through the plain descriptor and nothing syncs it; the two
traces differ only in the descriptor, so the checker tracks O_DSYNC per descriptor. With
sync=False nothing is synced. With writemap, LMDB ftruncates data.mdb to the map size, maps it
PROT_WRITE|MAP_SHARED and msyncs (MS_ASYNC under map_async): no write call is left to see.

How it reads the log: one line per event, in the order strace saw them, which is a valid order
of the real events (a call runs after its entry line is written and has finished before its
exit line is), so "A returned before B began" is "A's exit line comes before B's entry line".
`<unfinished ...>` / `<... resumed>` pairs of concurrent threads are joined; threads are mapped
to their process through the traced clone calls (descriptors and maps are per process).

What it cannot prove:
  * what the disk does: it sees the order in which fsync returned, not whether the device
    honours flushes (that is the job of a real power cut: LazyFS, built later);
  * stores through a writable map, asynchronous I/O (io_uring, aio) and writes made before the
    trace began; the first two are refused or invisible, LMDB uses neither unless writemap. The
    trace must start with the process: a descriptor it did not see opened counts as plain;
  * renames: a segment moved aside (salvage) is not a deletion here;
  * a segment with no successor (recovery deletes the last one too): its last LSN is unknown
    from names, so only "checkpoint >= its first LSN - 1" is checked;
  * the checkpoint when LMDB's trees are deeper than one leaf (the main database holds three
    named databases, "meta" one key; both stay single leaves) or the page bytes were cut by
    strace (-s): the commit then counts as unknown, which makes later unlinks fail, not pass.

Only the standard library: the torture harness and the tests both use it. Longer than the
usual ~400 lines because the strace parser, the LMDB page reader and the checker make one proof
and have no other user yet; the parser can move to its own module when a second checker needs it.
"""

from __future__ import annotations

import mmap
import os
import re
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

# Every call but those that cannot change a file (reads, waits, signals, memory protection),
# which only make the log longer. -yy names the file behind every descriptor; -s 8192 keeps
# whole LMDB pages (4 KiB) in the log, so the checkpoint can be read from them.
_UNTRACED = ("read,pread64,readv,preadv,preadv2,recvfrom,recvmsg,getdents64,futex,poll,ppoll,"
             "select,pselect6,epoll_wait,epoll_pwait,nanosleep,clock_nanosleep,brk,mprotect,"
             "madvise,rt_sigaction,rt_sigprocmask,rt_sigreturn,getpid,gettid,getrandom")
STRACE_OPTIONS = ("-f", "-yy", "-qq", "-s", "8192", "--seccomp-bpf", "-e", "signal=none",
                  "-e", f"trace=!{_UNTRACED}")
ACK_DIR = ".syscall-order-ack"  # under the cache directory; never created


def strace_command(argv: list[str], log_path: str, strace: str = "strace") -> list[str]:
    """The command that runs `argv` under strace, logging what the checker needs to `log_path`."""
    return [strace, *STRACE_OPTIONS, "-o", log_path, "--", *argv]


def acknowledge(cache_dir: str, label: str) -> None:
    """Mark in the trace that the program has acknowledged something (a flush returned): a
    failed lookup of a path that never exists, which the checker recognizes."""
    os.access(os.path.join(os.path.abspath(cache_dir), ACK_DIR, label), os.F_OK)


@dataclass(frozen=True)
class Violation:
    rule: str
    line: int  # in the strace log, 1-based
    message: str
    phase: str  # label of the last acknowledgement before it ("" before the first)


@dataclass
class OrderReport:
    """What the log held and what was wrong with it; `ok` when nothing was."""

    violations: list[Violation] = field(default_factory=list)
    segment_unlinks: int = 0
    unlink_threads: set[int] = field(default_factory=set)
    unlink_phases: list[str] = field(default_factory=list)  # per unlink: the last ack before it
    db_writes: int = 0
    db_syncs: int = 0
    wal_dir_syncs: int = 0
    checkpoints: list[int | None] = field(default_factory=list)  # per commit, in order
    acks: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.violations

    def rules(self) -> set[str]:
        return {violation.rule for violation in self.violations}


# ---- parsing ---------------------------------------------------------------------------------

@dataclass
class Call:
    tid: int
    name: str
    args: list[str]
    ret: str | None  # None: never returned (killed, or the trace ended)
    enter: int
    exit: int

    @property
    def retval(self) -> int | None:
        match = _RET.match(self.ret or "")
        return int(match.group(1), 0) if match else None


_LINE = re.compile(r"(\d+)\s+(?:\d\d:\d\d:\d\d(?:\.\d+)?\s+)?(.*)")
_RESUMED = re.compile(r"<\.\.\. ([\w?]+) resumed>(.*)")
_UNFINISHED = " <unfinished ...>"
_RET = re.compile(r"(-?\d+|0x[0-9a-f]+)")
_FD = re.compile(r"(-?\d+|AT_FDCWD)<(.*)>\Z", re.S)
_ESCAPE = re.compile(rb"\\(x[0-9a-fA-F]{2}|[0-7]{1,3}|.)", re.S)
_SIMPLE = {b"n": 10, b"t": 9, b"r": 13, b"v": 11, b"f": 12, b"a": 7, b"b": 8}


def _unescape(text: str) -> bytes:
    def one(match: re.Match[bytes]) -> bytes:
        code = match.group(1)
        if code[:1] == b"x":
            return bytes([int(code[1:], 16)])
        if code[:1].isdigit():
            return bytes([int(code, 8) & 0xFF])
        return bytes([_SIMPLE.get(code, code[0])])
    return _ESCAPE.sub(one, text.encode("latin-1"))


def _scan(text: str) -> tuple[list[str], int]:
    """Split strace arguments at top-level commas, keeping strings, brackets and the <path>
    after a descriptor whole; stop at a ")" that closes more than it opened. Returns the
    arguments and the index just past where it stopped."""
    parts: list[str] = []
    depth, start, i, n = 0, 0, 0, len(text)
    while i < n:
        char = text[i]
        if char == '"' or (char == "<" and i and (text[i - 1].isdigit() or text[i - 1] == "D")):
            close = '"' if char == '"' else ">"  # "D": AT_FDCWD</cwd>
            i += 1
            while i < n and text[i] != close:
                i += 2 if text[i] == "\\" else 1
        elif char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
            if depth < 0:
                break
        elif char == "," and depth == 0:
            parts.append(text[start:i].strip())
            start = i + 1
        i += 1
    tail = text[start:i].strip()
    return ([*parts, tail] if tail or parts else []), i + 1


def _split(text: str) -> list[str]:
    return _scan(text)[0]


def _finish(tid: int, text: str, enter: int, exit_: int) -> Call | None:
    """A whole call `name(args) = ret` (resumed halves already joined)."""
    name, paren, rest = text.partition("(")
    if not paren or not re.fullmatch(r"\w+", name):
        return None
    args, end = _scan(rest)
    tail = rest[end:]
    ret = tail.split("=", 1)[1].strip() if "=" in tail else None
    if ret is not None and ret.startswith("?"):
        ret = None
    return Call(tid, name, args, ret, enter, exit_)


def parse_strace(lines: Iterable[str]) -> list[Call]:
    """The calls of a `strace -f` log in the order they began, unfinished halves joined."""
    calls: list[Call] = []
    pending: dict[int, tuple[str, int]] = {}  # tid -> (text so far, entry line)
    for number, raw in enumerate(lines, 1):
        match = _LINE.match(raw.rstrip("\n"))
        if not match:
            if raw.strip():
                raise ValueError(f"strace log line {number} has no thread id; record it with "
                                 f"STRACE_OPTIONS (-f): {raw[:80]!r}")
            continue
        tid, text = int(match.group(1)), match.group(2)
        if text.startswith(("+++", "---")):
            continue
        resumed = _RESUMED.match(text)
        if resumed:
            head, enter = pending.pop(tid, (resumed.group(1) + "(", number))
            text = head + resumed.group(2)
        else:
            enter = number
        if text.endswith(_UNFINISHED):
            pending[tid] = (text[: -len(_UNFINISHED)], enter)
            continue
        call = _finish(tid, text, enter, number)
        if call is not None:
            calls.append(call)
    for tid, (text, enter) in pending.items():  # never resumed: the process died inside
        call = _finish(tid, text + ")", enter, enter)
        if call is not None:
            call.ret = None
            calls.append(call)
    calls.sort(key=lambda call: (call.enter, call.exit))
    return calls


def _fd_path(token: str) -> tuple[int | None, str | None]:
    match = _FD.match(token)
    if not match:
        return None, None
    fd = None if match.group(1) == "AT_FDCWD" else int(match.group(1))
    path = os.fsdecode(_unescape(match.group(2)))
    return fd, path.removesuffix(" (deleted)")


def _string(token: str) -> bytes | None:
    """The bytes of a whole "..." argument; None if strace cut it (or it is no string)."""
    if len(token) >= 2 and token[0] == '"' and token[-1] == '"':
        return _unescape(token[1:-1])
    return None


# ---- LMDB pages ------------------------------------------------------------------------------

_P_INVALID = (1 << 64) - 1
_P_BRANCH, _P_LEAF = 0x01, 0x02
_F_BIGDATA = 0x01
_META_ROOT, _META_TXNID, _META_PSIZE, _META_END = 128, 144, 40, 152  # offsets in a meta page


class _Image:
    """The bytes of data.mdb this trace wrote, by page, with which bytes are known."""

    def __init__(self) -> None:
        self.psize = mmap.PAGESIZE
        self.broken = False  # a write landed where we could not follow it
        self._pages: dict[int, tuple[bytearray, bytearray]] = {}

    def write(self, offset: int, data: bytes | None, length: int) -> None:
        """`length` bytes written at `offset`; `data` None: written but unknown to us."""
        end = offset + length
        while offset < end:
            page, start = divmod(offset, self.psize)
            stop = min(self.psize, start + end - offset)
            content, known = self._pages.setdefault(
                page, (bytearray(self.psize), bytearray(self.psize)))
            if data is None:
                known[start:stop] = bytes(stop - start)
            else:
                content[start:stop] = data[:stop - start]
                known[start:stop] = b"\x01" * (stop - start)
                data = data[stop - start:]
            offset += stop - start
        if self._known(0, _META_PSIZE, _META_PSIZE + 4):
            self.psize = struct.unpack_from("<I", self._pages[0][0], _META_PSIZE)[0] or self.psize

    def _known(self, page: int, start: int, stop: int) -> bool:
        entry = self._pages.get(page)
        return entry is not None and all(entry[1][start:stop])

    def checkpoint(self) -> int | None:
        """The checkpoint of the newest meta page; None if the bytes are not all known."""
        if self.broken:
            return None
        metas = [(struct.unpack_from("<Q", self._pages[page][0], _META_ROOT)[0],
                  struct.unpack_from("<Q", self._pages[page][0], _META_TXNID)[0])
                 for page in (0, 1) if self._known(page, _META_ROOT, _META_END)]
        if not metas:
            return None
        root = max(metas, key=lambda meta: meta[1])[0]  # the newest transaction wins, as in LMDB
        if root == _P_INVALID:
            return 0
        named = self._leaf_value(root, b"meta")
        if named is None:
            return None
        if named == b"":
            return 0
        meta_root = struct.unpack_from("<Q", named, 40)[0]
        if meta_root == _P_INVALID:
            return 0
        value = self._leaf_value(meta_root, b"checkpoint")
        if value is None:
            return None
        return int.from_bytes(value, "big") if value else 0

    def _leaf_value(self, page: int, key: bytes) -> bytes | None:
        """The value of `key` in leaf `page` (b"" if absent); None if unknown or not a leaf."""
        if not self._known(page, 0, 16):
            return None
        content, known = self._pages[page]
        flags, lower = struct.unpack_from("<HH", content, 10)
        if flags & _P_BRANCH or not flags & _P_LEAF or not all(known[16:lower]):
            return None
        for index in range((lower - 16) // 2):
            ptr = struct.unpack_from("<H", content, 16 + 2 * index)[0]
            if not all(known[ptr:ptr + 8]):
                return None
            low, high, node_flags, ksize = struct.unpack_from("<HHHH", content, ptr)
            size = low | high << 16
            if node_flags & _F_BIGDATA:  # the value sits on overflow pages: not followed
                return None
            if not all(known[ptr + 8:ptr + 8 + ksize + size]):
                return None
            if content[ptr + 8:ptr + 8 + ksize] == key:
                return bytes(content[ptr + 8 + ksize:ptr + 8 + ksize + size])
        return b""


# ---- the checker -----------------------------------------------------------------------------

_WRITES = frozenset({"write", "pwrite64", "writev", "pwritev", "pwritev2", "ftruncate",
                     "fallocate"})
_SYNCS = frozenset({"fsync", "fdatasync"})
_OPENS = frozenset({"open", "openat", "openat2", "creat"})
_BENIGN = frozenset({"close", "lseek", "pread64", "read", "readv", "preadv", "preadv2", "fstat",
                     "newfstatat", "statx", "fstatfs", "fcntl", "flock", "fadvise64", "mmap",
                     "munmap", "sync_file_range", "stat", "lstat", "access", "faccessat",
                     "faccessat2", "readlink", "readlinkat", "statfs", "getxattr", "lgetxattr",
                     "fgetxattr"})
_CLONES = frozenset({"clone", "clone3", "fork", "vfork"})
_SEGMENT = re.compile(r"\d{20}\.log\Z")


@dataclass
class _Change:
    """A change to data.mdb (a write, or a writable map while it lasts) not yet durable."""

    line: int
    tid: int
    name: str
    done: bool = False  # returned (or unmapped): a sync that begins now covers it


@dataclass
class _Descriptor:
    """An open descriptor of data.mdb."""

    dsync: bool  # opened with O_DSYNC or O_SYNC: a write is on disk when it returns
    position: int | None = 0


@dataclass
class _Mapping:
    start: int
    length: int
    path: str
    change: _Change | None  # a writable shared map of data.mdb


class _Checker:
    def __init__(self, cache_dir: str, checkpoint_before: int) -> None:
        root = os.path.realpath(cache_dir)
        self.db_file = os.path.join(root, "db", "data.mdb")
        self.db_dir = os.path.join(root, "db")
        self.wal_dir = os.path.join(root, "wal")
        self.ack_prefix = os.path.join(root, ACK_DIR) + os.sep
        self.report = OrderReport()
        self.image = _Image()
        self.checkpoint: int | None = checkpoint_before
        self.group: dict[int, int] = {}  # thread -> process
        self.cwd: dict[int, str] = {}
        self.fds: dict[tuple[int, int], _Descriptor] = {}  # (process, fd) -> data.mdb
        self.maps: dict[int, list[_Mapping]] = {}
        self.changes: dict[int, _Change] = {}  # id -> change to data.mdb not yet durable
        self.unsynced_unlinks: dict[int, Call] = {}  # segment unlinks awaiting a DIR/wal fsync
        self.unsynced_creates: dict[int, Call] = {}  # data.mdb creations awaiting a DIR/db fsync
        self.snapshots: dict[int, list[tuple[dict[int, Any], list[int]]]] = {}
        self.segments: list[int] = []  # first LSNs of every segment named in the trace
        self.phase = ""

    # -- helpers

    def fail(self, rule: str, line: int, message: str) -> None:
        self.report.violations.append(Violation(rule, line, message, self.phase))

    def path_of(self, call: Call, pid: int) -> str | None:
        """The path a path-taking call names, made absolute."""
        args = call.args
        if len(args) > 1 and args[1].startswith('"'):
            fd, directory = _fd_path(args[0])
            name = _string(args[1])
            if directory is not None and name is not None:
                if fd is None:
                    self.cwd[pid] = directory
                return os.path.normpath(os.path.join(directory, os.fsdecode(name)))
        if args and args[0].startswith('"'):
            name = _string(args[0])
            if name is not None:
                return os.path.normpath(os.path.join(self.cwd.get(pid, "/"), os.fsdecode(name)))
        return None

    def segment_lsn(self, path: str | None) -> int | None:
        if path is None or os.path.dirname(path) != self.wal_dir:
            return None
        name = os.path.basename(path)
        return int(name[:20]) if _SEGMENT.match(name) else None

    def required_checkpoint(self, first_lsn: int) -> int:
        """The last LSN of the segment: the next segment's first LSN - 1 (LSNs have no gaps);
        without a next segment, only what its name promises (first LSN - 1)."""
        later = [lsn for lsn in self.segments if lsn > first_lsn]
        return min(later) - 1 if later else first_lsn - 1

    def begin_sync(self, call_id: int, kinds: tuple[dict[int, Any], ...]) -> None:
        """A sync begins: it covers what has already returned, and nothing that comes later."""
        self.snapshots[call_id] = [
            (kind, [key for key, item in kind.items()
                    if not isinstance(item, _Change) or item.done]) for kind in kinds]

    def end_sync(self, call_id: int, succeeded: bool) -> None:
        for kind, keys in self.snapshots.pop(call_id, []):
            if succeeded:
                for key in keys:
                    kind.pop(key, None)

    # -- the sweep

    def run(self, calls: list[Call]) -> OrderReport:
        for call in calls:
            if call.name in _CLONES and call.retval and call.retval > 0:
                flags = " ".join(call.args)
                parent = self.group.get(call.tid, call.tid)
                self.group[call.retval] = parent if "CLONE_THREAD" in flags else call.retval
            if call.name in _OPENS | {"unlink", "unlinkat"}:
                _, opened = _fd_path(call.ret or "")
                path = opened or self.path_of(call, self.group.get(call.tid, call.tid))
                lsn = self.segment_lsn(path)
                if lsn is not None and lsn not in self.segments:
                    self.segments.append(lsn)
        self.cwd.clear()
        points = sorted([(call.enter, 0, index) for index, call in enumerate(calls)]
                        + [(call.exit, 1, index) for index, call in enumerate(calls)])
        for _, is_exit, index in points:
            if is_exit:
                self.exit(index, calls[index])
            else:
                self.enter(index, calls[index])
        for call in self.unsynced_unlinks.values():
            self.fail("wal-dir-not-synced", call.exit,
                      f"unlink of {self._rel(call)} was never followed by an fsync of wal/")
        return self.report

    def _rel(self, call: Call) -> str:
        path = self.path_of(call, self.group.get(call.tid, call.tid)) or "?"
        return os.path.relpath(path, os.path.dirname(self.wal_dir))

    def _db_fd(self, token: str) -> int | None:
        fd, path = _fd_path(token)
        return fd if path == self.db_file else None

    def enter(self, index: int, call: Call) -> None:
        pid = self.group.get(call.tid, call.tid)
        name, args = call.name, call.args
        path = self.path_of(call, pid) if name not in _WRITES else None
        if path is not None and path.startswith(self.ack_prefix):
            self.acknowledged(call, path[len(self.ack_prefix):])
            return
        if name in ("unlink", "unlinkat") and call.retval in (0, None):  # None: died inside
            lsn = self.segment_lsn(path)
            if lsn is not None:
                self.segment_unlink(call, lsn)
                return
        if name in ("sync", "syncfs"):
            self.begin_sync(index, (self.changes, self.unsynced_unlinks, self.unsynced_creates))
            return
        if name == "msync":
            mapping = self._mapping(pid, int(args[0], 0))
            if mapping is not None and mapping.path == self.db_file and "MS_SYNC" in args[2]:
                self.report.db_syncs += 1
                self.begin_sync(index, (self.changes,))
            return
        if name in _SYNCS and args:
            _, synced = _fd_path(args[0])
            if synced == self.db_file:
                self.report.db_syncs += 1
                self.begin_sync(index, (self.changes,))
            elif synced == self.wal_dir:
                self.report.wal_dir_syncs += 1
                self.begin_sync(index, (self.unsynced_unlinks,))
            elif synced == self.db_dir:
                self.begin_sync(index, (self.unsynced_creates,))
            return
        if name in _OPENS:
            if path == self.db_file and ("O_TRUNC" in " ".join(args) or name == "creat"):
                self.changes[index] = _Change(call.enter, call.tid, name)
            return
        db_args = [position for position, token in enumerate(args)
                   if self._db_fd(token) is not None]
        if path == self.db_file and name in ("truncate",):
            self.changes[index] = _Change(call.enter, call.tid, name)
            self.report.db_writes += 1
        elif path == self.db_file and name not in _BENIGN:
            self.fail("unclassified-db-syscall", call.enter, f"{name} on data.mdb: not understood")
        if not db_args:
            return
        if name in _WRITES and db_args == [0]:
            self.changes[index] = _Change(call.enter, call.tid, name)
            self.report.db_writes += 1
        elif name == "mmap" and "PROT_WRITE" in args[2] and "MAP_SHARED" in args[3]:
            self.changes[index] = _Change(call.enter, call.tid, "writable mmap")
        elif name not in _BENIGN:
            self.fail("unclassified-db-syscall", call.enter,
                      f"{name} on data.mdb: not understood, so not trusted")

    def exit(self, index: int, call: Call) -> None:
        pid = self.group.get(call.tid, call.tid)
        if index in self.snapshots:
            self.end_sync(index, call.retval == 0)
            return
        name, args, ret = call.name, call.args, call.retval
        if name in ("unlink", "unlinkat") and ret in (0, None):
            if self.segment_lsn(self.path_of(call, pid)) is not None:
                self.unsynced_unlinks[index] = call
            return
        if name in _OPENS:
            fd, path = _fd_path(call.ret or "")
            if path == self.db_file and fd is not None:
                flags = " ".join(args)
                self.fds[(pid, fd)] = _Descriptor("O_DSYNC" in flags or "O_SYNC" in flags)
                if "O_CREAT" in flags or name == "creat":
                    self.unsynced_creates[index] = call
        elif name == "close" and args:
            fd, _ = _fd_path(args[0])
            self.fds.pop((pid, fd if fd is not None else -1), None)
        elif name == "lseek" and ret is not None and ret >= 0:
            fd = self._db_fd(args[0]) if args else None
            if fd is not None and (pid, fd) in self.fds:
                self.fds[(pid, fd)].position = ret
        elif name == "mmap":
            if ret is None or ret < 0 or len(args) < 5:
                self.changes.pop(index, None)  # no map was made
                return
            _, path = _fd_path(args[4])
            change = self.changes.get(index)
            self.maps.setdefault(pid, []).append(
                _Mapping(ret, int(args[1], 0), path or "", change))
        elif name == "munmap" and ret == 0:
            self._unmap(pid, int(args[0], 0), int(args[1], 0))
        change = self.changes.get(index)
        if change is not None and name != "mmap":
            self.wrote(index, call, pid, change)

    def wrote(self, index: int, call: Call, pid: int, change: _Change) -> None:
        """A change to data.mdb returned: durable now if its descriptor is O_DSYNC."""
        change.done = True
        fd = self._db_fd(call.args[0]) if call.args else None
        state = self.fds.get((pid, fd)) if fd is not None else None
        ret = call.retval
        if call.name not in ("write", "pwrite64", "writev", "pwritev", "pwritev2") \
                or ret is None or ret < 0:
            return
        offset, data = _placement(call, state)
        if offset is None:
            self.image.broken = True
            return
        if state is not None and call.name in ("write", "writev"):
            state.position = offset + ret
        self.image.write(offset, data, ret)
        if state is not None and state.dsync:
            self.changes.pop(index, None)  # O_DSYNC: what it wrote was on disk when it returned
        if offset < 2 * self.image.psize:  # a meta page: a commit is complete
            self.checkpoint = self.image.checkpoint()
            self.report.checkpoints.append(self.checkpoint)

    def segment_unlink(self, call: Call, lsn: int) -> None:
        self.report.segment_unlinks += 1
        self.report.unlink_threads.add(call.tid)
        self.report.unlink_phases.append(self.phase)
        rel = self._rel(call)
        for change in self.changes.values():
            state = "has not returned" if not change.done else "was not followed by a sync"
            self.fail("db-not-synced", call.enter,
                      f"unlink of {rel} while a {change.name} of data.mdb (line {change.line}, "
                      f"thread {change.tid}) {state} of data.mdb that returned first")
            break
        required = self.required_checkpoint(lsn)
        if self.checkpoint is None or self.checkpoint < required:
            held = "an unknown checkpoint" if self.checkpoint is None \
                else f"checkpoint {self.checkpoint}"
            self.fail("checkpoint-behind", call.enter,
                      f"unlink of {rel}, whose records reach LSN {required}, while the last "
                      f"commit written to data.mdb holds {held}")
        for create in self.unsynced_creates.values():
            self.fail("db-dir-not-synced", call.enter,
                      f"unlink of {rel} while the open of data.mdb with O_CREAT (line "
                      f"{create.exit}) was not followed by an fsync of db/")
            break

    def acknowledged(self, call: Call, label: str) -> None:
        for unlink in self.unsynced_unlinks.values():
            self.fail("wal-dir-not-synced", call.enter,
                      f"acknowledgement {label!r} while the unlink of {self._rel(unlink)} "
                      f"(line {unlink.exit}) was not followed by an fsync of wal/")
        self.unsynced_unlinks.clear()  # reported once
        self.phase = label
        self.report.acks.append(label)

    def _mapping(self, pid: int, address: int) -> _Mapping | None:
        for mapping in self.maps.get(pid, []):
            if mapping.start <= address < mapping.start + mapping.length:
                return mapping
        return None

    def _unmap(self, pid: int, start: int, length: int) -> None:
        kept = []
        for mapping in self.maps.get(pid, []):
            if start <= mapping.start and mapping.start + mapping.length <= start + length:
                if mapping.change is not None:
                    mapping.change.done = True  # its stores can now be covered by a sync
            else:
                kept.append(mapping)  # partly unmapped: what is left stays writable
        self.maps[pid] = kept


def _placement(call: Call, state: _Descriptor | None) -> tuple[int | None, bytes | None]:
    """Where a write landed in the file and, if strace printed all of it, its bytes."""
    args = call.args
    if call.name in ("pwrite64", "write"):
        data = _string(args[1]) if len(args) > 1 else None
    else:
        data = _iov_bytes(args[1]) if len(args) > 1 else None
    if call.name in ("pwrite64", "pwritev", "pwritev2"):
        return (int(args[3], 0) if len(args) > 3 else None), data
    return (state.position if state is not None else None), data


def _iov_bytes(token: str) -> bytes | None:
    if not (token.startswith("[") and token.endswith("]")):
        return None
    out = b""
    for element in _split(token[1:-1]):
        if not element.startswith("{"):
            return None  # "..." : strace left elements out
        fields = dict(item.split("=", 1) for item in _split(element[1:-1]) if "=" in item)
        base = _string(fields.get("iov_base", ""))
        if base is None:
            return None
        out += base
    return out


def check_syscall_order(lines: Iterable[str], cache_dir: str, *,
                        checkpoint_before: int = 0) -> OrderReport:
    """Check a `strace_command` log of programs using the cache at `cache_dir` (see the module
    docstring for the rules). `checkpoint_before`: the database checkpoint when the trace began
    (0 for a new directory). Raises ValueError for a log not recorded with -f."""
    return _Checker(cache_dir, checkpoint_before).run(parse_strace(lines))
