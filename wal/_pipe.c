/* The group commit without the GIL: a thread of its own writes and fdatasyncs the log.
 *
 * Pipe(fd) starts one POSIX thread that never runs Python. Writers hand it framed records
 * (`submit(data, lsn)`, lock of the sequencer held, so in LSN order). A batch takes everything
 * handed over since the last one, writes it with one write loop, fdatasyncs, and publishes how
 * far the log is durable (`durable_lsn`), waking whoever waits (`wait`). Who leads a batch: a
 * writer waiting for its record that finds the pipe idle leads it itself, GIL released (a lone
 * writer makes its own write and fdatasync, no hand-over to a thread and back); records handed
 * over while a batch is in flight, and those of writers that do not wait (`kick`, asyncio),
 * are led by the thread, at once when the batch before them ends: without waiting for the GIL,
 * which the leader of the Python group commit had to take back first (docs/bench.md, "The
 * targets missed": 60-400 us per batch with 16-64 writers running Python, the disk idle).
 *
 * Errors are sticky: once a write or fdatasync fails the thread takes no more batches, and
 * every later `submit` and `wait` reports the errno (after a failed fsync the kernel may have
 * dropped the pages, so a later fsync proves nothing).
 *
 * Locks: the mutex is held to hand records over, take a batch and publish one, never across a
 * write or an fdatasync; the only system calls under it are the eventfd's write and read,
 * which do not block (EFD_NONBLOCK). The thread takes no other lock and never the GIL.
 *
 * Fork: the thread does not exist in a child. A child never touches its parent's log
 * (wbcache/forking.py disowns the cache), and a Pipe freed in a child neither locks nor joins.
 *
 * One frame per batch: writers hand over records framed one by one (wal/writer.py,
 * `frame_one`), and a batch rewrites them, in place, as ONE frame of all its records before
 * its write (`one_frame`). The kernel may write the pages of one write back in any order, so
 * a power cut during a batch of several frames could keep a later frame and lose an earlier
 * one: a bad frame followed by valid data, which the reader must take for corruption
 * (docs/design.md, the damage rule), refusing to open. One frame torn is a torn tail. A batch
 * over the frame limit is written as frames of at most that size, each fdatasync'd before
 * the next is written. Bytes that are not such frames (tests hand over raw bytes) are
 * written as they are.
 *
 * Over the usual 500 lines: the batch's rewrite sits beside the batch it rewrites, so the
 * bytes the log gets can be read in one file.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <limits.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <zlib.h>

/* A buffer up to this size is kept for the next batch; a bigger one (a big value) is freed. */
#define KEEP_BUFFER (1 << 20)

typedef struct {
    PyObject_HEAD
    pthread_mutex_t mu;
    pthread_cond_t work; /* the thread waits here for records */
    pthread_cond_t done[2]; /* writers wait on done[b % 2] for the batch b that covers them */
    int fd;
    int notify_fd;       /* an eventfd the thread writes to after every batch, or -1 */
    char *fill;          /* records handed over, not yet taken by the thread */
    size_t fill_len, fill_cap;
    char *spare;         /* the buffer the thread gives back after a batch */
    size_t spare_cap;
    long long submitted_lsn, durable_lsn;
    long long batches;   /* batches finished; batch `batches` is in flight if busy */
    long long synced;    /* batches whose fdatasync succeeded */
    long long through;   /* the last record of the batch in flight */
    int error;           /* errno of the first failed write or fdatasync; sticky */
    int closing, idle, busy, initialized, started, joined;
    pid_t pid;
    pthread_t thread;
} Pipe;

static int write_all(int fd, const char *data, size_t len) {
    while (len > 0) {
        ssize_t n = write(fd, data, len);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return errno;
        }
        data += n;
        len -= (size_t)n;
    }
    return 0;
}

/* The frame format (wal/format.py): magic, payload length, CRC-32 of the payload (both
 * little-endian); a payload is a msgpack array of records, 0x91 for one record. */
