/* The reader's fast path: walk a run of plain-put frames without per-record Python work.
 *
 * `scan` is an accelerator of wal/reader.py::_walk, not a second walker: it advances only over
 * frames that the Python walk would accept as they are, and it stops at the first frame it is
 * not sure of, leaving that frame to the Python walk, which judges it with the one rule of
 * wal/format.py and reports why. So what it accepts is a subset of what the Python walk
 * accepts, records included; everything else (sync marks, damage, deletes, increments,
 * batches, values that do not decode) goes the one Python way.
 *
 * A frame it accepts: magic b"\xc1WBC", payload length in 1..max_payload, inside the file,
 * crc32 right, payload one msgpack array of records that consumes it exactly, each record a
 * fixarray [lsn, 1, key, value] with lsn the next LSN expected (a positive uint), key a str
 * (valid UTF-8) or bin of 1..max_key_size bytes, and value a bin holding exactly one msgpack
 * object that msgpack.unpackb(value, strict_map_key=False) decodes (`value_ok`).
 *
 * `decodes(value)`, the same proof that a value decodes, also serves the codec, which checks
 * each mutable value before it is logged (wbcache/codec.py), and the Python walk, which checks
 * every value of the frames left to it (wal/records.py): exact, it builds nothing.
 *
 * `unusable(payload, ...)` judges the frames left to the Python walk (deletes, increments,
 * batches...) before they are decoded: exactly the records wal/records.py's `problem` takes,
 * and where one is not, where it is, so that only that record is decoded to say why; given the
 * LSN the frame must start at, also the first record whose LSN is out of sequence.
 *
 * scan(data, pos, size, expected, max_key_size, max_payload, max_records, stop_at)
 *   -> (records, pos, expected)
 * walks frames from `pos` while pos < size, stopping after the frame that brings the record
 * count to `max_records` or pos to `stop_at` (the Python walk's batch ends). `records` are
 * lists [lsn, 1, key, value], as msgpack.unpackb gives them.
 *
 * Over 500 lines (some 800): the walk, the exact proof of a value (msgpack's grammar, checked
 * as its unpacker checks it) and the exact check of a record share their msgpack readers and
 * must be read together.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>
#include <zlib.h>

#define FRAME_SIZE 12
#define MAX_DEPTH 1024 /* containers nested deeper: msgpack refuses them (its stack's size) */

static const unsigned char FRAME_MAGIC[4] = {0xc1, 'W', 'B', 'C'};

