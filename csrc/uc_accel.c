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
 *   Runner.enter(state) -> writes, or -1
 *       VMRUN's register load: each GPR of the dict state.regs (keys: the names given, in the order
 *       of the first len(names) ids) whose value (mod 2**64) differs from what Unicorn was last
 *       given or last stopped with is written into Unicorn (uc_reg_write); all of them after
 *       forget().  Returns how many were written, or -1 when state.rflags, .cr0, .cr3, .cr4, .efer
 *       are not the control registers last exchanged (ctl()): the engine then loads those itself
 *       (RFLAGS' fixed bit, EFER through its MSR) and tells set_ctl().  Raises KeyError / TypeError
 *       for a missing or non-int GPR (nothing written), RuntimeError when Unicorn refuses a write.
 *   Runner.leave(state, efer)
 *       #VMEXIT's register store from the last batch: state.regs[name] = the GPR for each name
 *       whose entry is not already that int; state.rip, .rflags, .cr0, .cr3, .cr4 = the batch's
 *       values after the GPRs (RIP, RFLAGS, CR0, CR3, CR4); state.efer = efer | LMA when
 *       efer.LME and CR0.PG (efer: the engine's copy of the guest's EFER, LMA clear); an attribute
 *       that already holds an int of that value is left alone.  enter and leave read a dict that
 *       holds exactly the GPR names (the same str objects) in their order in one walk of its
 *       entries, any other by name.
 *   Runner.ctl() -> (rflags, cr0, cr3, cr4, efer) last exchanged, or () after forget()
 *   Runner.set_ctl(values)  the engine loaded these control registers (values that are not
 *       5 ints in 0..2**64-1 make the next enter() answer -1 again)
 *   Runner.forget()  the next enter() writes every GPR and answers -1
 *   Runner.bind_io(offsets, exits, xgva, pool_address, pool_size)
 *       the engine's port-I/O tables (src/sevemu/hw/uc/ports.py IoHooks.offsets / .exits / .xgva:
 *       dicts the engine mutates but never rebinds) and its page pool's memory
 *   Runner.run_known(engine, rip) -> err or exit
 *       run(rip), then -- when Unicorn stopped without an error and the engine's hooks saw nothing
 *       (engine._event and engine._internal None, engine._tb_flush_pending false) -- the engine's
 *       known-port-I/O test: RIP on a hooked offset of its page, a decoded exit remembered for
 *       that RIP with the same long mode and DX (or an immediate port), and the same 16 instruction
 *       bytes in the slot the page executes from.  Returns that exit (the object remembered), else
 *       the int run() returned (the engine then decides as without this helper: nothing was
 *       changed).
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
#include <string.h>
#include <time.h>

#define MAX_REGS 64

typedef int (*emu_start_fn)(void *uc, uint64_t begin, uint64_t until, uint64_t timeout, size_t count);
typedef int (*reg_read_batch_fn)(void *uc, int *regs, void **vals, int count);
typedef int (*reg_write_fn)(void *uc, int regid, const void *value);

static PyObject *s_regs, *s_rip, *s_rflags, *s_cr0, *s_cr3, *s_cr4, *s_efer, *s_event, *s_internal, *s_tb_flush_pending;
#define EFER_LME (1ULL << 8)
#define EFER_LMA (1ULL << 10)
#define CR0_PG (1ULL << 31)
#define N_CTL 5 /* RIP, RFLAGS, CR0, CR3, CR4 after the GPRs */