#define FRAME_HEADER 12
#define ONE_HEAD (FRAME_HEADER + 1)
#define MAX_HEAD (FRAME_HEADER + 5)
#define MAX_PAYLOAD (64u * 1024 * 1024) /* MAX_FRAME_PAYLOAD */
static const unsigned char FRAME_MAGIC[4] = {0xc1, 'W', 'B', 'C'};

static uint32_t get32(const char *at) {
    const unsigned char *b = (const unsigned char *)at;
    return (uint32_t)b[0] | (uint32_t)b[1] << 8 | (uint32_t)b[2] << 16 | (uint32_t)b[3] << 24;
}

static void put32(char *at, uint32_t value) {
    for (int i = 0; i < 4; i++)
        at[i] = (char)(value >> (8 * i));
}

/* The length of the record of the one-record frame at `at` (ending by `end`), or -1 if the
 * bytes there are not such a frame. */
static long long one_record(const char *at, const char *end) {
    if (end - at < ONE_HEAD || memcmp(at, FRAME_MAGIC, 4) != 0 || (unsigned char)at[12] != 0x91)
        return -1;
    uint32_t length = get32(at + 4);
    if (length < 1 || (uint64_t)length > (uint64_t)(end - at - FRAME_HEADER))
        return -1;
    return (long long)length - 1;
}

static int sync_fd(int fd) {
    while (fdatasync(fd) < 0) {
        if (errno != EINTR)
            return errno;
    }
    return 0;
}

/* Write `data` (one-record frames, as `frame_one` makes them) as frames of as many records as
 * fit in MAX_PAYLOAD (module docstring), each but the last fdatasync'd before the next is
 * written; the caller fdatasyncs the last. Rewrites `data` in place: each record moves over
 * the headers before it, the first by up to 4 bytes forward, so that the new header (12
 * bytes, and the array's head of 1, 3 or 5) fits in front of it. */
static int one_frame(int fd, char *data, size_t len) {
    const char *end = data + len;
    for (const char *at = data; at < end;) { /* every frame one of ours, or none is touched */
        long long record = one_record(at, end);
        if (record < 0)
            return write_all(fd, data, len);
        at += ONE_HEAD + record;
    }
    if ((size_t)(ONE_HEAD + one_record(data, end)) == len)
        return write_all(fd, data, len); /* one record: already one frame */
    char *chunk = data;
    while (chunk < end) {
        /* The chunk: frames from `chunk` while their records fit in one payload. */
        uint64_t records = 0, count = 0;
        const char *stop = chunk;
        while (stop < end) {
            long long record = one_record(stop, end);
            if (count > 0 && records + (uint64_t)record + 5 > MAX_PAYLOAD)
                break;
            records += (uint64_t)record;
            count++;
            stop += ONE_HEAD + record;
        }
        int error;
        if (count == 1) { /* a record too big to share a frame: already one */
            if ((error = write_all(fd, chunk, (size_t)(stop - chunk))) != 0)
                return error;
            chunk = (char *)stop;
            if (chunk < end && (error = sync_fd(fd)) != 0)
                return error;
            continue;
        }
        /* Move the records together, each right after the one before it, the first at
         * chunk + MAX_HEAD (two frames or more: the chunk's bytes hold that); a frame's
         * length is read before the record ahead of it moves (the first record, moving
         * forward, covers the next frame's first bytes). */
        char *out = chunk + MAX_HEAD;
        const char *frame = chunk;
        long long record = one_record(frame, end);
        while (frame < stop) {
            const char *next = frame + ONE_HEAD + record;
            long long next_record = next < stop ? one_record(next, end) : 0;
            memmove(out, frame + ONE_HEAD, (size_t)record);
            out += record;
            frame = next;
            record = next_record;
        }
        unsigned char head[5];
        size_t head_len;
        if (count < 16) {
            head[0] = (unsigned char)(0x90 | count);
            head_len = 1;
        } else if (count < 65536) {
            head[0] = 0xdc;
            head[1] = (unsigned char)(count >> 8);
            head[2] = (unsigned char)count;
            head_len = 3;
        } else {
            head[0] = 0xdd;
            for (int i = 0; i < 4; i++)
                head[1 + i] = (unsigned char)(count >> (24 - 8 * i));
            head_len = 5;
        }
        char *start = chunk + MAX_HEAD - head_len - FRAME_HEADER;
        memcpy(start, FRAME_MAGIC, 4);
        memcpy(start + FRAME_HEADER, head, head_len);
        uLong crc = crc32(0L, (const Bytef *)head, (uInt)head_len);
        crc = crc32(crc, (const Bytef *)(chunk + MAX_HEAD), (uInt)records);
        put32(start + 4, (uint32_t)(head_len + records));
        put32(start + 8, (uint32_t)crc);
        if ((error = write_all(fd, start, FRAME_HEADER + head_len + (size_t)records)) != 0)
            return error;
        chunk = (char *)stop;
        if (chunk < end && (error = sync_fd(fd)) != 0)
            return error;
    }
    return 0;
}