static uint32_t le32(const unsigned char *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static uint64_t be(const unsigned char *p, int n) {
    uint64_t v = 0;
    for (int i = 0; i < n; i++)
        v = v << 8 | p[i];
    return v;
}

/* Strict UTF-8, as Python's decoder: ASCII is checked here; anything else is decoded (and the
 * str thrown away), so non-ASCII text is the one thing the proof of a value builds. */
static int utf8_ok(const unsigned char *p, Py_ssize_t n) {
    for (Py_ssize_t i = 0; i < n; i++) {
        if (p[i] & 0x80) {
            PyObject *s = PyUnicode_DecodeUTF8((const char *)p, n, NULL);
            if (s == NULL) {
                PyErr_Clear();
                return 0;
            }
            Py_DECREF(s);
            return 1;
        }
    }
    return 1;
}

/* The size of a length field and the length it holds, for the str, bin, array and map
 * formats with a length field after the type byte; 0 if `t` is none of them. */
static int length_field(unsigned char t) {
    switch (t) {
    case 0xd9: case 0xc4: return 1;           /* str8, bin8 */
    case 0xda: case 0xc5: case 0xdc: case 0xde: return 2; /* str16, bin16, array16, map16 */
    case 0xdb: case 0xc6: case 0xdd: case 0xdf: return 4; /* str32, bin32, array32, map32 */
    default: return 0;
    }
}

/* Whether msgpack decodes the n bytes of a Timestamp extension (type -1) at p: 4 bytes of
 * seconds, 8 of nanoseconds (30 bits) and seconds (34), or 12 of nanoseconds (32) and seconds
 * (64); msgpack.Timestamp refuses nanoseconds past 999,999,999 and any other length. */
static int timestamp_ok(const unsigned char *p, uint64_t n) {
    if (n == 4)
        return 1;
    if (n == 8)
        return (be(p, 8) >> 34) < 1000000000u;
    if (n == 12)
        return be(p, 4) < 1000000000u;
    return 0;
}

/* Skip one msgpack object at *p (end: one past the buffer), checking it as
 * msgpack.unpackb(..., strict_map_key=False) does: 1 if it decodes, 0 if it does not (bad
 * bytes, invalid UTF-8, an invalid Timestamp, containers nested past msgpack's 1024, a map
 * key that would decode to an unhashable list or dict). `key` says the object is a map key.
 * Exact, so that a value never needs decoding to be checked: decoding a crafted one (nested
 * one-entry maps) costs over 100 times its size in memory. */
static int skip_object(const unsigned char **p, const unsigned char *end, int depth, int key) {
    const unsigned char *q = *p;
    if (q >= end)
        return 0;
    unsigned char t = *q++;
    uint64_t n;
    int items = 0; /* objects that follow: 1 per array element, 2 per map pair */
    if (t <= 0x7f || t >= 0xe0 || t == 0xc0 || t == 0xc2 || t == 0xc3) {
        *p = q; /* fixint, nil, false, true */
        return 1;
    }
    if (t >= 0xa0 && t <= 0xbf) { /* fixstr */
        n = t & 0x1f;
        goto str;
    }
    if (t >= 0x90 && t <= 0x9f) { /* fixarray */
        n = t & 0x0f;
        items = 1;
        goto container;
    }
    if (t >= 0x80 && t <= 0x8f) { /* fixmap */
        n = t & 0x0f;
        items = 2;
        goto container;
    }
    switch (t) {
    case 0xca: n = 4; goto fixed; /* float32 */
    case 0xcb: n = 8; goto fixed; /* float64 */
    case 0xcc: case 0xd0: n = 1; goto fixed;
    case 0xcd: case 0xd1: n = 2; goto fixed;
    case 0xce: case 0xd2: n = 4; goto fixed;
    case 0xcf: case 0xd3: n = 8; goto fixed;
    default: break;
    }
    if (t >= 0xd4 && t <= 0xd8) { /* fixext 1, 2, 4, 8, 16 */
        n = (uint64_t)1 << (t - 0xd4);
        goto ext;
    }
    if (t >= 0xc7 && t <= 0xc9) { /* ext 8, 16, 32 */
        int size = t == 0xc7 ? 1 : t == 0xc8 ? 2 : 4;
        if (end - q < size)
            return 0;
        n = be(q, size);
        q += size;
        goto ext;
    }
    int width = length_field(t);
    if (width == 0)
        return 0; /* 0xc1: never used, refused by msgpack */
    if (end - q < width)
        return 0;
    n = be(q, width);
    q += width;
    if (t == 0xc4 || t == 0xc5 || t == 0xc6)
        goto fixed; /* bin */
    if (t == 0xd9 || t == 0xda || t == 0xdb)
        goto str;
    items = (t == 0xdc || t == 0xdd) ? 1 : 2;
container:
    if (key || depth >= MAX_DEPTH)
        return 0;
    if (n > (uint64_t)(end - q)) /* every object takes a byte at least */
        return 0;
    for (uint64_t i = 0; i < n; i++) {
        if (!skip_object(&q, end, depth + 1, items == 2))
            return 0;
        if (items == 2 && !skip_object(&q, end, depth + 1, 0))
            return 0;
    }
    *p = q;
    return 1;
str:
    if (n > (uint64_t)(end - q) || !utf8_ok(q, (Py_ssize_t)n))
        return 0;
    *p = q + n;
    return 1;
fixed:
    if (n > (uint64_t)(end - q))
        return 0;
    *p = q + n;
    return 1;
ext: /* a type byte, then n bytes: an ExtType (codes 0..127), or for -1 a valid Timestamp;
      * msgpack refuses the other negative codes (ExtType's "code must be 0~127") */
    if (end - q < 1 || n > (uint64_t)(end - q - 1))
        return 0;
    if (*q == 0xff ? !timestamp_ok(q + 1, n) : *q >= 0x80)
        return 0;
    *p = q + 1 + n;
    return 1;
}

/* 1 if `value` holds exactly one msgpack object that msgpack.unpackb decodes. */
static int value_ok(const unsigned char *p, Py_ssize_t n) {
    const unsigned char *end = p + n;
    return skip_object(&p, end, 0, 0) && p == end;
}

/* A str or bin field at *p: its bytes (*start, *len) and whether it is a str; 0 if neither. */
static int str_or_bin(const unsigned char **p, const unsigned char *end,
                      const unsigned char **start, uint64_t *len, int *is_str) {
    const unsigned char *q = *p;
    if (q >= end)
        return 0;
    unsigned char t = *q++;
    if (t >= 0xa0 && t <= 0xbf) {
        *len = t & 0x1f;
        *is_str = 1;
    } else {
        int width = (t >= 0xc4 && t <= 0xc6) || (t >= 0xd9 && t <= 0xdb) ? length_field(t) : 0;
        if (width == 0 || end - q < width) /* not a bin8..32 or str8..32, or cut short */
            return 0;
        *len = be(q, width);
        q += width;
        *is_str = t >= 0xd9;
    }
    if (*len > (uint64_t)(end - q))
        return 0;
    *start = q;
    *p = q + *len;
    return 1;
}

/* A positive uint at *p (fixint or uint8..uint64), or 0. */
static uint64_t positive_uint(const unsigned char **p, const unsigned char *end) {
    const unsigned char *q = *p;
    if (q >= end)
        return 0;
    unsigned char t = *q++;
    uint64_t v;
    if (t <= 0x7f) {
        v = t;
    } else {
        int width = t == 0xcc ? 1 : t == 0xcd ? 2 : t == 0xce ? 4 : t == 0xcf ? 8 : 0;
        if (width == 0 || end - q < width)
            return 0;
        v = be(q, width);
        q += width;
    }
    *p = q;
    return v;
}

/* The records of the frame payload [p, end) appended to `out` if every one is a plain put
 * the Python walk accepts, with LSNs from *expected on (advanced); else `out` is unchanged
 * and 0 is returned. -1 with an exception set on a memory error. The payload is the walk's
 * private copy: it cannot change between the two passes. */
static int put_frame(const unsigned char *p, const unsigned char *end, uint64_t *expected,
                     uint64_t max_key_size, PyObject *out) {
    unsigned char t = *p++;
    uint64_t count;
    if (*expected == 0) /* LSNs start at 1: positive_uint's 0 is its failure */
        return 0;
    if (t >= 0x91 && t <= 0x9f) {
        count = t & 0x0f;
    } else if ((t == 0xdc || t == 0xdd) && end - p >= (t == 0xdc ? 2 : 4)) {
        int width = t == 0xdc ? 2 : 4;
        count = be(p, width);
        p += width;
        if (count == 0)
            return 0;
    } else {
        return 0;
    }
    /* Every LSN of the frame, and the one expected after it, must fit in a uint64. */
    if (count > (uint64_t)(end - p) || count > UINT64_MAX - *expected)
        return 0;
    /* Check the whole frame before building anything: a frame is accepted whole or not. */
    const unsigned char *q = p;
    uint64_t lsn = *expected;
    for (uint64_t i = 0; i < count; i++, lsn++) {
        const unsigned char *key, *value;
        uint64_t key_len, value_len;
        int key_str, value_str;
        if (q >= end || *q++ != 0x94 || positive_uint(&q, end) != lsn || q >= end || *q++ != 0x01)
            return 0;
        if (!str_or_bin(&q, end, &key, &key_len, &key_str) || key_len == 0
                || key_len > max_key_size)
            return 0;
        if (!str_or_bin(&q, end, &value, &value_len, &value_str) || value_str
                || !value_ok(value, (Py_ssize_t)value_len))
            return 0;
        if (key_str && !utf8_ok(key, (Py_ssize_t)key_len))
            return 0;
    }
    if (q != end)
        return 0;
    Py_ssize_t before = PyList_GET_SIZE(out);
    int result = 0;
    q = p;
    for (uint64_t i = 0; i < count; i++) {
        const unsigned char *key, *value;
        uint64_t key_len, value_len;
        int key_str, value_str;
        q++; /* 0x94, checked above */
        uint64_t at = positive_uint(&q, end);
        q++; /* op 1, checked above */
        if (at == 0 || !str_or_bin(&q, end, &key, &key_len, &key_str)
                || !str_or_bin(&q, end, &value, &value_len, &value_str))
            goto undo; /* cannot happen: the first pass read these very bytes */
        PyObject *record = PyList_New(4);
        if (record == NULL)
            goto fail;
        PyObject *item = PyLong_FromUnsignedLongLong(at);
        if (item == NULL)
            goto fail_record;
        PyList_SET_ITEM(record, 0, item);
        item = PyLong_FromLong(1);
        if (item == NULL)
            goto fail_record;
        PyList_SET_ITEM(record, 1, item);
        item = key_str ? PyUnicode_DecodeUTF8((const char *)key, (Py_ssize_t)key_len, NULL)
                       : PyBytes_FromStringAndSize((const char *)key, (Py_ssize_t)key_len);
        if (item == NULL)
            goto fail_record;
        PyList_SET_ITEM(record, 2, item);
        item = PyBytes_FromStringAndSize((const char *)value, (Py_ssize_t)value_len);
        if (item == NULL)
            goto fail_record;
        PyList_SET_ITEM(record, 3, item);
        if (PyList_Append(out, record) < 0)
            goto fail_record;
        Py_DECREF(record);
        continue;
fail_record:
        Py_DECREF(record); /* and the items set in it */
        goto fail;
    }
    *expected += count;
    return 1;
fail:
    result = -1;
undo:
    {
        PyObject *type, *error, *traceback;
        PyErr_Fetch(&type, &error, &traceback); /* the slice assignment needs no error set */
        if (PyList_SetSlice(out, before, PyList_GET_SIZE(out), NULL) < 0)
            PyErr_Clear();
        PyErr_Restore(type, error, traceback);
    }
    return result;
}

/* Whether a payload can be a run of plain puts at all, from its first bytes: an array of
 * records whose first is a fixarray of 4 with op 1 after its LSN. Only a quick refusal (a
 * peek at bytes the CRC has not yet vouched for): put_frame decides. */
static int looks_like_puts(const unsigned char *p, uint32_t length) {
    uint32_t i = 1;
    if (p[0] == 0xdc || p[0] == 0xdd)
        i += p[0] == 0xdc ? 2 : 4;
    else if (p[0] < 0x91 || p[0] > 0x9f)
        return 0;
    if (i >= length || p[i++] != 0x94)
        return 0;
    if (i < length && p[i] >= 0xcc && p[i] <= 0xcf) /* uint8..uint64 */
        i += 1 + (1u << (p[i] - 0xcc));
    else
        i++;
    return i < length && p[i] == 0x01;
}

/* A non-negative int that fits in a uint64, into *value; 0 (no error set) if it is not. */
static int as_u64(PyObject *obj, uint64_t *value) {
    if (!PyLong_Check(obj))
        return 0;
    unsigned long long v = PyLong_AsUnsignedLongLong(obj);
    if (v == (unsigned long long)-1 && PyErr_Occurred()) {
        PyErr_Clear();
        return 0;
    }
    *value = v;
    return 1;
}

static PyObject *scan(PyObject *self, PyObject *args) {
    Py_buffer view;
    Py_ssize_t pos, size, max_records, stop_at;
    PyObject *expected_obj, *max_key_obj, *max_payload_obj;
    uint64_t expected, max_key_size, max_payload;
    (void)self;
    if (!PyArg_ParseTuple(args, "y*nnOOOnn", &view, &pos, &size, &expected_obj, &max_key_obj,
                          &max_payload_obj, &max_records, &stop_at))
        return NULL;
    if (!as_u64(expected_obj, &expected) || !as_u64(max_key_obj, &max_key_size)
            || !as_u64(max_payload_obj, &max_payload)) {
        /* Out of a uint64's range: nothing here can judge it; the Python walk will. */
        PyBuffer_Release(&view);
        return Py_BuildValue("([]nO)", pos, expected_obj);
    }
    PyObject *out = PyList_New(0);
    if (out == NULL) {
        PyBuffer_Release(&view);
        return NULL;
    }
    const unsigned char *data = view.buf;
    if (size > view.len)
        size = view.len;
    /* Each payload is checked and parsed in a private copy, as the Python walk slices it:
     * bytes a shared mapping changes meanwhile cannot differ between the check and the
     * parse. */
    unsigned char *copy = NULL;
    size_t copy_size = 0;
    uint64_t lsn = expected;
    int failed = 0;
    while (pos >= 0 && pos < size && PyList_GET_SIZE(out) < max_records && pos < stop_at) {
        const unsigned char *frame = data + pos;
        if (size - pos < FRAME_SIZE || memcmp(frame, FRAME_MAGIC, 4) != 0)
            break;
        uint32_t length = le32(frame + 4), crc = le32(frame + 8);
        if (length == 0 || length > max_payload || length > (uint64_t)(size - pos - FRAME_SIZE))
            break;
        if (!looks_like_puts(frame + FRAME_SIZE, length))
            break; /* a delete, an increment, a batch...: before paying for a copy and a CRC */
        if (length > copy_size) {
            unsigned char *bigger = PyMem_Realloc(copy, length);
            if (bigger == NULL) {
                PyErr_NoMemory();
                failed = 1;
                break;
            }
            copy = bigger;
            copy_size = length;
        }
        memcpy(copy, frame + FRAME_SIZE, length);
        if ((uint32_t)crc32(0L, copy, length) != crc)
            break;
        int got = put_frame(copy, copy + length, &lsn, max_key_size, out);
        if (got < 0) {
            failed = 1;
            break;
        }
        if (got == 0)
            break;
        pos += (Py_ssize_t)FRAME_SIZE + (Py_ssize_t)length;
    }
    PyMem_Free(copy);
    PyBuffer_Release(&view);
    if (failed) {
        Py_DECREF(out);
        return NULL;
    }
    return Py_BuildValue("(NnK)", out, pos, (unsigned long long)lsn);
}

/* ------------------------------------------------------------------ records, judged whole
 *
 * `unusable` finds the first record of a frame payload that wal/records.py's `problem` would
 * refuse, before anything is decoded: a crafted frame of records of any other shape (arrays
 * of one element, of the wrong length, of the wrong types, nested deep, or many tiny ones)
 * decoded to up to 65 times its size before it was refused. Where every record is usable it
 * says so; the Python walk then decodes the frame and judges it as before. */

/* The array header at *p: 1 with its length in *n and *p past the header, 0 if the object
 * there is not an array or claims more elements than bytes are left (each takes one). */
static int array_header(const unsigned char **p, const unsigned char *end, uint64_t *n) {
    const unsigned char *q = *p;
    if (q >= end)
        return 0;
    unsigned char t = *q++;
    if (t >= 0x90 && t <= 0x9f) {
        *n = t & 0x0f;
    } else if (t == 0xdc || t == 0xdd) {
        int width = length_field(t);
        if (end - q < width)
            return 0;
        *n = be(q, width);
        q += width;
    } else {
        return 0;
    }
    if (*n > (uint64_t)(end - q))
        return 0;
    *p = q;
    return 1;
}

/* The int at *p, as msgpack decodes it (Python's int, never a bool): 1 with *p past it and
 * its value in *value, or *above set for a uint64 over INT64_MAX (too big for *value); 0 if
 * the object there is not an int. */
static int int_field(const unsigned char **p, const unsigned char *end, int64_t *value,
                     int *above) {
    const unsigned char *q = *p;
    if (q >= end)
        return 0;
    unsigned char t = *q++;
    *above = 0;
    if (t <= 0x7f || t >= 0xe0) { /* positive and negative fixint */
        *value = t <= 0x7f ? t : (int64_t)t - 256;
    } else if (t >= 0xcc && t <= 0xd3) { /* uint8..uint64, int8..int64 */
        int width = 1 << ((t - 0xcc) & 3);
        if (end - q < width)
            return 0;
        uint64_t v = be(q, width);
        q += width;
        if (t <= 0xcf) {
            *above = v > INT64_MAX;
        } else if (width < 8 && v >> (8 * width - 1)) {
            v -= (uint64_t)1 << (8 * width); /* negative: two's complement over 64 bits */
        }
        *value = (int64_t)v;
    } else {
        return 0;
    }
    *p = q;
    return 1;
}

/* The op code the object at *p equals under Python's == (an int, true, or a float such as
 * 1.0: records.py compares with ==), with *p past it; 0 if it equals none of 1..4. */
static int op_field(const unsigned char **p, const unsigned char *end) {
    const unsigned char *q = *p;
    int64_t value;
    int above;
    double real;
    if (int_field(&q, end, &value, &above)) {
        if (above || value < 1 || value > 4)
            return 0;
        *p = q;
        return (int)value;
    }
    if (q < end && *q == 0xc3) { /* true == 1 */
        *p = q + 1;
        return 1;
    }
    if (q < end && *q == 0xca && end - q >= 5) {
        uint32_t bits = (uint32_t)be(q + 1, 4);
        float single;
        memcpy(&single, &bits, 4);
        real = single;
        q += 5;
    } else if (q < end && *q == 0xcb && end - q >= 9) {
        uint64_t bits = be(q + 1, 8);
        memcpy(&real, &bits, 8);
        q += 9;
    } else {
        return 0;
    }
    if (!(real >= 1 && real <= 4) || real != (int)real)
        return 0;
    *p = q;
    return (int)real;
}

/* A key records.py takes, with *p past it: a str (valid UTF-8) or bin of 1..max_key_size
 * bytes (a str's UTF-8 bytes are its msgpack bytes). */
static int key_field(const unsigned char **p, const unsigned char *end, uint64_t max_key_size) {
    const unsigned char *key;
    uint64_t len;
    int is_str;
    return str_or_bin(p, end, &key, &len, &is_str) && len > 0 && len <= max_key_size
        && (!is_str || utf8_ok(key, (Py_ssize_t)len));
}

/* A value records.py takes, with *p past it: a bin holding one msgpack object that decodes. */
static int value_field(const unsigned char **p, const unsigned char *end) {
    const unsigned char *value;
    uint64_t len;
    int is_str;
    return str_or_bin(p, end, &value, &len, &is_str) && !is_str
        && value_ok(value, (Py_ssize_t)len);
}

/* Whether the `fields` objects at *p, an op code first, are an operation records.py's
 * `_item_problem` takes: [1, key, value], [2, key] or [3, key, delta, result] with delta and
 * result 64-bit ints. *p is left past them if they are. */
static int operation_ok(const unsigned char **p, const unsigned char *end, uint64_t fields,
                        uint64_t max_key_size) {
    int64_t number;
    int above;
    switch (op_field(p, end)) {
    case 1:
        return fields == 3 && key_field(p, end, max_key_size) && value_field(p, end);
    case 2:
        return fields == 2 && key_field(p, end, max_key_size);
    case 3:
        return fields == 4 && key_field(p, end, max_key_size)
            && int_field(p, end, &number, &above) && !above
            && int_field(p, end, &number, &above) && !above;
    default:
        return 0;
    }
}

/* Whether the record at *p is one records.py's `problem` takes: [lsn, op...] with a positive
 * int LSN and an operation, or [lsn, 4, [operation, ...]] (a batch of at least one). *p is
 * left past it and its LSN in *at if it is; if not, *unit is where what to report starts: the
 * record, or its first unusable operation when the record is a batch otherwise sound
 * (*in_batch set), as `problem` reports a batch. */
static int record_ok(const unsigned char **p, const unsigned char *end, uint64_t max_key_size,
                     const unsigned char **unit, int *in_batch, uint64_t *at) {
    const unsigned char *q = *p, *op;
    uint64_t fields, items;
    int64_t lsn;
    int above;
    *unit = q;
    *in_batch = 0;
    if (!array_header(&q, end, &fields) || fields < 3 || !int_field(&q, end, &lsn, &above)
            || (!above && lsn < 1))
        return 0;
    op = q;
    if (op_field(&q, end) != 4) {
        q = op;
        if (!operation_ok(&q, end, fields - 1, max_key_size))
            return 0;
    } else {
        if (fields != 3 || !array_header(&q, end, &items) || items == 0)
            return 0;
        *in_batch = 1;
        for (uint64_t i = 0; i < items; i++) {
            *unit = q;
            if (!array_header(&q, end, &fields) || fields < 2
                    || !operation_ok(&q, end, fields, max_key_size))
                return 0;
        }
    }
    *p = q;
    *at = (uint64_t)lsn; /* positive: as an int64, or over INT64_MAX (above) */
    return 1;
}

/* Where the object at p ends if decoding it builds at most `budget` things: an object, a slot
 * of an array or map, a byte of a str count one each (a bin's bytes, copied once, do not; a
 * str may take 4 bytes a character). `end` if its bytes run out or go wrong first (decoding
 * p..end stops there), NULL if it would build more. Not a check: msgpack judges what is
 * decoded. */
static const unsigned char *bounded_end(const unsigned char *p, const unsigned char *end,
                                        uint64_t budget) {
    const uint64_t size = (uint64_t)(end - p);
    uint64_t pending = 1, built = 0; /* objects still to come; what those met so far build */
    while (pending > 0) {
        if (p >= end)
            return end;
        unsigned char t = *p++;
        uint64_t skip = 0, slots = 0, chars = 0, n;
        if (t <= 0x7f || t >= 0xe0 || t == 0xc0 || t == 0xc2 || t == 0xc3) {
            /* fixint, nil, false, true */
        } else if (t >= 0xa0 && t <= 0xbf) {
            chars = t & 0x1f;
        } else if (t >= 0x90 && t <= 0x9f) {
            slots = t & 0x0f;
        } else if (t >= 0x80 && t <= 0x8f) {
            slots = 2 * (t & 0x0f);
        } else if (t >= 0xca && t <= 0xd3) { /* float32, float64, uint8..64, int8..64 */
            skip = t == 0xca ? 4 : t == 0xcb ? 8 : (uint64_t)1 << ((t - 0xcc) & 3);
        } else if (t >= 0xd4 && t <= 0xd8) { /* fixext: its type byte, then its data */
            skip = 1 + ((uint64_t)1 << (t - 0xd4));
        } else {
            int ext = t >= 0xc7 && t <= 0xc9, width = ext ? 1 << (t - 0xc7) : length_field(t);
            if (width == 0 || end - p < width)
                return end;
            n = be(p, width);
            p += width;
            if (ext)
                skip = 1 + n;
            else if (t == 0xc4 || t == 0xc5 || t == 0xc6)
                skip = n;
            else if (t == 0xd9 || t == 0xda || t == 0xdb)
                chars = n;
            else
                slots = t == 0xdc || t == 0xdd ? n : 2 * n;
        }
        skip += chars;
        if (skip > (uint64_t)(end - p) || slots > size)
            return end; /* cut short, or more elements than p..end has bytes: msgpack builds
                         * none of it (max_array_len, max_map_len) */
        built += 1 + slots + chars;
        if (built > budget)
            return NULL;
        pending = pending - 1 + slots;
        p += skip;
    }
    return p;
}

/* unusable(payload, max_key_size, budget[, expected]) -> None | (start, stop, in_batch)
 * | (index, lsn): None if the payload is one non-empty array of records records.py takes and
 * nothing else (and, given `expected`, an int, their LSNs are expected, expected + 1...: a
 * batch takes one, as the Python walk counts them); else where to look for why:
 * payload[start:stop] is the first record that is not usable, or that record's first
 * unusable operation (in_batch), or the whole payload (start 0) when it is not one array of
 * records. stop is 0 when decoding that much would build more than `budget` things
 * (`bounded_end`). Where every record is usable and one's LSN is not the one expected there,
 * (index, lsn) are the first such record's place in the frame and its LSN. */
static PyObject *unusable(PyObject *self, PyObject *args) {
    Py_buffer view;
    Py_ssize_t max_key, budget;
    PyObject *expected = Py_None;
    (void)self;
    if (!PyArg_ParseTuple(args, "y*nn|O", &view, &max_key, &budget, &expected))
        return NULL;
    const unsigned char *start = view.buf, *p = start, *end = start + view.len, *unit = start;
    uint64_t max_key_size = max_key < 0 ? 0 : (uint64_t)max_key, records, i = 0;
    int in_batch = 0;
    /* The LSN the next record must have; 0, which no usable record has, once none can have it:
     * an `expected` out of a uint64's range (as_u64 leaves `want` alone), or past UINT64_MAX
     * (want++ wraps). `sequenced` until a record is out of sequence; `misplaced` is then its
     * place in the frame plus 1 (0: none), `misplaced_lsn` its LSN. */
    uint64_t want = 0, lsn = 0, misplaced = 0, misplaced_lsn = 0;
    int sequenced = expected != Py_None;
    if (sequenced)
        as_u64(expected, &want);
    if (array_header(&p, end, &records) && records > 0) {
        while (i < records && record_ok(&p, end, max_key_size, &unit, &in_batch, &lsn)) {
            if (sequenced && lsn != want) { /* the first out of sequence: judged once the
                                             * others are found usable, as the walk does */
                sequenced = 0;
                misplaced = i + 1;
                misplaced_lsn = lsn;
            }
            want++;
            i++;
        }
        if (i == records) {
            if (p == end) {
                PyBuffer_Release(&view);
                if (misplaced)
                    return Py_BuildValue("(KK)", (unsigned long long)(misplaced - 1),
                                         (unsigned long long)misplaced_lsn);
                Py_RETURN_NONE;
            }
            unit = start; /* bytes after the array of records */
            in_batch = 0;
        }
    }
    const unsigned char *stop = bounded_end(unit, end, budget < 0 ? 0 : (uint64_t)budget);
    PyObject *found = Py_BuildValue("(nnO)", (Py_ssize_t)(unit - start),
                                    stop == NULL ? (Py_ssize_t)0 : (Py_ssize_t)(stop - start),
                                    in_batch ? Py_True : Py_False);
    PyBuffer_Release(&view);
    return found;
}

/* lsns(payload, max_key_size) -> bytes | None: the LSNs of a frame payload's records, in
 * frame order, each a native uint64 (memoryview(found).cast("Q")), if `unusable` finds every
 * record usable, whatever their order (the same walk, `record_ok`); else None. What the
 * resync rule asks of a frame out of sequence: 8 bytes a record, nothing decoded. */
static PyObject *lsns(PyObject *self, PyObject *args) {
    Py_buffer view;
    Py_ssize_t max_key;
    (void)self;
    if (!PyArg_ParseTuple(args, "y*n", &view, &max_key))
        return NULL;
    const unsigned char *start = view.buf, *p = start, *end = start + view.len, *unit;
    uint64_t max_key_size = max_key < 0 ? 0 : (uint64_t)max_key, records, lsn;
    int in_batch;
    PyObject *found = NULL;
    /* A usable record takes 4 bytes at least ([lsn, op, key]): more records than that
     * allows are refused before anything is allocated for them. */
    if (!array_header(&p, end, &records) || records == 0
            || records > (uint64_t)view.len / 4)
        goto none;
    found = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)(records * sizeof(uint64_t)));
    if (found == NULL) {
        PyBuffer_Release(&view);
        return NULL;
    }
    char *slots = PyBytes_AS_STRING(found);
    for (uint64_t i = 0; i < records; i++) {
        if (!record_ok(&p, end, max_key_size, &unit, &in_batch, &lsn))
            goto none;
        memcpy(slots + i * sizeof(uint64_t), &lsn, sizeof(uint64_t));
    }
    if (p != end)
        goto none;
    PyBuffer_Release(&view);
    return found;