typedef struct {
    PyObject_HEAD
    void *uc;
    emu_start_fn start;
    reg_read_batch_fn batch;
    reg_write_fn write;
    PyObject *names; /* tuple of str: the GPRs, in the order of ids */
    Py_ssize_t ngpr;
    Py_ssize_t i_rdx;
    PyObject *io_offsets, *io_exits, *xgva; /* bind_io(): dicts */
    const unsigned char *pool;
    uint64_t pool_size;
    uint64_t shadow[MAX_REGS];
    int shadow_valid;
    uint64_t ctl[N_CTL]; /* RFLAGS, CR0, CR3, CR4, EFER as last exchanged */
    int ctl_valid;
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
    PyObject *handle, *start, *batch, *write, *ids, *vals, *names, *seq = NULL;
    uint64_t h, fs, fb, fw;
    static char *kwlist[] = {"handle", "emu_start", "reg_read_batch", "reg_write", "ids", "vals", "names", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOOOOOO!:Runner", kwlist, &handle, &start, &batch, &write, &ids,
                                     &vals, &PyTuple_Type, &names)) {
        return -1;
    }
    if (get_u64(handle, "handle", &h) < 0 || get_u64(start, "emu_start", &fs) < 0 ||
        get_u64(batch, "reg_read_batch", &fb) < 0 || get_u64(write, "reg_write", &fw) < 0) {
        return -1;
    }
    if (!h || !fs || !fb || !fw) {
        PyErr_SetString(PyExc_ValueError, "Runner needs a Unicorn handle and the three function addresses");
        return -1;
    }
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(names); i++) {
        if (!PyUnicode_CheckExact(PyTuple_GET_ITEM(names, i))) {
            PyErr_SetString(PyExc_TypeError, "names must be a tuple of str");
            return -1;
        }
    }
    seq = PySequence_Fast(ids, "ids must be a sequence of register ids");
    if (seq == NULL) {
        return -1;
    }
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    if (n > MAX_REGS || n != PyTuple_GET_SIZE(names) + N_CTL) {
        PyErr_Format(PyExc_ValueError, "ids must name the %zd GPRs of names, then RIP, RFLAGS, CR0, CR3, CR4 "
                     "(at most %d), got %zd", PyTuple_GET_SIZE(names), MAX_REGS, n);
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
    self->write = (reg_write_fn)(uintptr_t)fw;
    Py_INCREF(names);
    Py_XSETREF(self->names, names);
    self->ngpr = PyTuple_GET_SIZE(names);
    self->i_rdx = -1;
    for (Py_ssize_t i = 0; i < self->ngpr; i++) {
        if (PyUnicode_CompareWithASCIIString(PyTuple_GET_ITEM(names, i), "rdx") == 0) {
            self->i_rdx = i;
        }
    }
    self->shadow_valid = 0;
    self->ctl_valid = 0;
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
    Py_CLEAR(self->names);
    Py_CLEAR(self->io_offsets);
    Py_CLEAR(self->io_exits);
    Py_CLEAR(self->xgva);
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

PyDoc_STRVAR(runner_enter_doc, "enter(state) -> writes or -1: the GPRs of state.regs that differ from Unicorn's last "
                               "known values written into Unicorn (all after forget()); -1 when the control registers "
                               "are not the ones last exchanged.");

/* The uint64 value of an exact int in 0..2**64-1 into *out: 0, or -1 (no error set) for anything else. */
static int exact_u64(PyObject *v, uint64_t *out)
{
    if (v == NULL || !PyLong_CheckExact(v)) {
        return -1;
    }
    unsigned long long x = PyLong_AsUnsignedLongLong(v);
    if (x == (unsigned long long)-1 && PyErr_Occurred()) {
        PyErr_Clear();
        return -1;
    }
    *out = (uint64_t)x;
    return 0;
}

static PyObject *ctl_names[N_CTL]; /* rflags, cr0, cr3, cr4, efer (module_exec) */

/* Whether state's RFLAGS, CR0, CR3, CR4, EFER are the ones last exchanged: 1, 0, or -1 on error. */
static int ctl_same(Runner *self, PyObject *state)
{
    if (!self->ctl_valid) {
        return 0;
    }
    for (int i = 0; i < N_CTL; i++) {
        uint64_t x;
        PyObject *v = PyObject_GetAttr(state, ctl_names[i]);
        if (v == NULL) {
            return -1;
        }
        int ok = exact_u64(v, &x) == 0 && x == self->ctl[i];
        Py_DECREF(v);
        if (!ok) {
            return 0;
        }
    }
    return 1;
}

/* The values of the dict regs for the GPR names, into vals (borrowed), when regs holds exactly those
 * keys -- the same str objects -- in that order (a save state's usual dict): read in one walk of
 * its entries.  1, or 0 when the caller must look each name up. */
static int regs_in_order(Runner *self, PyObject *regs, PyObject **vals)
{
    Py_ssize_t pos = 0, i = 0;
    PyObject *k, *v;
    if (!PyDict_CheckExact(regs) || PyDict_GET_SIZE(regs) != self->ngpr) {
        return 0;
    }
    while (PyDict_Next(regs, &pos, &k, &v)) {
        if (i >= self->ngpr || k != PyTuple_GET_ITEM(self->names, i)) {
            return 0;
        }
        vals[i++] = v;
    }
    return i == self->ngpr;
}

/* The GPR load of enter(): writes, or -1 with an error set. */
static long enter_gprs(Runner *self, PyObject *regs)
{
    uint64_t now[MAX_REGS];
    PyObject *got[MAX_REGS];
    Py_ssize_t i, ngpr = self->ngpr;
    long writes = 0;
    if (!PyDict_Check(regs)) {
        PyErr_SetString(PyExc_TypeError, "state.regs must be a dict");
        return -1;
    }
    int in_order = regs_in_order(self, regs, got);
    for (i = 0; i < ngpr; i++) { /* every value first: nothing is written when one is bad */
        PyObject *name = PyTuple_GET_ITEM(self->names, i);
        PyObject *v = in_order ? got[i] : PyDict_GetItemWithError(regs, name);
        if (v == NULL) {
            if (!PyErr_Occurred()) {
                PyErr_SetObject(PyExc_KeyError, name);
            }
            return -1;
        }
        if (!PyLong_Check(v)) {
            PyErr_Format(PyExc_TypeError, "register %U must be an int", name);
            return -1;
        }
        now[i] = (uint64_t)PyLong_AsUnsignedLongLongMask(v);
        if (now[i] == (uint64_t)-1 && PyErr_Occurred()) {
            return -1;
        }
    }
    for (i = 0; i < ngpr; i++) {
        if (self->shadow_valid && now[i] == self->shadow[i]) {
            continue;
        }
        if (self->write(self->uc, self->ids[i], &now[i]) != 0) {
            self->shadow_valid = 0;
            PyErr_Format(PyExc_RuntimeError, "Unicorn register write failed (register %U)",
                         PyTuple_GET_ITEM(self->names, i));
            return -1;
        }
        self->shadow[i] = now[i];
        writes++;
    }
    self->shadow_valid = 1;
    return writes;
}

static PyObject *runner_enter(Runner *self, PyObject *state)
{
    if (!self->have_view) {
        PyErr_SetString(PyExc_RuntimeError, "Runner was not initialised");
        return NULL;
    }
    PyObject *regs = PyObject_GetAttr(state, s_regs);
    if (regs == NULL) {
        return NULL;
    }
    long writes = enter_gprs(self, regs);
    Py_DECREF(regs);
    if (writes < 0) {
        return NULL;
    }
    int same = ctl_same(self, state);
    if (same < 0) {
        return NULL;
    }
    return PyLong_FromLong(same ? writes : -1);
}

static PyObject *runner_ctl(Runner *self, PyObject *unused)
{
    (void)unused;
    if (!self->ctl_valid) {
        return PyTuple_New(0);
    }
    return Py_BuildValue("(KKKKK)", (unsigned long long)self->ctl[0], (unsigned long long)self->ctl[1],
                         (unsigned long long)self->ctl[2], (unsigned long long)self->ctl[3],
                         (unsigned long long)self->ctl[4]);
}

static PyObject *runner_set_ctl(Runner *self, PyObject *values)
{
    uint64_t v[N_CTL];
    self->ctl_valid = 0;
    if (!PyTuple_Check(values)) {
        PyErr_SetString(PyExc_TypeError, "set_ctl() takes a tuple");
        return NULL;
    }
    if (PyTuple_GET_SIZE(values) != N_CTL) {
        Py_RETURN_NONE;
    }
    for (int i = 0; i < N_CTL; i++) {
        if (exact_u64(PyTuple_GET_ITEM(values, i), &v[i]) < 0) {
            Py_RETURN_NONE; /* not representable: the next enter() asks the engine again */
        }
    }
    memcpy(self->ctl, v, sizeof v);
    self->ctl_valid = 1;
    Py_RETURN_NONE;
}

/* state.<name> = x, unless it already is an exact int of that value (no new int, no store: the
 * control registers and EFER rarely change between exits); 0, or -1 with an error set. */
static int set_u64_attr(PyObject *state, PyObject *name, uint64_t x)
{
    uint64_t have;
    PyObject *old = PyObject_GetAttr(state, name);
    if (old == NULL) {
        PyErr_Clear(); /* (not there yet: stored below) */
    } else {
        int same = exact_u64(old, &have) == 0 && have == x;
        Py_DECREF(old);
        if (same) {
            return 0;
        }
    }
    PyObject *v = PyLong_FromUnsignedLongLong(x);
    if (v == NULL || PyObject_SetAttr(state, name, v) < 0) {
        Py_XDECREF(v);
        return -1;
    }
    Py_DECREF(v);
    return 0;
}

PyDoc_STRVAR(runner_leave_doc, "leave(state, efer): state.regs, state.rip/rflags/cr0/cr3/cr4 from the last register "
                               "batch, state.efer from efer (LMA when LME and CR0.PG).");

static PyObject *runner_leave(Runner *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_ssize_t i, ngpr = self->ngpr;
    const uint64_t *vals;
    uint64_t efer;
    PyObject *state, *regs, *attrs[N_CTL] = {s_rip, s_rflags, s_cr0, s_cr3, s_cr4};
    if (nargs != 2) {
        PyErr_Format(PyExc_TypeError, "leave() takes 2 arguments (%zd given)", nargs);
        return NULL;
    }
    state = args[0];
    if (get_u64(args[1], "efer", &efer) < 0) {
        return NULL;
    }
    if (!self->have_view) {
        PyErr_SetString(PyExc_RuntimeError, "Runner was not initialised");
        return NULL;
    }
    self->ctl_valid = 0;
    vals = (const uint64_t *)self->view.buf;
    regs = PyObject_GetAttr(state, s_regs);
    if (regs == NULL) {
        return NULL;
    }
    if (!PyDict_Check(regs)) {
        Py_DECREF(regs);
        PyErr_SetString(PyExc_TypeError, "state.regs must be a dict");
        return NULL;
    }
    PyObject *got[MAX_REGS];
    int in_order = regs_in_order(self, regs, got); /* (a store below replaces a value: got[i] is not read after) */
    for (i = 0; i < ngpr; i++) {
        PyObject *name = PyTuple_GET_ITEM(self->names, i);
        PyObject *old = in_order ? got[i] : PyDict_GetItemWithError(regs, name);
        self->shadow[i] = vals[i];
        if (old != NULL && PyLong_CheckExact(old)) {
            int overflow = 0;
            unsigned long long have = PyLong_AsUnsignedLongLong(old);
            if (have == (unsigned long long)-1 && PyErr_Occurred()) {
                PyErr_Clear();
                overflow = 1;
            }
            if (!overflow && have == vals[i]) {
                continue; /* already that int */
            }
        } else if (old == NULL && PyErr_Occurred()) {
            Py_DECREF(regs);
            self->shadow_valid = 0;
            return NULL;
        }
        PyObject *v = PyLong_FromUnsignedLongLong(vals[i]);
        if (v == NULL || PyDict_SetItem(regs, name, v) < 0) {
            Py_XDECREF(v);
            Py_DECREF(regs);
            self->shadow_valid = 0;
            return NULL;
        }
        Py_DECREF(v);
    }
    Py_DECREF(regs);
    self->shadow_valid = 1;
    for (i = 0; i < N_CTL; i++) {
        if (set_u64_attr(state, attrs[i], vals[ngpr + i]) < 0) {
            return NULL;
        }
    }
    uint64_t cr0 = vals[ngpr + 2];
    if ((efer & EFER_LME) && (cr0 & CR0_PG)) {
        efer |= EFER_LMA;
    }
    if (set_u64_attr(state, s_efer, efer) < 0) {
        return NULL;
    }
    self->ctl[0] = vals[ngpr + 1]; /* RFLAGS, CR0, CR3, CR4 as stored, and EFER */
    self->ctl[1] = cr0;
    self->ctl[2] = vals[ngpr + 3];
    self->ctl[3] = vals[ngpr + 4];
    self->ctl[4] = efer;
    self->ctl_valid = 1;
    Py_RETURN_NONE;
}

static PyObject *runner_forget(Runner *self, PyObject *unused)
{
    (void)unused;
    self->shadow_valid = 0;
    self->ctl_valid = 0;
    Py_RETURN_NONE;
}

PyDoc_STRVAR(runner_bind_io_doc, "bind_io(offsets, exits, xgva, pool_address, pool_size): the engine's port-I/O "
                                 "tables and page pool, for run_known().");

static PyObject *runner_bind_io(Runner *self, PyObject *const *args, Py_ssize_t nargs)
{
    uint64_t address, size;
    if (nargs != 5) {
        PyErr_Format(PyExc_TypeError, "bind_io() takes 5 arguments (%zd given)", nargs);
        return NULL;
    }
    if (!PyDict_CheckExact(args[0]) || !PyDict_CheckExact(args[1]) || !PyDict_CheckExact(args[2])) {
        PyErr_SetString(PyExc_TypeError, "bind_io(): offsets, exits and xgva must be dicts");
        return NULL;
    }
    if (get_u64(args[3], "pool_address", &address) < 0 || get_u64(args[4], "pool_size", &size) < 0) {
        return NULL;
    }
    if (!address || size % 4096) {
        PyErr_SetString(PyExc_ValueError, "bind_io(): the pool must be a mapped whole number of pages");
        return NULL;
    }
    Py_INCREF(args[0]);
    Py_XSETREF(self->io_offsets, args[0]);
    Py_INCREF(args[1]);
    Py_XSETREF(self->io_exits, args[1]);
    Py_INCREF(args[2]);
    Py_XSETREF(self->xgva, args[2]);
    self->pool = (const unsigned char *)(uintptr_t)address;
    self->pool_size = size;
    Py_RETURN_NONE;
}

/* dict[int(key)] (borrowed; NULL when absent or on error -- the error is then cleared: the caller
 * only falls back to the engine's own test). */
static PyObject *get_by_u64(PyObject *dict, uint64_t key)
{
    PyObject *k = PyLong_FromUnsignedLongLong(key);
    if (k == NULL) {
        PyErr_Clear();
        return NULL;
    }
    PyObject *v = PyDict_GetItemWithError(dict, k);
    Py_DECREF(k);
    if (v == NULL) {
        PyErr_Clear();
    }
    return v;
}

/* 1 when engine.<name> is None, 0 when not (or on error, cleared). */
static int attr_is_none(PyObject *engine, PyObject *name)
{
    PyObject *v = PyObject_GetAttr(engine, name);
    if (v == NULL) {
        PyErr_Clear();
        return 0;
    }
    int none = v == Py_None;
    Py_DECREF(v);
    return none;
}

/* The remembered exit of a known port-I/O stop at the batch's RIP (new reference), or NULL (no
 * error set): see run_known. */
static PyObject *known_io(Runner *self, PyObject *engine)
{
    const uint64_t *vals = (const uint64_t *)self->view.buf;
    uint64_t rip = vals[self->ngpr], page = rip & ~(uint64_t)0xFFF, off = rip & 0xFFF;
    if (self->io_offsets == NULL || self->i_rdx < 0) {
        return NULL;
    }
    if (!attr_is_none(engine, s_event) || !attr_is_none(engine, s_internal)) {
        return NULL;
    }
    PyObject *pending = PyObject_GetAttr(engine, s_tb_flush_pending);
    if (pending == NULL) {
        PyErr_Clear();
        return NULL;
    }
    int flush = PyObject_IsTrue(pending);
    Py_DECREF(pending);
    if (flush != 0) {
        if (flush < 0) {
            PyErr_Clear();
        }
        return NULL;
    }
    PyObject *offs = get_by_u64(self->io_offsets, page);
    if (offs == NULL || !PyAnySet_Check(offs)) {
        return NULL;
    }
    PyObject *o = PyLong_FromUnsignedLongLong(off);
    if (o == NULL) {
        PyErr_Clear();
        return NULL;
    }
    int hooked = PySet_Contains(offs, o);
    Py_DECREF(o);
    if (hooked != 1) {
        if (hooked < 0) {
            PyErr_Clear();
        }
        return NULL;
    }
    PyObject *hit = get_by_u64(self->io_exits, rip);
    if (hit == NULL || !PyTuple_CheckExact(hit) || PyTuple_GET_SIZE(hit) != 4) {
        return NULL;
    }
    PyObject *code = PyTuple_GET_ITEM(hit, 0), *lm = PyTuple_GET_ITEM(hit, 1), *dx = PyTuple_GET_ITEM(hit, 2);
    if (!PyBytes_CheckExact(code) || PyBytes_GET_SIZE(code) != 16 || !PyBool_Check(lm) || !PyLong_CheckExact(dx)) {
        return NULL;
    }
    int long_mode = (vals[self->ngpr + 2] >> 31) & 1; /* CR0.PG */
    if ((lm == Py_True) != long_mode) {
        return NULL;
    }
    int overflow = 0;
    long long want = PyLong_AsLongLongAndOverflow(dx, &overflow);
    if (overflow || (want == -1 && PyErr_Occurred())) {
        PyErr_Clear();
        return NULL;
    }
    if (want != -1 && (uint64_t)want != (vals[self->i_rdx] & 0xFFFF)) {
        return NULL;
    }
    PyObject *slot_obj = get_by_u64(self->xgva, page);
    if (slot_obj == NULL || !PyLong_CheckExact(slot_obj) || off > 4096 - 16) {
        return NULL;
    }
    unsigned long long slot = PyLong_AsUnsignedLongLong(slot_obj);
    if (slot == (unsigned long long)-1 && PyErr_Occurred()) {
        PyErr_Clear();
        return NULL;
    }
    if (slot >= self->pool_size / 4096) {
        return NULL;
    }
    if (memcmp(self->pool + slot * 4096 + off, PyBytes_AS_STRING(code), 16) != 0) {
        return NULL;
    }
    PyObject *ex = PyTuple_GET_ITEM(hit, 3);
    Py_INCREF(ex);
    return ex;
}

PyDoc_STRVAR(runner_run_known_doc, "run_known(engine, rip) -> err or exit: run(rip), then the known port-I/O exit "
                                   "at the stop, if it is one (see the module comment).");

static PyObject *runner_run_known(Runner *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_Format(PyExc_TypeError, "run_known() takes 2 arguments (%zd given)", nargs);
        return NULL;
    }
    PyObject *r = runner_run(self, args[1]);
    if (r == NULL || PyLong_AsLong(r) != 0) {
        return r;
    }
    PyObject *ex = known_io(self, args[0]);
    if (ex == NULL) {
        return r;
    }
    Py_DECREF(r);
    return ex;
}