/* Write and fdatasync everything handed over, then publish it: called with the mutex held,
 * `busy` clear and records handed over; it lets go of the mutex around the I/O and returns
 * with it held. The pipe's thread runs it, and so does a writer waiting for its record that
 * finds the pipe idle (`wait`): a lone writer then makes its own write and fdatasync, with no
 * hand-over to the thread and back. */
static void lead_batch(Pipe *p) {
    char *data = p->fill;
    size_t len = p->fill_len, cap = p->fill_cap;
    long long through = p->submitted_lsn;
    int fd = p->fd;
    p->fill = p->spare;
    p->fill_cap = p->spare_cap;
    p->fill_len = 0;
    p->spare = NULL;
    p->spare_cap = 0;
    p->busy = 1;
    p->through = through;
    pthread_mutex_unlock(&p->mu);
    int error = one_frame(fd, data, len);
    if (error == 0)
        error = sync_fd(fd);
    pthread_mutex_lock(&p->mu);
    p->busy = 0;
    if (cap <= KEEP_BUFFER && p->spare == NULL) { /* a big batch's buffer goes back */
        p->spare = data;
        p->spare_cap = cap;
    } else {
        free(data);
    }
    if (error) {
        p->error = error;
    } else {
        p->durable_lsn = through;
        p->synced++;
    }
    pthread_cond_broadcast(&p->done[p->batches % 2]);
    p->batches++;
    if (error) { /* every waiter: nothing more will be written */
        pthread_cond_broadcast(&p->done[p->batches % 2]);
    } else if (p->fill_len > 0 && p->idle) {
        /* handed over meanwhile, by writers asleep until the batch after this one: the
         * thread leads it (a writer leading this one does not go on to the next) */
        pthread_cond_signal(&p->work);
    }
    if (p->notify_fd >= 0) {
        uint64_t one = 1;
        (void)!write(p->notify_fd, &one, sizeof one);
    }
}

static void *run(void *arg) {
    Pipe *p = arg;
    pthread_mutex_lock(&p->mu);
    for (;;) {
        while ((p->fill_len == 0 || p->busy) && !p->closing && !p->error) {
            p->idle = 1;
            pthread_cond_wait(&p->work, &p->mu);
            p->idle = 0;
        }
        if (p->error)
            break;
        if (p->busy) { /* closing while a writer leads: let it finish */
            pthread_cond_wait(&p->done[p->batches % 2], &p->mu);
            continue;
        }
        if (p->fill_len == 0)
            break; /* closing, with nothing left */
        lead_batch(p);
    }
    pthread_cond_broadcast(&p->done[0]);
    pthread_cond_broadcast(&p->done[1]);
    pthread_mutex_unlock(&p->mu);
    return NULL;
}

