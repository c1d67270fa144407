/* LMDB's puts of a flush, sorted by key type, in C: the loop of LmdbDatabase.write.
 *
 * split(puts) -> (str_puts, bytes_puts)
 *
 * `puts` is an iterable of (key, value) tuples (dict.items() of a flush's changes, or a list
 * of them; anything else is refused with TypeError, where the Python loop would unpack any
 * pair), key an exact str or bytes (codec.check_key),
 * value bytes. str_puts holds (key encoded as UTF-8, value) for the str keys, bytes_puts
 * (key, value) for the bytes keys, each in the order given: what py-lmdb's putmulti takes for
 * the `str` and `bytes` databases. The same as the Python loop it replaces
 * (wbcache/backends/lmdb.py, `_split`), which runs when this module is not built;
 * tests/test_lmdb_pairs.py compares the two. A flush of 100,000 entries spent more time in
 * that loop than in LMDB's putmulti (docs/bench.md).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

static int add_pair(PyObject *into, PyObject *key, PyObject *value) {
    PyObject *pair = PyTuple_Pack(2, key, value);
    if (pair == NULL)
        return -1;
    if (PyBytes_CheckExact(key) && PyBytes_CheckExact(value))
        PyObject_GC_UnTrack(pair); /* two bytes can hold no cycle: the collector skips it */
    int failed = PyList_Append(into, pair);
    Py_DECREF(pair);
    return failed;
}

static int split_one(PyObject *item, PyObject *str_puts, PyObject *bytes_puts) {
    if (!PyTuple_Check(item) || PyTuple_GET_SIZE(item) != 2) {
        PyErr_Format(PyExc_TypeError, "a put is a (key, value) pair, not %R", item);
        return -1;
    }
    PyObject *key = PyTuple_GET_ITEM(item, 0), *value = PyTuple_GET_ITEM(item, 1);
    if (PyUnicode_Check(key)) {
        PyObject *raw = PyUnicode_AsUTF8String(key);
        if (raw == NULL)
            return -1;
        int failed = add_pair(str_puts, raw, value);
        Py_DECREF(raw);
        return failed;
    }
    return add_pair(bytes_puts, key, value);
}

static PyObject *split(PyObject *module, PyObject *puts) {
    PyObject *str_puts = PyList_New(0), *bytes_puts = PyList_New(0), *iterator = NULL;
    if (str_puts == NULL || bytes_puts == NULL)
        goto error;
    iterator = PyObject_GetIter(puts);
    if (iterator == NULL)
        goto error;
    PyObject *item;
    while ((item = PyIter_Next(iterator)) != NULL) {
        int failed = split_one(item, str_puts, bytes_puts);
        Py_DECREF(item);
        if (failed)
            goto error;
    }
    if (PyErr_Occurred())
        goto error;
    Py_DECREF(iterator);
    return Py_BuildValue("(NN)", str_puts, bytes_puts);
error:
    Py_XDECREF(iterator);
    Py_XDECREF(str_puts);
    Py_XDECREF(bytes_puts);
    return NULL;
}

static PyMethodDef methods[] = {
    {"split", split, METH_O, "split(puts) -> (str_puts, bytes_puts): see wbcache/backends/_pairs.c"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef pairs_module = {
    PyModuleDef_HEAD_INIT, "_pairs", "LMDB's puts of a flush, in C (wbcache/backends/_pairs.c).",
    -1, methods,
};

PyMODINIT_FUNC PyInit__pairs(void) {
    return PyModule_Create(&pairs_module);
}