static PyObject *runner_get_started(Runner *self, void *closure)
{
    (void)closure;
    return PyFloat_FromDouble(self->started);
}

static PyMethodDef runner_methods[] = {
    {"run", (PyCFunction)runner_run, METH_O, runner_run_doc},
    {"enter", (PyCFunction)runner_enter, METH_O, runner_enter_doc},
    {"leave", (PyCFunction)(void (*)(void))runner_leave, METH_FASTCALL, runner_leave_doc},
    {"ctl", (PyCFunction)runner_ctl, METH_NOARGS, "ctl() -> the control registers last exchanged, or ()."},
    {"set_ctl", (PyCFunction)runner_set_ctl, METH_O, "set_ctl(values): the engine loaded these control registers."},
    {"forget", (PyCFunction)runner_forget, METH_NOARGS, "forget(): the next enter() writes every register."},
    {"bind_io", (PyCFunction)(void (*)(void))runner_bind_io, METH_FASTCALL, runner_bind_io_doc},
    {"run_known", (PyCFunction)(void (*)(void))runner_run_known, METH_FASTCALL, runner_run_known_doc},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef runner_getset[] = {
    {"started", (getter)runner_get_started, NULL, "monotonic time the current run began (0.0: none runs)", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

PyDoc_STRVAR(runner_doc, "Runner(handle, emu_start, reg_read_batch, reg_write, ids, vals, names): one call per time "
                         "slice of the Unicorn engine (uc_emu_start, then the register batch), and the GPR exchange "
                         "with the save state at VMRUN and #VMEXIT.");

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
    if ((s_regs = PyUnicode_InternFromString("regs")) == NULL || (s_rip = PyUnicode_InternFromString("rip")) == NULL ||
        (s_rflags = PyUnicode_InternFromString("rflags")) == NULL ||
        (s_cr0 = PyUnicode_InternFromString("cr0")) == NULL || (s_cr3 = PyUnicode_InternFromString("cr3")) == NULL ||
        (s_cr4 = PyUnicode_InternFromString("cr4")) == NULL || (s_efer = PyUnicode_InternFromString("efer")) == NULL ||
        (s_event = PyUnicode_InternFromString("_event")) == NULL ||
        (s_internal = PyUnicode_InternFromString("_internal")) == NULL ||
        (s_tb_flush_pending = PyUnicode_InternFromString("_tb_flush_pending")) == NULL) {
        return -1;
    }
    ctl_names[0] = s_rflags;
    ctl_names[1] = s_cr0;
    ctl_names[2] = s_cr3;
    ctl_names[3] = s_cr4;
    ctl_names[4] = s_efer;
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

/* ---- stops at a block boundary ---------------------------------------------------------------
 * Unicorn 2.1.4 tests for a pending uc_emu_stop after every guest load and store and leaves with RIP
 * back at the start of the instruction, whose store has already been written: a read-modify-write
 * on memory then runs twice when emulation resumes (tests/hw/test_hw_unicorn_stop.py).  Stops that
 * are not made by a code hook (the watchdog's time slice, a fill hook's TB-flush or eviction request)
 * therefore only set a request word, and this block hook stops at the start of the next translated
 * block, before any of it executes.  user_data points at a StopWord the engine owns. */
typedef int (*emu_stop_fn)(void *uc);
typedef struct {
    volatile int request;
    int reserved;
    emu_stop_fn stop;
} StopWord;

static void stop_at_block(void *uc, uint64_t address, uint32_t size, void *user_data)
{
    StopWord *w = (StopWord *)user_data;
    (void)address;
    (void)size;
    if (w->request) {
        w->request = 0;
        w->stop(uc);
    }
}

static PyObject *block_stop_address(PyObject *self, PyObject *noargs)
{
    (void)self;
    (void)noargs;
    return PyLong_FromVoidPtr((void *)stop_at_block);
}

static PyMethodDef module_methods[] = {
    {"block_stop_address", block_stop_address, METH_NOARGS,
     "block_stop_address() -> the address of the UC_HOOK_BLOCK callback that stops when the StopWord\n"
     "{int request; int reserved; uc_emu_stop's address} given as its user data has request set."},
    {NULL, NULL, 0, NULL},
};

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
    module_methods,
    slots,
    NULL,
    NULL,
    NULL,
};

PyMODINIT_FUNC PyInit__uc_accel(void)
{
    return PyModuleDef_Init(&module);
}