static PyObject *Pipe_new(PyTypeObject *type, PyObject *args, PyObject *kwds) {
    int fd;
    long long durable;
    static char *names[] = {"fd", "durable_lsn", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "iL", names, &fd, &durable))
        return NULL;
    Pipe *p = (Pipe *)type->tp_alloc(type, 0);
    if (p == NULL)
        return NULL;
    p->fd = fd;
    p->submitted_lsn = p->durable_lsn = durable;
    p->pid = getpid();
    pthread_mutex_init(&p->mu, NULL);
    pthread_condattr_t monotonic;
    pthread_condattr_init(&monotonic);
    pthread_condattr_setclock(&monotonic, CLOCK_MONOTONIC); /* a timed wait ignores clock steps */
    pthread_cond_init(&p->work, NULL);
    pthread_cond_init(&p->done[0], &monotonic);
    pthread_cond_init(&p->done[1], &monotonic);
    pthread_condattr_destroy(&monotonic);
    p->initialized = 1;
    p->notify_fd = -1;
    /* The thread starts with every signal blocked (they are the main thread's business),
     * with no moment in which one could be delivered to it. */
    sigset_t all, before;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, &before);
    int error = pthread_create(&p->thread, NULL, run, p);
    pthread_sigmask(SIG_SETMASK, &before, NULL);
    if (error) {
        Py_DECREF(p);
        errno = error;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    p->started = 1;
    return (PyObject *)p;
}

static PyObject *raise_errno(int error) {
    errno = error;
    return PyErr_SetFromErrno(PyExc_OSError);
}

/* submit(data, lsn): hand over framed records ending at `lsn`. Raises OSError once the log
 * has failed, ValueError once closed. */
static PyObject *Pipe_submit(Pipe *p, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "submit(data, lsn) takes 2 arguments");
        return NULL;
    }
    long long lsn = PyLong_AsLongLong(args[1]);
    if (lsn == -1 && PyErr_Occurred())
        return NULL;
    Py_buffer view;
    if (PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) < 0)
        return NULL;
    pthread_mutex_lock(&p->mu);
    int error = p->error;
    int closing = p->closing;
    if (!error && !closing) {
        size_t need = p->fill_len + (size_t)view.len;
        if (need > p->fill_cap) {
            size_t cap = p->fill_cap ? p->fill_cap : 65536;
            while (cap < need)
                cap *= 2;
            char *grown = realloc(p->fill, cap);
            if (grown == NULL) {
                pthread_mutex_unlock(&p->mu);
                PyBuffer_Release(&view);
                return PyErr_NoMemory();
            }
            p->fill = grown;
            p->fill_cap = cap;
        }
        memcpy(p->fill + p->fill_len, view.buf, (size_t)view.len);
        p->fill_len = need;
        p->submitted_lsn = lsn;
    }
    pthread_mutex_unlock(&p->mu);
    PyBuffer_Release(&view);
    if (error)
        return raise_errno(error);
    if (closing) {
        PyErr_SetString(PyExc_ValueError, "submit: the pipe is closed");
        return NULL;
    }
    Py_RETURN_NONE;
}

/* wait(lsn, timeout) -> (durable_lsn, errno, batches): sleep, GIL released, until `lsn` is
 * durable, the log has failed, or `timeout` seconds have passed. */
