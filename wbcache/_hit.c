/* The cache hit's fast path: `cache.get` in C, the same steps as the closure it replaces.
 *
 * `Hit(entries, note_hit, read, unpackb, tombstone)` is a callable `get(key, default=None)`:
 *
 *     held = entries.get(key, MISSING)          # a dict (or OrderedDict); raises as dict.get
 *     if held is MISSING: return read(key, default)   # not in memory: the slow path
 *     if not isinstance(key, (str, bytes)): return read(key, default)
 *     note_hit(key)                              # the CLOCK's ring of recent hits
 *     if type(held) is tuple: hits += 1; return unpackb(held[0], strict_map_key=False)
 *     if held is tombstone: return default
 *     hits += 1; return held
 *
 * wbcache/hit_path.py holds that closure, which is what runs when this module is not built
 * (setup.py builds it when a C compiler is there); tests/test_hit_path.py runs both on the
 * same cases. No lock, as in Python: the dict lookup and the deque append are each atomic
 * under the GIL, and `held` is a strong reference before anything else runs. `hits` counts
 * hits (the `stats()` figure); it is read as an attribute. Instances have a __dict__, so
 * that hit_path.py can give them a function's __name__, __doc__ and __signature__.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

#ifndef Py_TPFLAGS_HAVE_VECTORCALL /* public from 3.12; the same flag before */
#define Py_TPFLAGS_HAVE_VECTORCALL _Py_TPFLAGS_HAVE_VECTORCALL
#endif

typedef struct {
    PyObject_HEAD
    PyObject *entries;   /* dict: key -> what memory holds */
    PyObject *note_hit;  /* callable(key) */
    PyObject *read;      /* callable(key, default): the miss path */
    PyObject *unpackb;   /* msgpack.unpackb */
    PyObject *tombstone; /* a deleted key's marker */
    PyObject *dict;      /* the instance's __dict__ */
    Py_ssize_t hits;
    vectorcallfunc vectorcall;
} Hit;

static PyObject *strict_map_key_kwnames; /* ("strict_map_key",) */

static PyObject *hit_unpack(Hit *self, PyObject *held) {
    if (PyTuple_GET_SIZE(held) < 1) { /* never made by the codec; as held[0] would */
        PyErr_SetString(PyExc_IndexError, "tuple index out of range");
        return NULL;
    }
    PyObject *args[2] = {PyTuple_GET_ITEM(held, 0), Py_False};
    return PyObject_Vectorcall(self->unpackb, args, 1, strict_map_key_kwnames);
}

static PyObject *hit_call(Hit *self, PyObject *const *args, size_t nargsf, PyObject *kwnames) {
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    PyObject *key = nargs > 0 ? args[0] : NULL;
    PyObject *deflt = nargs > 1 ? args[1] : NULL;
    Py_ssize_t nkw = kwnames == NULL ? 0 : PyTuple_GET_SIZE(kwnames);
    if (nargs > 2) {
        PyErr_Format(PyExc_TypeError, "get() takes from 1 to 2 positional arguments but %zd "
                     "were given", nargs);
        return NULL;
    }
    for (Py_ssize_t i = 0; i < nkw; i++) {
        PyObject *name = PyTuple_GET_ITEM(kwnames, i);
        PyObject **slot;
        if (PyUnicode_Check(name) && PyUnicode_CompareWithASCIIString(name, "key") == 0)
            slot = &key;
        else if (PyUnicode_Check(name) && PyUnicode_CompareWithASCIIString(name, "default") == 0)
            slot = &deflt;
        else {
            PyErr_Format(PyExc_TypeError, "get() got an unexpected keyword argument '%S'", name);
            return NULL;
        }
        if (*slot != NULL) {
            PyErr_Format(PyExc_TypeError, "get() got multiple values for argument '%S'", name);
            return NULL;
        }
        *slot = args[nargs + i];
    }
    if (key == NULL) {
        PyErr_SetString(PyExc_TypeError, "get() missing 1 required positional argument: 'key'");
        return NULL;
    }
    if (deflt == NULL)
        deflt = Py_None;

    PyObject *slow[2] = {key, deflt};
    PyObject *held = PyDict_GetItemWithError(self->entries, key); /* borrowed */
    if (held == NULL) {
        if (PyErr_Occurred())
            return NULL;
        return PyObject_Vectorcall(self->read, slow, 2, NULL);
    }
    if (!PyUnicode_CheckExact(key) && !PyBytes_CheckExact(key))
        /* the slow path checks it and looks up the plain str (or bytes) a subclass stands
         * for: one overriding __eq__ (a case-insensitive str) found another key's entry */
        return PyObject_Vectorcall(self->read, slow, 2, NULL);
    Py_INCREF(held); /* note_hit may let another thread drop the entry */
    PyObject *noted = PyObject_CallOneArg(self->note_hit, key);
    if (noted == NULL) {
        Py_DECREF(held);
        return NULL;
    }
    Py_DECREF(noted);
    if (PyTuple_CheckExact(held)) { /* a mutable value, as its encoding (codec.py) */
        self->hits++;
        PyObject *value = hit_unpack(self, held);
        Py_DECREF(held);
        return value;
    }
    if (held == self->tombstone) {
        Py_DECREF(held);
        return Py_NewRef(deflt);
    }
    self->hits++;
    return held;
}

