/* The group commit's write and fdatasync, in one call that lets go of the GIL once.
 *
 * write_sync(fd, data) writes every byte of `data` to `fd` (looping over short writes), then
 * fdatasyncs `fd`: the same system calls, in the same order, as wal/syscalls.py's `write_all`
 * followed by `os.fdatasync`, which LogWriter.append runs when this module is not built (or
 * when the fault-injection harness has replaced a system call, or armed a crash point between
 * the two). An error raises OSError with its errno, as `os.write` and `os.fdatasync` do; a
 * write interrupted by a signal runs the signal's handlers (which may raise) and goes on, as
 * Python's own calls do (PEP 475).
 *
 * Why: each `os` call releases the GIL and must take it back before the next one. With 16 and
 * 64 writer threads running Python meanwhile, the leader waited 80 and 200 us per batch for
 * the GIL between its write and its fdatasync, with the disk idle and every follower's
 * acknowledgement behind it (docs/bench.md, "A seventh run").
 *
 * retake(lock) takes a lock back whatever interrupts the wait (wal/commit.py, `retake`): a
 * blocking acquire runs signal handlers while it waits, and a KeyboardInterrupt raised there
 * leaves the lock not taken. Here such an exception is kept and the acquire tried again until
 * it succeeds; the first one kept is returned (None if none), for the caller to raise once
 * its state is whole. In C because in Python the handler may also run just AFTER acquire()
 * has taken the lock, at the call's check for pending signals, still inside the loop's try:
 * the loop would then take a lock it holds, and wait for good. Here no Python code runs
 * between the acquire that succeeds and the return.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <limits.h>
#include <unistd.h>

static PyObject *write_sync(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "write_sync(fd, data) takes 2 arguments");
        return NULL;
    }
    long fd = PyLong_AsLong(args[0]);
    if (fd == -1 && PyErr_Occurred())
        return NULL;
    if (fd < INT_MIN || fd > INT_MAX) { /* as os.write; a negative one fails with EBADF */
        PyErr_SetString(PyExc_OverflowError, "write_sync: fd does not fit in a C int");
        return NULL;
    }
    Py_buffer view;
    if (PyObject_GetBuffer(args[1], &view, PyBUF_SIMPLE) < 0)
        return NULL;
    const char *next = view.buf;
    Py_ssize_t left = view.len;
    int error;
    for (;;) {
        error = 0;
        Py_BEGIN_ALLOW_THREADS
        while (left > 0) {
            ssize_t written = write((int)fd, next, (size_t)left);
            if (written < 0) {
                error = errno;
                break;
            }
            next += written;
            left -= written;
        }
        if (error == 0 && fdatasync((int)fd) < 0)
            error = errno;
        Py_END_ALLOW_THREADS
        if (error != EINTR)
            break;
        if (PyErr_CheckSignals() < 0) { /* a handler raised: stop there, as os.write would */
            PyBuffer_Release(&view);
            return NULL;
        }
    }
    PyBuffer_Release(&view);
    if (error != 0) {
        errno = error;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    Py_RETURN_NONE;
}

/* Keep the exception set (the first one: a later one is dropped). */
static void keep(PyObject **type, PyObject **value, PyObject **traceback) {
    if (*type == NULL) {
        PyErr_Fetch(type, value, traceback);
        PyErr_NormalizeException(type, value, traceback);
    } else {
        PyErr_Clear();
    }
}

static PyObject *RetakeFailed; /* the module's exception: retake gave up, the lock not taken */
static PyObject *ACQUIRE;      /* "acquire", interned once: retake runs for every durable put */

/* Raise RetakeFailed from the exception set (its __cause__ and __context__). */
static PyObject *give_up(void) {
    PyObject *type, *value, *traceback;
    PyErr_Fetch(&type, &value, &traceback);
    PyErr_NormalizeException(&type, &value, &traceback);
    if (traceback != NULL)
        PyException_SetTraceback(value, traceback);
    Py_XDECREF(type);
    Py_XDECREF(traceback);
    PyObject *failed = PyObject_CallFunction(
        RetakeFailed, "s", "the lock could not be taken back: its acquire fails by itself");
    if (failed == NULL) {
        Py_XDECREF(value);
        return NULL;
    }
    Py_XINCREF(value);
    PyException_SetCause(failed, value); /* steals the reference */
    PyException_SetContext(failed, value); /* steals the other */
    PyErr_SetObject(RetakeFailed, failed);
    Py_DECREF(failed);
    return NULL;
}

/* After each blocking acquire that failed (a signal's handler raised while it waited), a
 * non-blocking one: it runs no handler, so it either takes the lock, finds it held (and the
 * wait goes on), or fails by itself (RecursionError at the recursion limit, MemoryError, a
 * lock-like object that raises). Then retake gives up, raising that error with the lock NOT
 * taken, as RetakeFailed (the callers take any other exception raised at their call for a
 * signal's, the lock taken): retrying would spin with the GIL held, freezing the process. */
static PyObject *retake(PyObject *module, PyObject *lock) {
    PyObject *type = NULL, *value = NULL, *traceback = NULL;
    for (;;) {
        PyObject *result = PyObject_CallMethodNoArgs(lock, ACQUIRE);
        if (result != NULL) {
            Py_DECREF(result);
            break;
        }
        keep(&type, &value, &traceback);
        result = PyObject_CallMethodOneArg(lock, ACQUIRE, Py_False);
        int taken = result == NULL ? -1 : PyObject_IsTrue(result);
        Py_XDECREF(result);
        if (taken < 0) { /* failing by itself: give up (RetakeFailed, its error the cause) */
            Py_XDECREF(type);
            Py_XDECREF(value);
            Py_XDECREF(traceback);
            return give_up();
        }
        if (taken)
            break;
    }
    /* A signal that arrived as the acquire returned: handled here, so that its exception
     * is returned with the others rather than raised at the caller's call, after us. */
    if (PyErr_CheckSignals() < 0)
        keep(&type, &value, &traceback);
    if (type == NULL)
        Py_RETURN_NONE;
    if (traceback != NULL)
        PyException_SetTraceback(value, traceback);
    Py_XDECREF(type);
    Py_XDECREF(traceback);
    return value;
}

static PyMethodDef methods[] = {
    {"write_sync", (PyCFunction)(void (*)(void))write_sync, METH_FASTCALL,
     "write_sync(fd, data): write every byte of data, then fdatasync fd, releasing the GIL "
     "once (see wal/_sync.c)."},
    {"retake", (PyCFunction)retake, METH_O,
     "retake(lock): acquire lock whatever interrupts the wait; the first interruption, or "
     "None (see wal/_sync.c)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef sync_module = {
    PyModuleDef_HEAD_INIT, "_sync",
    "The group commit's write and fdatasync in one call (wal/_sync.c).",
    -1, methods,
};

PyMODINIT_FUNC PyInit__sync(void) {
    PyObject *module = PyModule_Create(&sync_module);
    if (module == NULL)
        return NULL;
    ACQUIRE = PyUnicode_InternFromString("acquire");
    if (ACQUIRE == NULL) {
        Py_DECREF(module);
        return NULL;
    }
    RetakeFailed = PyErr_NewExceptionWithDoc(
        "wbcache.wal._sync.RetakeFailed",
        "retake gave up: the lock's acquire fails by itself; the lock is not taken.",
        PyExc_RuntimeError, NULL);
    if (RetakeFailed == NULL || PyModule_AddObjectRef(module, "RetakeFailed", RetakeFailed) < 0) {
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