static PyObject *Pipe_wait(Pipe *p, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "wait(lsn, timeout) takes 2 arguments");
        return NULL;
    }
    long long lsn = PyLong_AsLongLong(args[0]);
    if (lsn == -1 && PyErr_Occurred())
        return NULL;
    double timeout = PyFloat_AsDouble(args[1]);
    if (timeout == -1.0 && PyErr_Occurred())
        return NULL;
    if (!(timeout >= 0.0 && timeout <= 86400.0)) { /* NaN fails both */
        PyErr_SetString(PyExc_ValueError, "wait: timeout must be between 0 and 86400 seconds");
        return NULL;
    }
    long long durable, batches;
    int error;
    Py_BEGIN_ALLOW_THREADS
    struct timespec until;
    clock_gettime(CLOCK_MONOTONIC, &until);
    long long ns = until.tv_nsec + (long long)(timeout * 1e9);
    until.tv_sec += ns / 1000000000LL;
    until.tv_nsec = ns % 1000000000LL;
    pthread_mutex_lock(&p->mu);
    while (p->durable_lsn < lsn && !p->error && !(p->closing && p->joined)) {
        if (!p->busy && p->fill_len > 0 && !p->closing) {
            lead_batch(p); /* the pipe is idle: write it ourselves */
            continue;
        }
        /* the batch in flight covers `lsn`, or else the next one does */
        long long batch = p->busy && lsn <= p->through ? p->batches : p->batches + p->busy;
        if (pthread_cond_timedwait(&p->done[batch % 2], &p->mu, &until) != 0)
            break; /* timed out (or an error no retry would cure) */
    }
    durable = p->durable_lsn;
    error = p->error;
    batches = p->synced;
    pthread_mutex_unlock(&p->mu);
    Py_END_ALLOW_THREADS
    return Py_BuildValue("LiL", durable, error, batches);
}

/* poll() -> (durable_lsn, errno, batches): clear the eventfd (if any) and say how far the log
 * is, at once. The GIL is kept: an event loop calls this after each batch, and letting go of
 * the GIL there would hand it to any thread waiting for it (the flusher) for up to the switch
 * interval. */
static PyObject *Pipe_poll(Pipe *p, PyObject *Py_UNUSED(ignored)) {
    pthread_mutex_lock(&p->mu);
    if (p->notify_fd >= 0) {
        uint64_t count;
        (void)!read(p->notify_fd, &count, sizeof count); /* EAGAIN when already cleared */
    }
    long long durable = p->durable_lsn, synced = p->synced;
    int error = p->error;
    pthread_mutex_unlock(&p->mu);
    return Py_BuildValue("LiL", durable, error, synced);
}

/* set_fd(fd): write to `fd` from now on (a new segment). Only with nothing in flight. */
static int as_fd(PyObject *arg, int *fd) {
    long value = PyLong_AsLong(arg);
    if (value == -1 && PyErr_Occurred())
        return -1;
    if (value < -1 || value > INT_MAX) {
        PyErr_SetString(PyExc_ValueError, "not a file descriptor");
        return -1;
    }
    *fd = (int)value;
    return 0;
}

static PyObject *Pipe_set_fd(Pipe *p, PyObject *arg) {
    int fd;
    if (as_fd(arg, &fd) < 0)
        return NULL;
    pthread_mutex_lock(&p->mu);
    int busy = p->busy || p->fill_len > 0;
    if (!busy)
        p->fd = fd;
    pthread_mutex_unlock(&p->mu);
    if (busy) {
        PyErr_SetString(PyExc_RuntimeError, "set_fd: records are in flight");
        return NULL;
    }
    Py_RETURN_NONE;
}

/* in_flight() -> the last LSN of the batch being written, or 0 (for tests: a waiter that
 * must sleep until a batch someone else leads ends). */
static PyObject *Pipe_in_flight(Pipe *p, PyObject *Py_UNUSED(ignored)) {
    pthread_mutex_lock(&p->mu);
    long long through = p->busy ? p->through : 0;
    pthread_mutex_unlock(&p->mu);
    return PyLong_FromLongLong(through);
}

/* kick(): have the thread write what was handed over (for writers that do not wait). */
static PyObject *Pipe_kick(Pipe *p, PyObject *Py_UNUSED(ignored)) {
    pthread_mutex_lock(&p->mu);
    if (p->idle && p->fill_len > 0)
        pthread_cond_signal(&p->work);
    pthread_mutex_unlock(&p->mu);
    Py_RETURN_NONE;
}

/* set_notify(fd): write 1 to the eventfd `fd` after every batch (-1: stop). */
static PyObject *Pipe_set_notify(Pipe *p, PyObject *arg) {
    int fd;
    if (as_fd(arg, &fd) < 0)
        return NULL;
    pthread_mutex_lock(&p->mu);
    p->notify_fd = fd;
    pthread_mutex_unlock(&p->mu);
    Py_RETURN_NONE;
}

