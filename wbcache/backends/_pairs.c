/* LMDB's puts of a flush, in C: the iterator LmdbDatabase.write hands to py-lmdb's putmulti.
 *
 * pairs(puts, str_keys) -> an iterator of (key bytes, value) tuples
 *
 * `puts` is an iterable of (key, value) tuples (dict.items() of a flush's changes, or a list
 * of them; anything else is refused with TypeError), key an exact str or bytes
 * (codec.check_key), value bytes. With `str_keys` true the iterator yields (key encoded as
 * UTF-8, value) for the str keys, else (key, value) for the bytes keys, in the order given,
 * and counts the keys of the other kind it passes over in its `other` attribute: what py-lmdb's
 * putmulti takes for the `str` and `bytes` databases. The same as the Python iterator it
 * replaces (wbcache/backends/lmdb.py, `_PairsInPython`), which runs when this module is not
 * built; tests/test_lmdb_pairs.py compares the two.
 *
 * Lazily, not as a list: putmulti drops each pair as soon as LMDB has it, so the next pair
 * reuses the same memory, where a list of 100,000 pairs is built, walked once more and freed
 * (8 + 3 ms of a 32 ms flush of 100,000 entries, against 12 ms in putmulti: docs/bench.md).
 * The pairs are built while the flusher holds the flush's batch, which no other thread
 * changes meanwhile (Sequencer.take_dirty); putmulti releases the GIL for each LMDB put.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

typedef struct {
    PyObject_HEAD
    PyObject *source; /* the iterator of `puts` */
    int str_keys;
    Py_ssize_t other; /* keys of the other kind passed over */
} Pairs;

static PyObject *pair_of(PyObject *key, PyObject *value) {
    PyObject *pair = PyTuple_Pack(2, key, value);
    if (pair != NULL && PyBytes_CheckExact(key) && PyBytes_CheckExact(value))
        PyObject_GC_UnTrack(pair); /* two bytes can hold no cycle: the collector skips it */
    return pair;
}

/* The pair `item` gives, NULL with no exception for a key of the other kind, NULL with one
 * for a bad item. */
static PyObject *pair_from(Pairs *self, PyObject *item) {
    if (!PyTuple_Check(item) || PyTuple_GET_SIZE(item) != 2) {
        PyErr_Format(PyExc_TypeError, "a put is a (key, value) pair, not %R", item);
        return NULL;
    }
    PyObject *key = PyTuple_GET_ITEM(item, 0), *value = PyTuple_GET_ITEM(item, 1);
    int is_str = PyUnicode_Check(key) ? 1 : 0;
    if (is_str != self->str_keys) {
        self->other++;
        return NULL;
    }
    if (!self->str_keys)
        return pair_of(key, value);
    PyObject *raw = PyUnicode_AsUTF8String(key);
    if (raw == NULL)
        return NULL;
    PyObject *pair = pair_of(raw, value);
    Py_DECREF(raw);
    return pair;
}

static PyObject *pairs_next(Pairs *self) {
    PyObject *item;
    while ((item = PyIter_Next(self->source)) != NULL) {
        /* dropped before the pair is returned: dict.items() then reuses its tuple */
        PyObject *pair = pair_from(self, item);
        Py_DECREF(item);
        if (pair != NULL || PyErr_Occurred())
            return pair;
    }
    return NULL; /* the end, or the source's error */
}

static void pairs_dealloc(Pairs *self) {
    Py_XDECREF(self->source);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMemberDef pairs_members[] = {
    {"other", T_PYSSIZET, offsetof(Pairs, other), READONLY,
     "keys of the other kind passed over so far"},
    {NULL},
};

static PyTypeObject PairsType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "wbcache.backends._pairs.Pairs",
    .tp_basicsize = sizeof(Pairs),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "pairs(puts, str_keys): see wbcache/backends/_pairs.c",
    .tp_dealloc = (destructor)pairs_dealloc,
    .tp_iter = PyObject_SelfIter,
    .tp_iternext = (iternextfunc)pairs_next,
    .tp_members = pairs_members,
};

static PyObject *pairs(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "pairs(puts, str_keys) takes 2 arguments");
        return NULL;
    }
    int str_keys = PyObject_IsTrue(args[1]);
    if (str_keys < 0)
        return NULL;
    PyObject *source = PyObject_GetIter(args[0]);
    if (source == NULL)
        return NULL;
    Pairs *self = PyObject_New(Pairs, &PairsType);
    if (self == NULL) {
        Py_DECREF(source);
        return NULL;
    }
    self->source = source;
    self->str_keys = str_keys;
    self->other = 0;
    return (PyObject *)self;
}

static PyMethodDef methods[] = {
    {"pairs", (PyCFunction)(void (*)(void))pairs, METH_FASTCALL,
     "pairs(puts, str_keys) -> an iterator of (key bytes, value): see wbcache/backends/_pairs.c"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef pairs_module = {
    PyModuleDef_HEAD_INIT, "_pairs", "LMDB's puts of a flush, in C (wbcache/backends/_pairs.c).",
    -1, methods,
};

PyMODINIT_FUNC PyInit__pairs(void) {
    if (PyType_Ready(&PairsType) < 0)
        return NULL;
    return PyModule_Create(&pairs_module);
}
