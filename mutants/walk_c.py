"""Plant bugs in the C fast paths: the reader's (wal/_walk.c), caught by
tests/test_wal_fastpath.py, and its check of records before they are decoded (records-*),
caught by tests/test_wal_record_check.py; the cache hit's (wbcache/_hit.c, mutations named
hit-*), caught by tests/test_hit_path.py; a flush's LMDB puts (wbcache/backends/_pairs.c,
pairs-*), caught by tests/test_lmdb_pairs.py; the group commit's write and fdatasync
(wal/_sync.c, sync-*), caught by tests/test_wal_sync.py; the log's thread (wal/_pipe.c,
pipe-*), caught by tests/test_pipe.py.

    python mutants/walk_c.py              # every mutation (about 15 s each)
    python mutants/walk_c.py utf8 lsn     # some, by name
    python mutants/walk_c.py --list

The reader's fast path is sound only while it takes nothing the Python walk refuses; its tests
read the same bytes both ways. The hit path, the LMDB puts and the write and fdatasync in one
call must do what their Python versions do; their tests run both on the same cases. Each
mutation below removes or loosens one step of a C file; for each, a scratch copy of the
repository is made as run.py makes it (SCRATCH/walk_c/...), that file is edited (one exact
replacement, never here), rebuilt, and its tests run against it. A mutation no test catches
is reported as SURVIVED (exit status 1). `tests/test_mutants.py` fails the moment a
mutation's text is no longer in its C file.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

import run

PEEK = "if (!looks_like_puts(frame + FRAME_SIZE, length))\n            break;"
# (name, the bug, text of wal/_walk.c, what it becomes); several places: tuples of each
MUTATIONS: list[tuple[str, str, str | tuple[str, ...], str | tuple[str, ...]]] = [
    ("utf8", "non-ASCII strs inside values are not checked as UTF-8",
     "if (p[i] & 0x80) {", "if (0) {"),
    ("trailing", "a value with bytes after its object is taken",
     "return skip_object(&p, end, 0, 0) && p == end;", "return skip_object(&p, end, 0, 0);"),
    ("map-key", "a list or dict as a map key (unhashable in Python) is taken",
     "if (key || depth >= MAX_DEPTH)", "if (depth >= MAX_DEPTH)"),
    ("depth", "no nesting limit: values msgpack refuses as too deep are taken",
     "if (key || depth >= MAX_DEPTH)", "if (key)"),
    ("key-limit", "keys over the database's limit are taken",
     "|| key_len > max_key_size)", ")"),
    ("key-empty", "an empty key is taken", "|| key_len == 0", ""),
    ("lsn", "a record's LSN is not compared with the next one expected",
     "positive_uint(&q, end) != lsn", "positive_uint(&q, end) == 0"),
    ("crc", "the frame checksum is not compared",
     "if ((uint32_t)crc32(0L, copy, length) != crc)", "if (0)"),
    ("lsn-wrap", "LSNs wrap around at the end of a uint64",
     "|| count > UINT64_MAX - *expected)", ")"),
    ("args-modulo", "LSNs and limits out of a uint64's range are read modulo 2**64",
     "v = PyLong_AsUnsignedLongLong(obj);", "v = PyLong_AsUnsignedLongLongMask(obj);"),
    ("type-c1", "the never-used type byte 0xc1 (and ext types) are taken as one-byte objects",
     "if (width == 0)\n        return 0; /* 0xc1",
     "if (width == 0)\n        { *p = q; return 1; } /* 0xc1"),
    ("frame-end", "a frame payload with bytes after its array is taken",
     "if (q != end)\n        return 0;", ""),
    ("value-str", "a value stored as a str, not a bin, is taken", "|| value_str", ""),
    ("str8-as-bin", "str8/16/32 keys and values are read as bin",
     "*is_str = t >= 0xd9;", "*is_str = 0;"),
    # The quick refusal (looks_like_puts) refuses empty arrays first: these bugs need it gone.
    ("empty-frame", "an empty array of records is taken",
     (PEEK, "if (t >= 0x91 && t <= 0x9f)"), ("", "if (t >= 0x90 && t <= 0x9f)")),
    ("empty-array16", "an empty array16 of records is taken",
     (PEEK, "if (count == 0)\n            return 0;"), ("", "")),
    ("batch-end", "batches do not end at max_records (pages released, generator steps)",
     "PyList_GET_SIZE(out) < max_records &&", ""),
]
# The check of the records of the frames left to the Python walk (`unusable`, records-*): each
# takes a record records.py refuses, or refuses one it takes (decoded whole to be judged).
MUTATIONS += [
    ("records-key-empty", "an empty key is taken",
     "&& len > 0 && len <= max_key_size", "&& len <= max_key_size"),
    ("records-key-limit", "keys over the database's limit are taken",
     "&& len > 0 && len <= max_key_size", "&& len > 0"),
    ("records-key-utf8", "a str key of invalid UTF-8 is taken",
     "\n        && (!is_str || utf8_ok(key, (Py_ssize_t)len));", ";"),
    ("records-value-str", "a value stored as a str, not a bin, is taken",
     "&& !is_str\n        && value_ok(", "&& value_ok("),
    ("records-value", "a value that does not decode is taken",
     "\n        && value_ok(value, (Py_ssize_t)len);", ";"),
    ("records-int64", "a uint64 over INT64_MAX passes for an int64 (a delta, a result)",
     "*above = v > INT64_MAX;", "*above = 0;"),
    ("records-signed", "int8..int64 are read as unsigned (an LSN of -1 is taken)",
     "v -= (uint64_t)1 << (8 * width);", ""),
    ("records-lsn", "an LSN of 0 is taken", "|| (!above && lsn < 1))", "|| (!above && lsn < 0))"),
    ("records-op-true", "op true (== 1 in Python) is refused: such a frame is decoded whole",
     "if (q < end && *q == 0xc3) {", "if (0) {"),
    ("records-op-float", "an op of 1.5 is taken as 1", "real != (int)real", "0"),
    ("records-arity", "a delete of three fields is taken",
     "return fields == 2 && key_field", "return fields >= 2 && key_field"),
    ("records-batch-empty", "an empty batch is taken", "|| items == 0)", ")"),
    ("records-batch-length", "a batch record of four fields is taken",
     "if (fields != 3 || !array_header(&q, end, &items)", "if (!array_header(&q, end, &items)"),
    ("records-frame-end", "a payload with bytes after its array of records is taken",
     "if (p == end) {\n                PyBuffer_Release(&view);",
     "if (1) {\n                PyBuffer_Release(&view);"),
    ("records-budget", "a record that is not usable is decoded however much it builds",
     "if (built > budget)\n            return NULL;", ""),
]
# The same check's LSN order (records-lsn-*): each takes a frame out of sequence, refuses one
# in sequence, or names another record or LSN than the walker's rule names.
MUTATIONS += [
    ("records-lsn-order", "usable records out of sequence are taken (and decoded whole)",
     "if (sequenced && lsn != want) {", "if (sequenced && 0) {"),
    ("records-lsn-step", "every record of a frame is expected at the frame's first LSN",
     "want++;\n            i++;", "i++;"),
    ("records-lsn-first", "the last record out of sequence is named, not the first",
     "sequenced = 0;\n", ""),
    ("records-lsn-range", "an expected LSN past a uint64 is read modulo 2**64",
     "as_u64(expected, &want);", "want = PyLong_AsUnsignedLongLongMask(expected);"),
    ("records-lsn-above", "an LSN over INT64_MAX is compared as 0 (never in sequence)",
     "*at = (uint64_t)lsn;", "*at = above ? 0 : (uint64_t)lsn;"),
    ("records-lsn-index", "the record after the one out of sequence is named as its place",
     "(unsigned long long)(misplaced - 1)", "(unsigned long long)misplaced"),
    ("records-lsn-named", "the LSN expected is reported as the record's",
     "misplaced_lsn = lsn;", "misplaced_lsn = want;"),
]
# The hit path: each mutation makes the C differ from the closure in one step.
MUTATIONS += [
    ("hit-incref", "the entry is borrowed, not held, while the hit notes it",
     "Py_INCREF(held); /* note_hit", "/* note_hit"),
    ("hit-count", "a hit of an immutable value is not counted",
     "self->hits++;\n    return held;", "return held;"),
    ("hit-note", "a hit is not noted for the CLOCK",
     "PyObject_CallOneArg(self->note_hit, key);", "Py_NewRef(Py_None);"),
    ("hit-tombstone", "a deleted key returns its tombstone, not the default",
     "if (held == self->tombstone) {", "if (0) {"),
    ("hit-default-ref", "the default is returned without a reference of its own",
     "return Py_NewRef(deflt);", "return deflt;"),
    ("hit-unpack", "a mutable value is returned as its encoding",
     "if (PyTuple_CheckExact(held)) {", "if (0) {"),
    ("hit-keyword", "default= is taken as the key",
     "slot = &deflt;", "slot = &key;"),
    ("hit-miss-default", "a miss is read with None as its default",
     "PyObject *slow[2] = {key, deflt};", "PyObject *slow[2] = {key, Py_None};"),
    ("hit-subclass", "a str subclass is answered by the entry it compares equal to",
     "if (!PyUnicode_CheckExact(key) && !PyBytes_CheckExact(key))",
     "if (!PyUnicode_Check(key) && !PyBytes_Check(key))"),
]
# A flush's LMDB puts: each mutation makes the C differ from the Python loop in one step.
MUTATIONS += [
    ("pairs-side", "str keys go to the bytes database",
     "if (is_str != self->str_keys) {", "if (is_str == self->str_keys) {"),
    ("pairs-utf8", "a str that is not valid Unicode (a lone surrogate) is stored",
     "PyUnicode_AsUTF8String(key);",
     'PyUnicode_AsEncodedString(key, "utf-8", "surrogatepass");'),
    ("pairs-other", "keys of the other kind are not counted (a mixed flush skips bytes keys)",
     "self->other++;", ";"),
    ("pairs-error", "a bad put's error is dropped and the walk goes on",
     "if (pair != NULL || PyErr_Occurred())", "if (pair != NULL)"),
    ("pairs-tracked", "every pair stays tracked by the garbage collector",
     "PyObject_GC_UnTrack(pair);", ";"),
    ("pairs-untrack-any", "a pair holding other objects than bytes is untracked too",
     "if (pair != NULL && PyBytes_CheckExact(key) && PyBytes_CheckExact(value))",
     "if (pair != NULL)"),
    ("sync-skip", "a batch is written but never fdatasync'd",
     "if (error == 0 && fdatasync((int)fd) < 0)", "if (0)"),
    ("sync-eintr", "a write interrupted by a signal fails with EINTR instead of going on",
     "if (error != EINTR)\n            break;", "break;"),
    ("sync-signals", "an interrupted write goes on without running the signal's handler",
     "if (PyErr_CheckSignals() < 0) {", "if (0) {"),
]
# The log's thread (wal/_pipe.c): what it publishes as durable, and when it wakes whom.
MUTATIONS += [
    ("pipe-no-fdatasync", "a batch is written and published, never fdatasync'd",
     "while (fdatasync(fd) < 0) {", "while (0) {"),
    ("pipe-publish-handed", "a batch publishes every record handed over, not those it wrote",
     "p->durable_lsn = through;", "p->durable_lsn = p->submitted_lsn;"),
    ("pipe-parity", "a batch wakes the waiters of the next batch, not its own",
     "pthread_cond_broadcast(&p->done[p->batches % 2]);\n    p->batches++;",
     "pthread_cond_broadcast(&p->done[(p->batches + 1) % 2]);\n    p->batches++;"),
    ("pipe-not-sticky", "records are taken after a failed write (and its error forgotten)",
     "int error = p->error;\n    int closing", "int error = 0;\n    int closing"),
]
TESTS = "tests/test_wal_fastpath.py"


def source_of(name: str) -> tuple[str, str]:
    """(the C file a mutation edits, the tests that must catch it)."""
    if name.startswith("hit-"):
        return "wbcache/_hit.c", "tests/test_hit_path.py"
    if name.startswith("pairs-"):
        return "wbcache/backends/_pairs.c", "tests/test_lmdb_pairs.py"
    if name.startswith("sync-"):
        return "wal/_sync.c", "tests/test_wal_sync.py"
    if name.startswith("pipe-"):
        return "wal/_pipe.c", "tests/test_pipe.py"
    if name.startswith("records-"):
        return "wal/_walk.c", "tests/test_wal_record_check.py"
    return "wal/_walk.c", TESTS


def replacements(old: str | tuple[str, ...], new: str | tuple[str, ...]
                 ) -> list[tuple[str, str]]:
    return [(old, new)] if isinstance(old, str) else list(zip(old, new, strict=True))


def run_mutation(name: str, old: str | tuple[str, ...], new: str | tuple[str, ...]
                 ) -> tuple[bool, str]:
    """(caught, the first failing test or why the run is void) for one mutation."""
    src = run.make_copy("baseline")  # an unmutated copy (SCRATCH/walk_c/baseline/src), built
    c_file, tests = source_of(name)
    source = src / c_file
    text = source.read_text()
    for before, after in replacements(old, new):
        if text.count(before) != 1:
            raise SystemExit(f"{name}: its text is not in {c_file} exactly once (rotted)")
        text = text.replace(before, after)
    source.write_text(text)
    built = subprocess.run(
        [sys.executable, "setup.py", "-q", "build_ext", "--inplace", "--force"],
        cwd=src, capture_output=True, text=True, env={**os.environ, "WBCACHE_REQUIRE_C": "1"})
    if built.returncode != 0:
        raise SystemExit(f"{name}: the mutated C does not build: {built.stderr[-300:]}")
    env = run.environment(src, run.SCRATCH / f"{name}.jsonl")
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-n", "2", "-p",
                           "no:cacheprovider", tests], cwd=src, env=env, capture_output=True,
                          text=True, timeout=600)
    failed = [line for line in done.stdout.splitlines() if line.startswith("FAILED")]
    if any("_is_built" in line for line in failed):  # test_the_{fast,hit}_path_is_built
        return False, f"the mutated C was not the module the tests ran: {failed[0]}"
    if done.returncode == 1 and failed:
        return True, failed[0]
    if done.returncode == 0:
        return False, "every test passed"
    return False, f"pytest status {done.returncode}: {done.stdout[-300:]}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="mutations to run (default: all)")
    parser.add_argument("--list", action="store_true", help="list the mutations and stop")
    args = parser.parse_args()
    if args.list:
        print("\n".join(f"{name}: {bug}" for name, bug, _, _ in MUTATIONS))
        return 0
    known = {name for name, *_ in MUTATIONS}
    unknown = [name for name in args.names if name not in known]
    if unknown:
        parser.error(f"unknown mutation(s): {', '.join(unknown)}; see --list")
    run.SCRATCH = run.SCRATCH / "walk_c"
    run.SCRATCH.mkdir(parents=True, exist_ok=True)
    survived = []
    for name, _, old, new in MUTATIONS:
        if args.names and name not in args.names:
            continue
        caught, detail = run_mutation(name, old, new)
        print(f"{name:14} {'caught' if caught else 'SURVIVED'}: {detail[:120]}", flush=True)
        if not caught:
            survived.append(name)
    if survived:
        print(f"SURVIVED: {', '.join(survived)}")
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