/* Callers are serialised (the sequencer's lock, or the last reference going away). */
static void stop(Pipe *p) {
    if (!p->started || p->pid != getpid())
        return;
    pthread_mutex_lock(&p->mu);
    int joined = p->joined;
    p->closing = 1;
    pthread_cond_signal(&p->work);
    pthread_mutex_unlock(&p->mu);
    if (joined)
        return;
    pthread_join(p->thread, NULL);
    pthread_mutex_lock(&p->mu);
    p->joined = 1;
    pthread_cond_broadcast(&p->done[0]);
    pthread_cond_broadcast(&p->done[1]);
    pthread_mutex_unlock(&p->mu);
}

/* close(): write what is handed over, then stop the thread (GIL released meanwhile). */
static PyObject *Pipe_close(Pipe *p, PyObject *Py_UNUSED(ignored)) {
    Py_BEGIN_ALLOW_THREADS
    stop(p);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static void Pipe_dealloc(Pipe *p) {
    if (p->pid == getpid()) {
        Py_BEGIN_ALLOW_THREADS
        stop(p);
        Py_END_ALLOW_THREADS
        if (p->initialized) {
            pthread_mutex_destroy(&p->mu);
            pthread_cond_destroy(&p->work);
            pthread_cond_destroy(&p->done[0]);
            pthread_cond_destroy(&p->done[1]);
        }
    } /* in a forked child: the thread is not there and the mutex may be held; leave both */
    free(p->fill);
    free(p->spare);
    Py_TYPE(p)->tp_free((PyObject *)p);
}

static PyMethodDef Pipe_methods[] = {
    {"submit", (PyCFunction)(void (*)(void))Pipe_submit, METH_FASTCALL,
     "submit(data, lsn): hand over framed records ending at record lsn"},
    {"wait", (PyCFunction)(void (*)(void))Pipe_wait, METH_FASTCALL,
     "wait(lsn, timeout) -> (durable_lsn, errno, batches)"},
    {"set_fd", (PyCFunction)Pipe_set_fd, METH_O, "set_fd(fd): a new segment"},
    {"set_notify", (PyCFunction)Pipe_set_notify, METH_O, "set_notify(eventfd or -1)"},
    {"in_flight", (PyCFunction)Pipe_in_flight, METH_NOARGS,
     "in_flight() -> the last LSN of the batch being written, or 0"},
    {"kick", (PyCFunction)Pipe_kick, METH_NOARGS,
     "kick(): the thread writes what was handed over (nobody waits to)"},
    {"poll", (PyCFunction)Pipe_poll, METH_NOARGS,
     "poll() -> (durable_lsn, errno, batches): clear the eventfd, GIL kept"},
    {"close", (PyCFunction)Pipe_close, METH_NOARGS, "close(): drain, then stop the thread"},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject PipeType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "wbcache.wal._pipe.Pipe",
    .tp_basicsize = sizeof(Pipe),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = Pipe_new,
    .tp_dealloc = (destructor)Pipe_dealloc,
    .tp_methods = Pipe_methods,
    .tp_doc = "Pipe(fd, durable_lsn): the log's writes and fdatasyncs in a thread of their "
              "own (wal/_pipe.c).",
};

static struct PyModuleDef pipe_module = {
    PyModuleDef_HEAD_INIT, "_pipe", "The group commit without the GIL (wal/_pipe.c).", -1,
    NULL, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__pipe(void) {
    if (PyType_Ready(&PipeType) < 0)
        return NULL;
    PyObject *module = PyModule_Create(&pipe_module);
    if (module == NULL)
        return NULL;
    Py_INCREF(&PipeType);
    if (PyModule_AddObject(module, "Pipe", (PyObject *)&PipeType) < 0) {
        Py_DECREF(&PipeType);
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