none:
    Py_XDECREF(found);
    PyBuffer_Release(&view);
    Py_RETURN_NONE;
}

/* decodes(value) -> bool: whether msgpack.unpackb(value, strict_map_key=False) decodes it,
 * found without building anything (`skip_object`). */
static PyObject *decodes(PyObject *self, PyObject *arg) {
    Py_buffer view;
    (void)self;
    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0)
        return NULL;
    int ok = value_ok(view.buf, view.len);
    PyBuffer_Release(&view);
    return PyBool_FromLong(ok);
}

/* crc32_shift(crc, count) -> int: what crc32(A) contributes to crc32(A + B) for any B of
 * `count` bytes, i.e. crc32(A + B) ^ crc32(B): zlib's crc32_combine with crc32(B) = 0 (the
 * combination is linear). The reader's span checksums (wal/reader.py, `_Checksums`); the
 * same computation, in Python, where this module is not built. */
static PyObject *crc32_shift(PyObject *self, PyObject *args) {
    unsigned long crc;
    long long count;
    (void)self;
    if (!PyArg_ParseTuple(args, "kL", &crc, &count))
        return NULL;
    if (count < 0 || count > 0x7fffffffLL || crc > 0xffffffffUL) {
        PyErr_SetString(PyExc_ValueError, "crc32_shift: crc or count out of range");
        return NULL;
    }
    return PyLong_FromUnsignedLong(crc32_combine(crc, 0, (z_off_t)count) & 0xffffffffUL);
}