static PyObject *hit_new(PyTypeObject *type, PyObject *args, PyObject *kwargs) {
    PyObject *entries, *note_hit, *read, *unpackb, *tombstone;
    static char *names[] = {"entries", "note_hit", "read", "unpackb", "tombstone", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O!OOOO:Hit", names, &PyDict_Type,
                                     &entries, &note_hit, &read, &unpackb, &tombstone))
        return NULL;
    Hit *self = (Hit *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    self->entries = Py_NewRef(entries);
    self->note_hit = Py_NewRef(note_hit);
    self->read = Py_NewRef(read);
    self->unpackb = Py_NewRef(unpackb);
    self->tombstone = Py_NewRef(tombstone);
    self->dict = NULL;
    self->hits = 0;
    self->vectorcall = (vectorcallfunc)hit_call;
    return (PyObject *)self;
}

static int hit_traverse(Hit *self, visitproc visit, void *arg) {
    Py_VISIT(self->entries);
    Py_VISIT(self->note_hit);
    Py_VISIT(self->read);
    Py_VISIT(self->unpackb);
    Py_VISIT(self->tombstone);
    Py_VISIT(self->dict);
    return 0;
}

static int hit_clear(Hit *self) {
    Py_CLEAR(self->entries);
    Py_CLEAR(self->note_hit);
    Py_CLEAR(self->read);
    Py_CLEAR(self->unpackb);
    Py_CLEAR(self->tombstone);
    Py_CLEAR(self->dict);
    return 0;
}

static void hit_dealloc(Hit *self) {
    PyObject_GC_UnTrack(self);
    hit_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMemberDef hit_members[] = {
    {"hits", T_PYSSIZET, offsetof(Hit, hits), READONLY, "hits so far"},
    {NULL},
};

static PyTypeObject HitType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "wbcache._hit.Hit",
    .tp_basicsize = sizeof(Hit),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_new = hit_new,
    .tp_traverse = (traverseproc)hit_traverse,
    .tp_clear = (inquiry)hit_clear,
    .tp_dealloc = (destructor)hit_dealloc,
    .tp_call = PyVectorcall_Call,
    .tp_vectorcall_offset = offsetof(Hit, vectorcall),
    .tp_members = hit_members,
    .tp_dictoffset = offsetof(Hit, dict),
    .tp_getattro = PyObject_GenericGetAttr,
    .tp_setattro = PyObject_GenericSetAttr,
};

static struct PyModuleDef hit_module = {
    PyModuleDef_HEAD_INIT, "_hit", "The cache hit's fast path (wbcache/_hit.c).", -1, NULL,
};

PyMODINIT_FUNC PyInit__hit(void) {
    if (PyType_Ready(&HitType) < 0)
        return NULL;
    PyObject *name = PyUnicode_InternFromString("strict_map_key");
    if (name == NULL)
        return NULL;
    strict_map_key_kwnames = PyTuple_Pack(1, name);
    Py_DECREF(name);
    if (strict_map_key_kwnames == NULL)
        return NULL;
    PyObject *module = PyModule_Create(&hit_module);
    if (module == NULL)
        return NULL;
    Py_INCREF(&HitType);
    if (PyModule_AddObject(module, "Hit", (PyObject *)&HitType) < 0) {
        Py_DECREF(&HitType);
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
