"""The embedded database's data file, `data.mdb`, checked against LMDB's own meta pages before
LMDB opens it (`check_data_file`).

LMDB maps the file and reads pages where its meta page says they are, without comparing the
file's size with the database the meta describes: a data.mdb cut short (a full disk, a
truncated copy, an operator's mistake) kills every process that reads past its end with
SIGBUS, no message, no traceback. One cut short before its databases' root pages is refused
here, naming the file, before anything is changed. Not the meta's last page: pages a write
transaction allocated and freed again ("loose") are counted there but never written, so a
sound file may end before it (a review found caches that closed so, refused at their next
open). A root page is always written, and a file never shrinks, so a file that does not
hold its roots was cut. A cut past the roots is not seen: LMDB may still fail on it.

An empty file is a database never made durable (a power cut during the first open: LMDB
writes its meta pages without an fsync), so no flush ever reached it: LMDB makes it anew,
and a log that no longer starts where an empty database needs it to is refused by the
directory (`directory.check_flushed_here`).

Only the file's first two pages are read; lmdb itself is not imported.
"""

from __future__ import annotations

import os
import struct
from typing import NamedTuple

from wbcache.errors import DatabaseError
from wbcache.layout import DATA_FILE

# LMDB's meta pages (mdb.c, `MDB_page` and `MDB_meta`, native byte order and sizes): pages 0
# and 1 each hold a page header (page number, pad, flags, lower/upper bounds) and then the
# meta: magic, format version, address, map size, the free and main databases (`MDB_db`: pad,
# flags, depth, branch, leaf and overflow pages, entries, root), last page used, transaction
# id. The page size is the free database's pad (`mm_psize`).
_PAGE_HEADER = struct.Struct("@NHHI")
_META = struct.Struct("@IIPN" + "IHHNNNNN" * 2 + "NN")
_P_META = 0x08
_NO_PAGE = (1 << (8 * struct.calcsize("@N"))) - 1  # P_INVALID: the root of an empty database
_MDB_MAGIC = 0xBEEFC0DE


class _Meta(NamedTuple):
    txnid: int  # first: the newest meta is the larger
    last_root: int  # the higher root page of the free and main databases (-1: both empty)
    page_size: int


def check_data_file(path: str, *, others_create: bool = False) -> None:
    """Refuse, before LMDB opens it, a data.mdb in the directory `path` that LMDB would read
    past its end: LMDB maps the file without comparing its size with the database its meta
    pages describe, and touching a page beyond the end kills the process (SIGBUS). The file
    must hold LMDB meta pages at pages 0 and 1 and the root pages the newer of them names
    (module docstring). Raises `DatabaseError` naming the file and what is wrong; nothing is
    changed. A missing or empty file passes: the open makes a new database (module
    docstring).

    `others_create`: another process may be making the database now (a shared directory,
    which many processes open at once). A file in which either meta page was not found may
    then be one being made (LMDB writes both in one write, which may land between our reads
    of the pages and of the size), and is left to LMDB, which makes a database under its own
    lock, in a file it finds empty, and refuses one it cannot read (MDB_INVALID).

    The metas are read before the size: a commit (a shared directory's other process)
    extends the file with its pages before it writes the meta that names them."""
    data_file = os.path.join(path, DATA_FILE)
    try:
        fd = os.open(data_file, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    try:
        first = _read_meta(fd, 0)
        second = _read_meta(fd, first.page_size) if first is not None else None
        size = os.fstat(fd).st_size
    finally:
        os.close(fd)
    if others_create and second is None:  # perhaps being made: docstring
        return
    problem = None
    if size == 0:
        return
    if first is None:
        problem = f"({size:,} bytes) does not start with an LMDB meta page"
    elif second is None:
        problem = (f"({size:,} bytes) has no LMDB meta page at page 1 (byte "
                   f"{first.page_size:,}), where LMDB keeps its second")
    else:
        newest = max(first, second)
        needed = (newest.last_root + 1) * newest.page_size
        if size < needed:
            problem = (f"is {size:,} bytes, but its meta page (transaction {newest.txnid}) "
                       f"puts a root page of the database at page {newest.last_root:,} "
                       f"(pages of {newest.page_size:,} bytes, so at least {needed:,} "
                       f"bytes): the file was cut short")
    if problem is not None:
        raise DatabaseError(f"the LMDB database {data_file} {problem}; it is damaged, and "
                            f"nothing was changed")


def _read_meta(fd: int, offset: int) -> _Meta | None:
    """The LMDB meta page at `offset`, or None if there is none there: too few bytes, not a
    meta page, no magic, a page size LMDB never uses."""
    raw = os.pread(fd, _PAGE_HEADER.size + _META.size, offset)
    if len(raw) < _PAGE_HEADER.size + _META.size:
        return None
    flags = _PAGE_HEADER.unpack_from(raw)[2]
    meta = _META.unpack_from(raw, _PAGE_HEADER.size)
    magic, page_size, txnid = meta[0], meta[4], meta[-1]
    roots = [root for root in (meta[11], meta[19]) if root != _NO_PAGE]  # free, main
    if not flags & _P_META or magic != _MDB_MAGIC:
        return None
    if page_size < 512 or page_size > 1 << 16 or page_size & (page_size - 1):
        return None
    return _Meta(txnid, max(roots, default=-1), page_size)