static PyMethodDef methods[] = {
    {"crc32_shift", crc32_shift, METH_VARARGS,
     "crc32_shift(crc, count) -> int: crc32(A + B) ^ crc32(B) for any B of count bytes, "
     "given crc = crc32(A)."},
    {"decodes", decodes, METH_O,
     "decodes(value) -> bool: whether msgpack.unpackb(value, strict_map_key=False) decodes "
     "it, found without building anything."},
    {"unusable", unusable, METH_VARARGS,
     "unusable(payload, max_key_size, budget[, expected]) -> None | (start, stop, in_batch) "
     "| (index, lsn): where the first record of a frame payload that is not usable is, or "
     "the first whose LSN is out of sequence (see the module source)."},
    {"lsns", lsns, METH_VARARGS,
     "lsns(payload, max_key_size) -> bytes | None: the LSNs of a frame payload's records as "
     "native uint64s, if every record is usable, whatever their order; else None."},
    {"scan", scan, METH_VARARGS,
     "scan(data, pos, size, expected, max_key_size, max_payload, max_records, stop_at) -> "
     "(records, pos, expected): walk the plain-put frames from pos (see the module source)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "wbcache.wal._walk",
    "The reader's fast path over plain-put frames (wal/_walk.c).", -1, methods,
    NULL, NULL, NULL, NULL,
};

/* What the Python side checks before it uses this module (wal/reader.py): the format and op
 * code this file was written for. */
PyMODINIT_FUNC PyInit__walk(void) {
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddIntConstant(m, "FRAME_SIZE", FRAME_SIZE) < 0
            || PyModule_AddIntConstant(m, "OP_PUT", 1) < 0
            || PyModule_AddIntConstant(m, "MAX_DEPTH", MAX_DEPTH) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    PyObject *magic = PyBytes_FromStringAndSize((const char *)FRAME_MAGIC, 4);
    int added = magic != NULL && PyModule_AddObjectRef(m, "FRAME_MAGIC", magic) == 0;
    Py_XDECREF(magic);
    if (!added) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
