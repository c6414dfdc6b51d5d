/*
 * sevemu.hw.uc._uc_accel: the optional C helper of the Unicorn engine's exit path
 * (src/sevemu/hw/uc/engine.py, src/sevemu/hw/uc/accel.py).
 *
 *   Runner(handle, emu_start, reg_read_batch, ids, vals)
 *       handle          the uc_engine pointer (an int)
 *       emu_start       the address of libunicorn's uc_emu_start (from the ctypes handle)
 *       reg_read_batch  the address of uc_reg_read_batch
 *       ids             Unicorn register ids (at most 64)
 *       vals            a writable buffer of len(ids) uint64 (the engine's array('Q')): where each
 *                       stop's register batch goes
 *   Runner.run(rip) -> err
 *       one time slice of the guest: `started` = the monotonic clock (the watchdog's time base:
 *       Python's time.monotonic()), uc_emu_start(handle, rip, 0, 0, 0) with the GIL released (the
 *       watchdog thread and the hooks' Python callbacks need it), `started` = 0, then the register
 *       batch into vals.  Returns uc_emu_start's error, or -1 when the batch read failed.
 *   Runner.started  the monotonic time the current run began (0.0 when none runs)
 *
 * It decides nothing: it does what the ctypes path beside it (accel.PyRunner) does, in one call
 * instead of two foreign calls and their argument conversions.  libunicorn is not linked: the
 * function pointers come from the ctypes handle the engine already loaded.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

#include "pyargs.h"

#include <stdint.h>
#include <time.h>

#define MAX_REGS 64

typedef int (*emu_start_fn)(void *uc, uint64_t begin, uint64_t until, uint64_t timeout, size_t count);
typedef int (*reg_read_batch_fn)(void *uc, int *regs, void **vals, int count);

typedef struct {
    PyObject_HEAD
    void *uc;
    emu_start_fn start;
    reg_read_batch_fn batch;
    int n;
    int ids[MAX_REGS];
    void *ptrs[MAX_REGS];
    Py_buffer view;
    int have_view;
    double started;
} Runner;

static double monotonic_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static int runner_init(Runner *self, PyObject *args, PyObject *kwds)
{
    PyObject *handle, *start, *batch, *ids, *vals, *seq = NULL;
    uint64_t h, fs, fb;
    static char *kwlist[] = {"handle", "emu_start", "reg_read_batch", "ids", "vals", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOOOO:Runner", kwlist, &handle, &start, &batch, &ids, &vals)) {
        return -1;
    }
    if (get_u64(handle, "handle", &h) < 0 || get_u64(start, "emu_start", &fs) < 0 ||
        get_u64(batch, "reg_read_batch", &fb) < 0) {
        return -1;
    }
    if (!h || !fs || !fb) {
        PyErr_SetString(PyExc_ValueError, "Runner needs a Unicorn handle and both function addresses");
        return -1;
    }
    seq = PySequence_Fast(ids, "ids must be a sequence of register ids");
    if (seq == NULL) {
        return -1;
    }
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    if (n <= 0 || n > MAX_REGS) {
        PyErr_Format(PyExc_ValueError, "ids must name 1..%d registers, got %zd", MAX_REGS, n);
        Py_DECREF(seq);
        return -1;
    }
    int tmp[MAX_REGS];
    for (Py_ssize_t i = 0; i < n; i++) {
        long v = PyLong_AsLong(PySequence_Fast_GET_ITEM(seq, i));
        if (v == -1 && PyErr_Occurred()) {
            Py_DECREF(seq);
            return -1;
        }
        tmp[i] = (int)v;
    }
    Py_DECREF(seq);
    Py_buffer view;
    if (PyObject_GetBuffer(vals, &view, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0) {
        return -1;
    }
    if (view.len != n * (Py_ssize_t)sizeof(uint64_t)) {
        PyErr_Format(PyExc_ValueError, "vals must hold %zd uint64 values (%zd bytes), got %zd bytes", n,
                     n * (Py_ssize_t)sizeof(uint64_t), view.len);
        PyBuffer_Release(&view);
        return -1;
    }
    if (self->have_view) {
        PyBuffer_Release(&self->view);
    }
    self->view = view;
    self->have_view = 1;
    self->uc = (void *)(uintptr_t)h;
    self->start = (emu_start_fn)(uintptr_t)fs;
    self->batch = (reg_read_batch_fn)(uintptr_t)fb;
    self->n = (int)n;
    for (Py_ssize_t i = 0; i < n; i++) {
        self->ids[i] = tmp[i];
        self->ptrs[i] = (char *)view.buf + i * sizeof(uint64_t);
    }
    self->started = 0.0;
    return 0;
}

static void runner_dealloc(Runner *self)
{
    if (self->have_view) {
        PyBuffer_Release(&self->view);
        self->have_view = 0;
    }
    Py_TYPE(self)->tp_free((PyObject *)self);
}

PyDoc_STRVAR(runner_run_doc, "run(rip) -> err: uc_emu_start from rip (GIL released), then the register batch "
                             "into vals; -1 when the batch read failed.");

static PyObject *runner_run(Runner *self, PyObject *arg)
{
    uint64_t rip;
    int err;
    if (!self->have_view) {
        PyErr_SetString(PyExc_RuntimeError, "Runner was not initialised");
        return NULL;
    }
    if (get_u64(arg, "rip", &rip) < 0) {
        return NULL;
    }
    void *uc = self->uc;
    emu_start_fn start = self->start;
    self->started = monotonic_now();
    Py_BEGIN_ALLOW_THREADS
    err = start(uc, rip, 0, 0, 0);
    Py_END_ALLOW_THREADS
    self->started = 0.0;
    if (self->batch(uc, self->ids, self->ptrs, self->n) != 0) {
        err = -1;
    }
    return PyLong_FromLong(err);
}

static PyObject *runner_get_started(Runner *self, void *closure)
{
    (void)closure;
    return PyFloat_FromDouble(self->started);
}

static PyMethodDef runner_methods[] = {
    {"run", (PyCFunction)runner_run, METH_O, runner_run_doc},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef runner_getset[] = {
    {"started", (getter)runner_get_started, NULL, "monotonic time the current run began (0.0: none runs)", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

PyDoc_STRVAR(runner_doc, "Runner(handle, emu_start, reg_read_batch, ids, vals): one call per time slice of the "
                         "Unicorn engine (uc_emu_start, then the register batch).");

static PyTypeObject RunnerType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "sevemu.hw.uc._uc_accel.Runner",
    .tp_basicsize = sizeof(Runner),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = runner_doc,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)runner_init,
    .tp_dealloc = (destructor)runner_dealloc,
    .tp_methods = runner_methods,
    .tp_getset = runner_getset,
};

static int module_exec(PyObject *m)
{
    if (PyType_Ready(&RunnerType) < 0) {
        return -1;
    }
    Py_INCREF(&RunnerType);
    if (PyModule_AddObject(m, "Runner", (PyObject *)&RunnerType) < 0) {
        Py_DECREF(&RunnerType);
        return -1;
    }
    return 0;
}

static PyModuleDef_Slot slots[] = {
    {Py_mod_exec, module_exec},
#ifdef Py_mod_multiple_interpreters
    {Py_mod_multiple_interpreters, Py_MOD_MULTIPLE_INTERPRETERS_NOT_SUPPORTED}, /* a static type (Runner) */
#endif
#ifdef Py_GIL_DISABLED
    {Py_mod_gil, Py_MOD_GIL_USED},
#endif
    {0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    "sevemu.hw.uc._uc_accel",
    "Optional C helper of the Unicorn engine's exit path (csrc/uc_accel.c).",
    0,
    NULL,
    slots,
    NULL,
    NULL,
    NULL,
};

PyMODINIT_FUNC PyInit__uc_accel(void)
{
    return PyModuleDef_Init(&module);
}
